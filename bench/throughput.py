#!/usr/bin/env python
"""Training and evaluation throughput and peak memory of every regularizer against ``nn.LSTM``.

For each size (the paper's, App. D.1) and each regularizer, a :class:`lm.nn.model.LanguageModel`
is timed side by side, in the same process, with a plain ``torch.nn.LSTM`` language model of the
same size (same embedding/one-hot input, layers, decoder and optimizer):

* ``char``: 1x1000 LSTM, one-hot input, vocabulary 50, batch 32, window 100, AMSGrad;
* ``word``: 2x650 LSTM, 650-d embeddings, vocabulary 10,000, batch 40, window 35, SGD, clip 0.25.

What is measured (random tokens; speed does not depend on the data):

* training: one optimizer step as in :meth:`lm.train.trainer.Trainer.train_step` -- forward,
  cross-entropy, backward, gradient clipping, optimizer step; the hidden state is carried
  (detached) from step to step. Reported as tokens/s (``T * B`` per step).
* evaluation: one forward window under ``torch.no_grad()`` in eval mode, same ``T`` and ``B``.
* peak memory (``peak_mem_mb``): the largest amount of tensor memory allocated *during* one
  training step on top of what is live at its start (parameters, optimizer state, the carried
  state and the batch): activations saved for backward, gradients and temporaries. On CUDA it is
  ``torch.cuda.max_memory_allocated() - memory_allocated()`` at the step's start; on CPU it is the
  same quantity rebuilt from the allocation events of ``torch.profiler`` (``profile_memory=True``;
  the running sum of allocated minus freed bytes, maximised over the step; :mod:`bench._profiler`).
  Process RSS is not used: it never goes down and includes the allocator's caches.
* matmul floor (``matmul_floor``): the training ratio to ``nn.LSTM`` that the window kernel's
  matmuls alone would give, measured in the same run (:mod:`bench._floor`, the same matmuls as
  ``bench/flipout_gemm.py --window``, issued as the layer issues them in this precision and on
  the backend it picks): ``S / (S - L + M) = (L + E) / (M + E)``, with ``S`` the ``nn_lstm``
  model's whole training step, ``L`` ``nn.LSTM``'s forward + backward of its layers, ``M`` the
  window kernel's matmuls of those layers (input projection and its gradients, per-step products
  with their weight reorders, ``dW_hh``; with flipout the ``ΔŴ`` products and ``dΔŴ``) and
  ``E = S - L`` the rest of the step (loss, embedding, decoder, clipping, optimizer), the same in
  both models. ``matmuls_only_floor`` is the former ``(L + D) / (M + D)``, ``D`` the decoder's
  three matmuls: every matmul of the step, no other work. ``layer_floor`` is ``L / M``, the layers
  alone, the definition of ``flipout_gemm --window``.
  Regularizers on the flipout window kernel (wd_flipout, gauss_flipout) get the flipout floor,
  the other window regularizers (variational, semeniuta, zoneout) the plain one; models on
  nn.LSTM's own kernel ('fused') get 1 by definition, not a measurement of nn.LSTM against
  itself. The table's "of floor" is the measured ratio over the floor (above 1 only by noise).

Robust ratios on a noisy machine: after warm-up, every round times each regularizer between two
timings of the reference (R, A, R, B, R, ...; the order of the regularizers rotates from round to
round); a regularizer's ratio in a round is the mean of its two neighbouring reference times
divided by its own time, and the reported ratio is the median over rounds. Tokens/s are medians
of the individual timings. The floors are timed the same way after the evaluation rounds: R, plain
matmuls, R, flipout matmuls, R, decoder matmuls, R, ``S``, R (R: ``nn.LSTM``'s layers ``L``; ``E`` per
round is ``S`` minus the mean of its two neighbouring Rs, clamped at 0), one floor per size,
precision and kind, shared by the regularizers of that kind; ``--no-floor`` skips them.

Regularizer rates (:func:`regularizers`): the paper's -- variational ``hidden_p`` 0.25, semeniuta
``cell_p`` 0.25, zoneout 0.5/0.05 (char) and 0.25/0.025 (word), DropConnect 0.5, Gaussian σ = 1;
input/output (and, for word, between-layer) dropout 0.25 for ``dropout`` and both ``variational``
rows; ``variational_nohidden`` has no recurrent mask and so runs on the fused kernel.

JSON (``--json``): a list with one record per size and model (``nn_lstm`` is the reference):
``name, size, device, kernel`` ('nn.LSTM', 'fused' or 'window', for training), ``train_tokens_per_s,
eval_tokens_per_s, ratio_vs_nn_lstm`` (training), ``eval_ratio_vs_nn_lstm, peak_mem_mb,
mem_ratio_vs_nn_lstm, threads, rounds, train_ratios`` (every round's training ratio) and
``loadavg`` (the machine's 1/5/15-minute load averages after the timings, this run's own threads
included: on a shared machine
other processes' load slows nn.LSTM more than the window kernel, so compare runs at similar load)
and ``precision`` (fp32, bf16 or fp16); ``floor_kind`` ('nn.LSTM', 'fused', 'plain', 'flipout'),
``matmul_floor``, ``matmuls_only_floor`` and ``layer_floor`` (1.0 for 'nn.LSTM' and 'fused'; null
with ``--no-floor``), ``floor_rounds`` (every round's ``matmul_floor``; empty unless measured) and
``floor_ms`` (medians in ms of ``L``, ``M``, ``D``, ``S`` and ``E``, keys ``nn_lstm_layers``,
``window_matmuls``, ``decoder_matmuls``, ``nn_lstm_step``, ``rest``; null unless measured).

Mixed precision (``--precision bf16``, or a list such as ``fp32,bf16``): every model, ``nn.LSTM``
included, runs its forward pass under the same autocast policy (:mod:`lm.nn.precision`; fp16
with a gradient scaler), so each ratio compares like with like. With fp32 and a low precision in
one call, a second table gives each model's low-precision tokens/s over its fp32 tokens/s (those
come from separate timing blocks of the same process, not interleaved rounds).

Usage::

    python bench/throughput.py --threads 2                        # both sizes, all regularizers
    python bench/throughput.py --quick --sizes char --only variational,wd_flipout
    python bench/throughput.py --device cuda --json runs/throughput_cuda.json
    python bench/throughput.py --tiny --json /tmp/t.json          # seconds (tests)
    python bench/throughput.py --threads 2 --precision fp32,bf16 --json runs/bf16.json
    python bench/throughput.py --threads 2 --sizes char --precision fp32,bf16 --runs 3 --json runs/t3.json

``--runs N`` repeats the whole measurement N times in one invocation (each run with its own warm-up,
rounds and floors); every record carries ``run`` (1..N), and a last table gives per row the median
over the runs of the training ratio, the floor and the share of the floor (each run's ratio over its
own floor) with the runs' range. Each record's ``machine`` holds the CPU model, the ISA, the bf16
units and ``thp`` (``alloc``: PyTorch's allocator asks for huge pages, ``THP_MEM_ALLOC_ENABLE=1``;
``system``: the kernel's mode).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._floor import interleave, model_floors, torch_threads, write_json  # noqa: E402
from bench._models import (REFERENCE, SIZES, TINY, Runner, Size, build_runners, floor_kind,  # noqa: E402
                           kernel_of, regularizers)
from bench._profiler import peak_step_memory  # noqa: E402
from lm.nn import hardware  # noqa: E402
from lm.nn.precision import LOW_DTYPES, PRECISIONS, Precision, fused_in_float32  # noqa: E402

def fused_in_float32_here(device: torch.device, precision: str) -> bool:
    """Whether nn.LSTM and the fused layers run in float32 under this precision here (no oneDNN LSTM)."""
    with Precision(precision, device).autocast():
        return fused_in_float32(device)


def floors(size: Size, kinds: Sequence[str], rounds: int, device: torch.device, precision: str,
           step: Callable[[], None]) -> dict[str, dict]:
    """The matmul floors of ``size``'s model for the window kinds in ``kinds`` (bench/_floor.py);
    ``step``: the reference model's training step, whose rest beyond its layers both sides share."""
    m = size.model
    return model_floors(size.vocab if m.input == "onehot" else m.emb_size, m.hidden_size, m.num_layers, size.vocab,
                        size.batch, size.bptt, onehot=m.input == "onehot", kinds=tuple(kinds), rounds=rounds,
                        dtype=LOW_DTYPES.get(precision), device=device, step=step)


