#!/usr/bin/env python
"""How long and how big: time per epoch and disk use per run of each paper config, extrapolated.

Running whole epochs of the paper configs takes hours on a CPU, so this script times a few
training steps and a slice of the validation set, and extrapolates:

* ``step_s``: mean seconds per optimizer step over ``--steps`` steps (after
  ``--warmup`` untimed steps), from the start of the first epoch of the real PTB;
* ``steps_per_epoch``: ``ceil((train tokens / batch - 1) / bptt)`` windows (exact for fixed BPTT);
* ``valid_s``: one validation, timed on the first ``--valid-tokens`` tokens of the validation set
  and scaled by its size (evaluation cost is linear in tokens at a fixed batch);
* ``epoch_s = step_s * steps_per_epoch + validations_per_epoch * valid_s``;
* disk: ``best.pt`` and ``last.pt`` each hold the weights (4 bytes per parameter) and the
  optimizer state (AMSGrad: 3 more values per parameter; plain SGD: none), i.e. about
  ``4 * params * (1 + state per parameter)`` bytes each; both files are written for real into a
  temporary directory and their sizes reported beside the formula.

``--lock PATH`` takes an exclusive ``flock`` on PATH around each group of ``--per-lock``
configs (3: about 3 minutes on 2 cores), so a shared machine is held a few minutes at a time.
``cpu_per_wall`` (process CPU seconds per wall second while timing; about the thread count
when the machine is otherwise idle) and the load average before timing say whether anything
else competed for the cores. Usage::

    PTB_DIR=../shared/data/ptb python bench/epoch_time.py --lock /work/cpu.lock --json runs/epoch_time.json
    python bench/epoch_time.py char_flipout.yaml word_wd_flipout.yaml --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lm.config import load_config  # noqa: E402
from lm.data.batching import num_windows  # noqa: E402
from lm.eval.evaluation import evaluate  # noqa: E402
from lm.nn import hardware  # noqa: E402
from lm.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.stem != "quickstart" and "_awd_" not in p.stem)


@contextlib.contextmanager
def exclusive(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def measure(name: str, steps: int, warmup: int, valid_tokens: int, threads: int, device: str = "cpu") -> dict:
    cfg = load_config(name, [f"train.device={device}", f"train.threads={threads}", "train.progress=false"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        t = cfg.train
        data = trainer.corpus.valid[:valid_tokens]
        windows = trainer.dist.windows(trainer.train_data, t.bptt, 0, t.variable_bptt)
        for _ in range(warmup):
            _, x, y = next(windows)
            trainer.train_step(x, y)
        load = os.getloadavg()[0]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            _, x, y = next(windows)
            trainer.train_step(x, y)
        step_s = (time.perf_counter() - start) / steps
        cpu_per_wall = (time.process_time() - cpu) / (step_s * steps)
        threads_used = torch.get_num_threads()
        start = time.perf_counter()
        evaluate(trainer.model, data, trainer.level, cfg.eval.batch_size, cfg.eval.bptt)
        valid_slice_s = time.perf_counter() - start
        trainer.save("best.pt", trainer.model.state_dict())
        trainer.save("last.pt")
        files = {n: (Path(tmp) / n).stat().st_size for n in ("best.pt", "last.pt")}
        trainer.threads.stop()
    params = sum(p.numel() for p in trainer.model.parameters())
    steps_per_epoch = num_windows(trainer.train_data, t.bptt)
    validations = steps_per_epoch / t.eval_every_steps if t.eval_every_steps else 1
    valid_s = valid_slice_s * trainer.corpus.valid.numel() / data.numel()
    epoch_s = step_s * steps_per_epoch + validations * valid_s
    opt_bytes = optimizer_state_bytes(trainer.opt.optimizer)
    return {
        "config": name, "level": trainer.level, "params": params, "threads": threads_used,
        "load_before": load, "cpu_per_wall": cpu_per_wall,
        "steps_timed": steps, "step_s": step_s, "steps_per_epoch": steps_per_epoch,
        "valid_s": valid_s, "epoch_s": epoch_s, "max_epochs": t.max_epochs, "patience": t.patience,
        "max_run_h": epoch_s * t.max_epochs / 3600,
        "checkpoint_formula_bytes": 4 * params + opt_bytes, "run_disk_bytes": files["best.pt"] + files["last.pt"],
        "optimizer_state_per_param": opt_bytes / (4 * params),
        "best_pt_bytes": files["best.pt"], "last_pt_bytes": files["last.pt"],
    }


def show(r: dict) -> None:
    print(f"{r['config']:<24} {r['params'] / 1e6:5.2f}M  {r['step_s']:.3f} s/step x {r['steps_per_epoch']} steps "
          f"+ valid {r['valid_s']:.0f} s = {r['epoch_s'] / 60:5.1f} min/epoch; up to {r['max_epochs']} epochs = "
          f"{r['max_run_h']:.1f} h [cpu/wall {r['cpu_per_wall']:.2f}, load {r['load_before']:.1f}] | best.pt "
          f"{r['best_pt_bytes'] / 1e6:.1f} MB, last.pt {r['last_pt_bytes'] / 1e6:.1f} MB "
          f"(formula {r['checkpoint_formula_bytes'] / 1e6:.1f} each)", flush=True)


def write(path: str, args: argparse.Namespace, rows: list[dict]) -> None:
    machine = {**hardware.facts("cpu"), "platform": platform.platform(), "processor": platform.processor(),
               "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    out = {"device": args.device, "steps": args.steps, "warmup": args.warmup, "valid_tokens": args.valid_tokens,
           "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def markdown(path: str) -> str:
    """The time-per-epoch table of docs/performance.md from a ``--json`` file."""
    out = json.loads(Path(path).read_text())
    lines = ["| config | parameters | s / step | steps / epoch | validation | **time / epoch** | epochs (cap) "
             "| whole run at the cap | disk per run (best.pt + last.pt) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        cap = f"{r['max_epochs']}" + (f", patience {r['patience']}" if r["patience"] else "")
        lines.append(f"| `{r['config']}` | {r['params'] / 1e6:.2f}M | {r['step_s']:.2f} | {r['steps_per_epoch']:,} | "
                     f"{r['valid_s']:.0f} s | **{r['epoch_s'] / 60:.1f} min** | {cap} | {r['max_run_h']:.0f} h | "
                     f"{r['run_disk_bytes'] / 1e6:.0f} MB |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*", default=PAPER_CONFIGS, help="config names (default: the 18 paper configs)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps per config")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocations, oneDNN reorders)")
    p.add_argument("--valid-tokens", type=int, default=20000, help="validation tokens timed (then scaled)")
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: the default policy)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each step ends with loss.item(), a sync)")
    p.add_argument("--lock", help="hold an exclusive flock on this file while measuring each group of configs")
    p.add_argument("--per-lock", type=int, default=3, help="configs measured per exclusive hold of --lock")
    p.add_argument("--json", help="write the figures here (after every group)")
    p.add_argument("--table", metavar="JSON", help="only print the Markdown table of an earlier --json file")
    args = p.parse_args(argv)
    if args.table:
        print(markdown(args.table))
        return 0
    names, rows = list(args.configs), []
    # one hold per group: a waiting exclusive flock only gets the gaps between other users' shared holds
    for i in range(0, len(names), args.per_lock if args.lock else len(names) or 1):
        with exclusive(args.lock):
            group = [measure(n, args.steps, args.warmup, args.valid_tokens, args.threads, args.device)
                     for n in names[i: i + (args.per_lock if args.lock else len(names))]]
        for r in group:
            rows.append(r)
            show(r)
        if args.json:
            write(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
