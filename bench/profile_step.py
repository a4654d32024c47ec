#!/usr/bin/env python
"""Where one training step's time goes: ``torch.profiler`` over the step of ``bench/throughput.py``.

Builds the same model, optimizer and random batch as ``bench/throughput.py`` (the ``Runner`` of
``bench/_models.py``: forward, loss, backward, clipping, optimizer step) for one regularizer (or ``nn_lstm``, the
reference) at one size, runs ``--warmup`` steps, times ``--steps`` steps unprofiled, then
profiles ``--steps`` more and prints each category's time per step (mean over the profiled
steps), calls per step and share of the profiled step's wall time, then the ops that cost most.

Every profiler event (an op of torch's dispatcher, an autograd node or a labelled region) is
counted by its *self* time (its time minus its children's), so nothing is counted twice; on CUDA
by the GPU time of the kernels it launched itself. Categories, the first that matches in this
order:

* ``optimizer, clipping, zero_grad``: everything inside torch's ``Optimizer.step#...`` and
  ``Optimizer.zero_grad#...`` regions and the runner's ``clip_grad_norm`` region.
* ``weight reorders``: ``mkldnn::_reorder_linear_weight`` (the ``packed`` backend of
  :mod:`lm.nn.lstm_matmul`, once per window and weight, forward and backward layouts).
* ``noise draws``: random number ops (``rand``, ``randn``, ``uniform_``, ``normal_``,
  ``bernoulli_``, ``randint``, ``random_`` ...); the comparisons and scalings that turn them into
  masks are element-wise.
* ``per-step matmuls``: matmul ops (``mm``, ``addmm``, ``bmm``, ``linear``,
  ``mkldnn::_linear_pointwise`` ...) whose left operand has ``B`` rows: the products inside the
  recurrence, one or two per step forward and backward.
* ``window-wide matmuls``: the other matmul ops, over ``T·B`` rows: input projections and their
  gradients, the window kernel's ``dW_hh`` / ``dΔŴ``, the decoder and its gradients.
* ``fused LSTM kernel``: nn.LSTM's own kernel (``mkldnn_rnn_layer`` and its backward on CPU,
  ``_cudnn_rnn`` on CUDA), matmuls and element-wise work in one op.
* ``autograd Functions' self``: the self time of autograd nodes and of custom
  ``autograd.Function`` records (``_LSTMWindow``, ``_LSTMWindowBackward``): the Python of the
  window kernel's loops, and any kernel it calls outside the dispatcher (e.g. through ``ctypes``).
* ``element-wise``: point-wise ops (``add``, ``mul``, ``addcmul``, ``sigmoid``, ``tanh``,
  ``copy_``, ``lerp``, casts, comparisons, their backward forms ...) and ops of any namespace
  other than torch's own (a custom kernel registered with ``torch.library``).
* ``rest``: everything else with a name: views and allocations (``select``, ``unbind``,
  ``empty``, ``as_strided``), the loss, ``one_hot``, embedding lookups and reductions.
* ``unattributed``: the step's wall time minus the sum of all self times: Python outside any
  op or Function (the model's and the runner's code), kernels called outside the dispatcher
  from there, the profiler's own gaps; on CUDA, the time the GPU is idle.

The categories and ``unattributed`` sum to the profiled wall time. The profiler adds work per op,
so the profiled step is slower than the unprofiled one; both are printed, and their gap is the
profiler's own share. ``--device cuda`` has not been run yet (no GPU lent so far).

    python bench/profile_step.py --size char --reg wd_flipout --threads 2
    python bench/profile_step.py --size word --reg zoneout --precision bf16 --steps 3 --json runs/prof.json
    python bench/profile_step.py --tiny --reg variational          # seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._floor import timed, torch_threads, write_json  # noqa: E402
from bench._profiler import profiler_quiet  # noqa: E402
from bench import _models as models  # noqa: E402
from bench._models import REFERENCE, SIZES, TINY, build_runners, kernel_of, regularizers  # noqa: E402
from lm.nn import fastrand, hardware, lstm, lstm_fused  # noqa: E402
from lm.nn.precision import PRECISIONS, Precision  # noqa: E402

CATEGORIES = ("per-step matmuls", "window-wide matmuls", "fused LSTM kernel", "element-wise", "weight reorders",
              "noise draws", "optimizer, clipping, zero_grad", "autograd Functions' self", "rest", "unattributed")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_linear_pointwise", "mkldnn_linear",
           "_mkl_linear", "mv", "addmv", "dot", "_scaled_mm"}
BATCHED = {"bmm", "baddbmm"}  # rows of one matrix of the batch: dim -2 of the left operand
FUSED_LSTM = {"lstm", "mkldnn_rnn_layer", "mkldnn_rnn_layer_backward", "_cudnn_rnn", "_cudnn_rnn_backward",
              "miopen_rnn", "miopen_rnn_backward", "_thnn_fused_lstm_cell"}
NOISE = {"rand", "rand_like", "randn", "randn_like", "uniform", "normal", "bernoulli", "randint", "randint_like",
         "random", "exponential", "randperm", "multinomial", "native_dropout"}
ELEMENTWISE = {"add", "sub", "rsub", "mul", "div", "addcmul", "addcdiv", "sigmoid", "tanh", "sigmoid_backward",
               "tanh_backward", "copy", "lerp", "lt", "gt", "ge", "le", "eq", "ne", "neg", "exp", "log", "sqrt",
               "rsqrt", "pow", "clamp", "clamp_min", "clamp_max", "where", "fill", "zero", "maximum", "minimum",
               "abs", "sign", "reciprocal", "to", "_to_copy", "relu", "threshold", "threshold_backward",
               "masked_fill", "_foreach_add", "_foreach_mul", "_foreach_lerp", "_foreach_addcmul"}
TORCH_NAMESPACES = {"aten", "mkldnn", "prim", "prims", "autograd", "torch", "cuda", "c10d", "profiler", "quantized"}
OPTIM_REGIONS = ("Optimizer.step#", "Optimizer.zero_grad#", "clip_grad_norm")


def _base(name: str) -> tuple[str, str]:
    """``'aten::addcmul_'`` -> ``('aten', 'addcmul')``: namespace ('' for none) and the op without
    its in-place underscore."""
    ns, _, op = name.rpartition("::")
    if op.endswith("_") and not op.endswith("__"):
        op = op[:-1]  # in-place form
    return ns, op


def _rows(op: str, shapes: list) -> int | None:
    """Rows of a matmul's left operand (``addmm``/``baddbmm``: the second input, after the bias)."""
    mats = [s for s in (shapes[1:] if op in ("addmm", "baddbmm", "addbmm", "addmv") else shapes)
            if isinstance(s, (list, tuple)) and len(s) >= 2]
    if not mats:
        return None
    left = mats[0]
    return int(left[-2]) if op in BATCHED else math.prod(int(d) for d in left[:-1])