def interleaved(runners: dict[str, Runner], step: str, rounds: int, device: torch.device) -> dict[str, dict]:
    """Time ``step`` ('train_step' or 'eval_step') in rounds R, A, R, B, ..., R (see the module doc)."""
    names = [n for n in runners if n != REFERENCE]
    t = interleave(getattr(runners[REFERENCE], step), {n: getattr(runners[n], step) for n in names}, rounds, device)
    out = {REFERENCE: {"time": statistics.median(t.ref_all), "ratio": 1.0, "ratios": [1.0]}}
    for name in names:
        out[name] = {"time": statistics.median(t.own[name]), "ratio": statistics.median(t.ratios(name)),
                     "ratios": t.ratios(name)}
    return out


def measure(size: Size, names: Sequence[str], device: torch.device, rounds: int, warmup: int,
            log: Callable[[str], None], precision: str = "fp32", floor: bool = True) -> list[dict]:
    runners = build_runners(size, names, device, Precision(precision, device))
    log(f"[{size.name}, {precision}] warm-up ({warmup} train + eval steps per model)")
    for runner in runners.values():
        for _ in range(warmup):
            runner.train_step()
            runner.eval_step()
    log(f"[{size.name}] timing training ({rounds} rounds)")
    train = interleaved(runners, "train_step", rounds, device)
    log(f"[{size.name}] timing evaluation ({rounds} rounds)")
    evals = interleaved(runners, "eval_step", rounds, device)
    kinds = {name: floor_kind(runner) for name, runner in runners.items()}
    window = sorted({k for k in kinds.values() if k in ("plain", "flipout")})
    measured = {}
    if floor and window:
        log(f"[{size.name}] matmul floors: {', '.join(window)} ({rounds} rounds)")
        measured = floors(size, window, rounds, device, precision, runners[REFERENCE].train_step)
    log(f"[{size.name}] peak memory")
    load = list(os.getloadavg())  # 1, 5, 15-minute load averages after the timings
    records = []
    for name, runner in runners.items():
        tokens = runner.tokens
        records.append({
            "name": name, "size": size.name, "device": str(device), "kernel": kernel_of(runner),
            "train_tokens_per_s": tokens / train[name]["time"], "eval_tokens_per_s": tokens / evals[name]["time"],
            "ratio_vs_nn_lstm": train[name]["ratio"], "eval_ratio_vs_nn_lstm": evals[name]["ratio"],
            "peak_mem_mb": peak_step_memory(runner.train_step, device),
            "threads": torch.get_num_threads(), "rounds": rounds,
            "train_ratios": train[name]["ratios"], "loadavg": load, "precision": precision,
            "machine": hardware.facts(device), "fused_in_float32": fused_in_float32_here(device, precision),
            "floor_kind": kinds[name], **floor_fields(kinds[name], measured, floor),
        })
    ref_mem = records[0]["peak_mem_mb"]
    for rec in records:
        rec["mem_ratio_vs_nn_lstm"] = rec["peak_mem_mb"] / ref_mem if ref_mem else math.nan
    return records


