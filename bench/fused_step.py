#!/usr/bin/env python
"""Is the fused C step faster? Training steps with and without it, interleaved in one process.

For each size and regularizer, one model of ``bench/throughput.py`` (the ``Runner`` of
``bench/_models.py``: forward, loss, backward, clipping, optimizer step) is timed in four configurations, in rotating order
within each round so that slow phases of the machine hit all of them alike:

* ``torch``: the recurrence's element-wise work in torch ops and the noise from torch's
  generator (``lm.nn.lstm_fused.FUSED = False``, ``lm.nn.fastrand.FAST = False``), the input
  projection outside the window (``lm.nn.lstm.WINDOW_PROJECTS = False``): before issue 19;
* ``fused step``: the C step of :mod:`lm.nn.lstm_fused`, noise still from torch's generator;
* ``fused + philox``: the C step and the Philox draws of :mod:`lm.nn.fastrand` (issue 19's first
  round);
* ``+ projection``: and the window computing its input projection itself into reused buffers
  (:func:`lm.nn.lstm_kernel.lstm_window`; the default).

Printed: median milliseconds per step of each, and the speed-ups over ``torch`` (median over
rounds of the per-round ratio), and of ``+ projection`` over ``fused + philox``. The same model,
optimizer and batch serve all four, so the weights evolve across the timings; speed does not
depend on them.

    python bench/fused_step.py --threads 2 --json runs/fused_step.json
    python bench/fused_step.py --sizes char --only zoneout,gauss_flipout --precision bf16
    python bench/fused_step.py --tiny        # seconds (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._floor import timed, torch_threads, write_json  # noqa: E402
from bench._models import SIZES, TINY, build_runners, kernel_of, regularizers  # noqa: E402
from lm.nn import fastrand, lstm, lstm_fused  # noqa: E402
from lm.nn.precision import Precision  # noqa: E402

MODES = {"torch": (False, False, False), "fused step": (None, False, False), "fused + philox": (None, None, False),
         "+ projection": (None, None, True)}  # lstm_fused.FUSED, fastrand.FAST, lstm.WINDOW_PROJECTS


def _set(mode: str) -> None:
    lstm_fused.FUSED, fastrand.FAST, lstm.WINDOW_PROJECTS = MODES[mode]
DEFAULT = "variational,semeniuta,zoneout,wd_flipout,gauss_flipout,dropout,weight_drop,gauss"


def measure(size, name: str, precision: str, rounds: int, warmup: int, device: torch.device) -> dict:
    runner = build_runners(size, [name], device, Precision(precision, device))[name]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    ratios: dict[str, list[float]] = {m: [] for m in MODES}
    projection: list[float] = []
    order = list(MODES)
    try:
        for mode in order * max(warmup, 1):
            _set(mode)
            runner.train_step()
        for r in range(rounds):
            this = {}
            k = r % len(order)
            for mode in order[k:] + order[:k]:
                _set(mode)
                this[mode] = timed(runner.train_step, device)
                times[mode].append(this[mode])
            for mode in MODES:
                ratios[mode].append(this["torch"] / this[mode])
            projection.append(this["fused + philox"] / this["+ projection"])
    finally:
        lstm_fused.FUSED = fastrand.FAST = None
        lstm.WINDOW_PROJECTS = True
    return {"size": size.name, "name": name, "kernel": kernel_of(runner), "precision": precision,
            "threads": torch.get_num_threads(), "rounds": rounds,
            "ms": {m: statistics.median(v) * 1e3 for m, v in times.items()},
            "speedup": {m: statistics.median(v) for m, v in ratios.items()},
            "speedup_range": {m: [min(v), max(v)] for m, v in ratios.items()},
            "projection_speedup": statistics.median(projection)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="char,word")
    p.add_argument("--only", default=DEFAULT, help=f"regularizers (default: {DEFAULT})")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny models, 2 rounds (tests)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(regularizers("char"))
    if unknown:
        p.error(f"unknown regularizer(s) {sorted(unknown)}; choose from {', '.join(regularizers('char'))}")
    sizes, rounds = (TINY, 2) if args.tiny else (SIZES, args.rounds)
    records = []
    with torch_threads(args.threads):
        faster = [m for m in MODES if m != "torch"]
        print(f"| size | precision | regularizer | kernel | {' | '.join(f'{m} ms' for m in MODES)} | "
              + " | ".join(f"{m} speed-up" for m in faster) + " | projection's own speed-up |")
        print("|" + "---|" * (5 + 2 * len(faster)))
        for size in args.sizes.split(","):
            for precision in args.precision.split(","):
                for name in names:
                    rec = measure(sizes[size], name, precision, rounds, args.warmup, torch.device("cpu"))
                    records.append(rec)
                    ms, sp = rec["ms"], rec["speedup"]
                    print(f"| {size} | {precision} | {name} | {rec['kernel']} | "
                          + " | ".join(f"{ms[m]:.1f}" for m in MODES) + " | "
                          + " | ".join(f"{sp[m]:.2f}" for m in faster)
                          + f" | {rec['projection_speedup']:.2f} |", flush=True)
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