def category(event, batch: int) -> str:
    """The category of one profiler event (see the module doc); ``batch`` is ``B``."""
    name = event.name
    if any(a.startswith(OPTIM_REGIONS) for a in _ancestry(event)):
        return "optimizer, clipping, zero_grad"
    ns, op = _base(name)
    if op == "_reorder_linear_weight":
        return "weight reorders"
    if op in NOISE:
        return "noise draws"
    if op in MATMULS and ns in ("aten", "mkldnn"):
        return "per-step matmuls" if _rows(op, event.input_shapes or []) == batch else "window-wide matmuls"
    if op in FUSED_LSTM:
        return "fused LSTM kernel"
    if name.startswith(("autograd::", "torch::autograd::")) or not ns:
        return "autograd Functions' self"
    if op in ELEMENTWISE or op.startswith("_foreach_") or ns not in TORCH_NAMESPACES:
        return "element-wise"
    return "rest"


def _ancestry(event) -> list[str]:
    """The names of ``event`` and of every event it runs inside."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def breakdown(events, wall_s: float, steps: int, batch: int, cuda: bool = False) -> dict:
    """Per category (and per op): ms per step, calls per step, share of the wall time."""
    ms: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        cat = category(e, batch)
        ms[cat] += us / 1e3
        calls[cat] += 1
        ops[e.name, cat][0] += us / 1e3
        ops[e.name, cat][1] += 1
    wall_ms = wall_s * 1e3
    ms["unattributed"] = wall_ms - sum(ms.values())
    cats = [{"name": c, "ms": ms[c] / steps, "calls": calls[c] / steps, "share": ms[c] / wall_ms} for c in CATEGORIES]
    top = sorted(({"op": n, "category": c, "ms": v[0] / steps, "calls": v[1] / steps} for (n, c), v in ops.items()),
                 key=lambda r: -r["ms"])
    return {"step_ms": wall_ms / steps, "categories": cats, "top_ops": top}


def format_report(rec: dict, top: int) -> str:
    lines = [f"{rec['size']} {rec['reg']} ({rec['kernel']}), {rec['precision']}, {rec['device']}, "
             f"{rec['threads']} threads: step {rec['step_ms']:.1f} ms profiled (mean of {rec['steps']}), "
             f"{rec['unprofiled_step_ms']:.1f} ms unprofiled (median of {rec['steps']})", "",
             "| category | ms/step | calls/step | share |", "|---|---|---|---|"]
    for c in rec["categories"]:
        calls = "" if c["name"] == "unattributed" else f"{c['calls']:,.0f}"
        lines.append(f"| {c['name']} | {c['ms']:.2f} | {calls} | {100 * c['share']:.1f}% |")
    lines.append(f"| total (wall) | {rec['step_ms']:.2f} | | 100.0% |")
    if top:
        lines += ["", "| op | category | ms/step | calls/step |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['category']} | {o['ms']:.2f} | {o['calls']:,.0f} |" for o in rec["top_ops"][:top]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [REFERENCE, *regularizers("char")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="char", help="the paper's size (default char)")
    p.add_argument("--reg", choices=names, default="wd_flipout", metavar="NAME",
                   help=f"regularizer, or nn_lstm for the reference (default wd_flipout); one of {', '.join(names)}")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast policy (default fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--steps", type=int, default=3, help="steps timed unprofiled, then profiled (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="steps run first, not measured (default 2)")
    p.add_argument("--top", type=int, default=15, help="ops listed after the categories (default 15; 0: none)")
    p.add_argument("--tiny", action="store_true", help="bench/throughput.py's tiny sizes: seconds (tests)")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p.add_argument("--torch-step", action="store_true",
                   help="the step as before issue 19: torch ops for the recurrence's element-wise work "
                        "(lm.nn.lstm_fused.FUSED = False), torch's generator for the noise (lm.nn.fastrand.FAST = "
                        "False) and torch's unfused Adam")
    p.add_argument("--compare", action="store_true",
                   help="profile the step as before issue 19 (--torch-step) and as now in one process, their "
                        "steps interleaved, and print both reports and the change per category")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.precision == "fp16" and args.device == "cpu":
        p.error("--precision fp16 needs --device cuda (no float16 nn.LSTM on a CPU); use bf16")
    return args


@contextlib.contextmanager
def step_as_before(on: bool) -> Iterator[None]:
    """With ``on``: the step as before issue 19 -- torch ops for the recurrence's element-wise work,
    torch's generator for the noise, the input projection outside the window kernel, torch's
    unfused Adam (for runners built inside)."""
    saved = lstm_fused.FUSED, fastrand.FAST, lstm.WINDOW_PROJECTS, models.fused_adam_ok
    if on:
        lstm_fused.FUSED = fastrand.FAST = lstm.WINDOW_PROJECTS = False
        models.fused_adam_ok = lambda params: False
    try:
        yield
    finally:
        lstm_fused.FUSED, fastrand.FAST, lstm.WINDOW_PROJECTS, models.fused_adam_ok = saved


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        recs = profile_steps(args)
    print("\n\n".join(format_report(r, args.top) for r in recs))
    if args.compare:
        print("\n" + format_change(*recs))
    if args.json:
        for rec in recs:
            rec["machine"] = hardware.facts("cpu")
        write_json(args.json, {"before": recs[0], "after": recs[1]} if args.compare else recs[0])
    return 0


def format_change(before: dict, after: dict) -> str:
    lines = ["| category | before ms/step | after ms/step | change |", "|---|---|---|---|"]
    for b, a in zip(before["categories"], after["categories"]):
        lines.append(f"| {b['name']} | {b['ms']:.1f} | {a['ms']:.1f} | {a['ms'] - b['ms']:+.1f} |")
    lines.append(f"| total (wall, profiled) | {before['step_ms']:.1f} | {after['step_ms']:.1f} | "
                 f"{after['step_ms'] - before['step_ms']:+.1f} |")
    lines.append(f"| unprofiled step | {before['unprofiled_step_ms']:.1f} | {after['unprofiled_step_ms']:.1f} | "
                 f"{after['unprofiled_step_ms'] - before['unprofiled_step_ms']:+.1f} |")
    return "\n".join(lines)


def profile_steps(args: argparse.Namespace) -> list[dict]:
    """Warm up, time unprofiled steps, profile as many, and return the report's record (with
    ``--compare``: two, before and after, their steps interleaved so that both see the same machine)."""
    device = torch.device(args.device)
    size = (TINY if args.tiny else SIZES)[args.size]
    modes = [True, False] if args.compare else [args.torch_step]
    runners = []
    for before in modes:
        with step_as_before(before):
            runners.append(build_runners(size, [] if args.reg == REFERENCE else [args.reg], device,
                                         Precision(args.precision, device))[args.reg])
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    unprofiled, walls, events = ([[] for _ in modes] for _ in range(3))
    for phase in ("warmup", "timed", "profiled"):
        for _ in range(args.warmup if phase == "warmup" else args.steps):
            for i, (before, runner) in enumerate(zip(modes, runners)):
                with step_as_before(before):
                    if phase == "warmup":
                        runner.train_step()
                    elif phase == "timed":
                        unprofiled[i].append(timed(runner.train_step, device))
                    else:
                        with profiler_quiet(), profile(activities=activities, record_shapes=True) as prof:
                            walls[i].append(timed(runner.train_step, device))
                        events[i] += list(prof.events())
    recs = []
    for i, before in enumerate(modes):
        rec = {"size": size.name, "reg": args.reg, "kernel": kernel_of(runners[i]), "precision": args.precision,
               "device": str(device), "threads": torch.get_num_threads(), "tiny": args.tiny, "steps": args.steps,
               "warmup": args.warmup, "torch_step": before, "unprofiled_step_ms": statistics.median(unprofiled[i]) * 1e3,
               "torch": torch.__version__}
        rec.update(breakdown(events[i], sum(walls[i]), args.steps, size.batch, cuda))
        recs.append(rec)
    return recs


if __name__ == "__main__":
    sys.exit(main())