def floor_fields(kind: str, measured: dict[str, dict], floor: bool) -> dict:
    """A record's floor keys: measured for the window kinds, 1 by definition for nn.LSTM's kernel."""
    if not floor:
        return {"matmul_floor": None, "matmuls_only_floor": None, "layer_floor": None, "floor_rounds": [],
                "floor_ms": None}
    if kind in measured:
        return measured[kind]
    return {"matmul_floor": 1.0, "matmuls_only_floor": 1.0, "layer_floor": 1.0, "floor_rounds": [], "floor_ms": None}


def format_table(records: list[dict]) -> str:
    """Markdown table; 'train ratio' is the median over rounds with the rounds' range in brackets,
    'floor' the model's matmul floor and 'of floor' the train ratio over it ('-' without floors)."""
    head = ("| size | precision | regularizer | kernel | train tok/s | train ratio (range) | floor | of floor "
            "| eval tok/s | eval ratio | peak MiB | mem ratio |")
    lines = [head, "|" + "---|" * 12]
    for r in records:
        lo, hi = min(r["train_ratios"]), max(r["train_ratios"])
        fl = r.get("matmul_floor")
        floor = f"{fl:.2f} | {r['ratio_vs_nn_lstm'] / fl:.2f}" if fl else "- | -"
        lines.append(f"| {r['size']} | {r.get('precision', 'fp32')} | {r['name']} | {r['kernel']} "
                     f"| {r['train_tokens_per_s']:,.0f} "
                     f"| {r['ratio_vs_nn_lstm']:.2f} ({lo:.2f}-{hi:.2f}) | {floor} | {r['eval_tokens_per_s']:,.0f} "
                     f"| {r['eval_ratio_vs_nn_lstm']:.2f} | {r['peak_mem_mb']:.1f} | {r['mem_ratio_vs_nn_lstm']:.2f} |")
    return "\n".join(lines)


def runs_table(records: list[dict]) -> str:
    """Per row (size, precision, regularizer): the median over runs of the training ratio, of the
    floor and of the share of the floor, each run's share being its own ratio over its own floor,
    with the runs' range; the tokens/s are medians too. ``--runs`` > 1."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault((r["size"], r.get("precision", "fp32"), r["name"]), []).append(r)
    lines = ["| size | precision | regularizer | kernel | runs | train tok/s | train ratio (range) | floor "
             "| of floor (range) |", "|" + "---|" * 9]
    med = statistics.median
    for (size, precision, name), rs in rows.items():
        ratios = [r["ratio_vs_nn_lstm"] for r in rs]
        floors_ = [r["matmul_floor"] for r in rs if r.get("matmul_floor")]
        shares = [r["ratio_vs_nn_lstm"] / r["matmul_floor"] for r in rs if r.get("matmul_floor")]
        floor = (f"{med(floors_):.2f} | {med(shares):.2f} ({min(shares):.2f}-{max(shares):.2f})" if shares
                 else "- | -")
        lines.append(f"| {size} | {precision} | {name} | {rs[0]['kernel']} | {len(rs)} "
                     f"| {med(r['train_tokens_per_s'] for r in rs):,.0f} "
                     f"| {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {floor} |")
    return "\n".join(lines)


def precision_table(records: list[dict]) -> str:
    """Each model's low-precision training (and evaluation) tokens/s over its fp32 tokens/s; empty
    unless the records hold fp32 and at least one low precision."""
    fp32 = {(r["size"], r["name"]): r for r in records if r.get("precision", "fp32") == "fp32"}
    low = [r for r in records if r.get("precision", "fp32") != "fp32" and (r["size"], r["name"]) in fp32]
    if not low:
        return ""
    lines = ["| size | precision | regularizer | train tok/s | fp32 train tok/s | train speed-up | eval speed-up |",
             "|" + "---|" * 7]
    for r in low:
        f = fp32[(r["size"], r["name"])]
        lines.append(f"| {r['size']} | {r['precision']} | {r['name']} | {r['train_tokens_per_s']:,.0f} "
                     f"| {f['train_tokens_per_s']:,.0f} | {r['train_tokens_per_s'] / f['train_tokens_per_s']:.2f} "
                     f"| {r['eval_tokens_per_s'] / f['eval_tokens_per_s']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--quick", action="store_true", help="fewer rounds (3) and warm-up steps (1); sizes unchanged")
    p.add_argument("--tiny", action="store_true", help="tiny models and 2 rounds: a smoke test in seconds")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; 3 with --quick)")
    p.add_argument("--sizes", default="char,word", help="comma-separated subset of: char, word")
    p.add_argument("--only", default="", help="comma-separated regularizer names (default: all); "
                   f"choices: {', '.join(regularizers('char'))}")
    p.add_argument("--precision", default="fp32", help="comma-separated list of: fp32, bf16, fp16 (default fp32); "
                   "each is timed in turn, every model under the same policy")
    p.add_argument("--runs", type=int, default=1, help="run the whole table this many times (each run its own "
                   "warm-up and rounds) and print per-row medians and ranges over the runs (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the records to this JSON file")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the matmul floors (bench/_floor.py)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs {args.runs}: give 1 or more")
    args.precisions = [x for x in args.precision.split(",") if x]
    bad = [x for x in args.precisions if x not in PRECISIONS]
    if bad or not args.precisions:
        p.error(f"--precision: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PRECISIONS)}")
    if "fp16" in args.precisions and args.device == "cpu":
        p.error("--precision fp16 needs --device cuda: oneDNN has no float16 CPU LSTM for the nn.LSTM "
                "reference; use bf16 on a CPU")
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        p.error(f"--sizes: unknown size(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SIZES)}")
    names = [n for n in args.only.split(",") if n] or list(regularizers("char"))
    bad = [n for n in names if n not in regularizers("char")]
    if bad:
        p.error(f"--only: unknown regularizer(s) {', '.join(bad)}; choose from {', '.join(regularizers('char'))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    args.size_list, args.names = sizes, names
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.tiny else 3 if args.quick else 7)
    warmup = 1 if (args.quick or args.tiny) else 2
    table = TINY if args.tiny else SIZES
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
        f"{torch.get_num_threads()} threads")
    records = []
    for run in range(1, args.runs + 1):
        if args.runs > 1:
            log(f"run {run} of {args.runs}")
        these = []
        for precision in args.precisions:
            for size in args.size_list:
                these += measure(table[size], args.names, device, rounds, warmup, log, precision, args.floor)
        for rec in these:
            rec["run"] = run
        if args.runs > 1:
            print(f"\nrun {run} of {args.runs}:\n")
        print(format_table(these))
        speedups = precision_table(these)
        if speedups:
            print("\nlow precision against fp32 (tokens/s ratio, same model):\n\n" + speedups)
        records += these
    if args.runs > 1:
        print(f"\nmedians over {args.runs} runs (range over the runs in brackets):\n\n" + runs_table(records))
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
