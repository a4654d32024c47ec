#!/usr/bin/env python
"""One switch of the window kernel on and off: training steps of the same model, interleaved.

For each size, precision and regularizer, one model of ``bench/throughput.py`` (the ``Runner`` of
``bench/_models.py``: forward, loss, backward, clipping, optimizer step) takes its training steps
with the switch on and off in alternating order (on, off, then off, on, ...), so that slow phases
of a shared machine hit both alike. Printed: median ms per step of each and the speed-up of "on"
over "off", the median over rounds of the per-round ratio with its range.

Switches (module flags, each documented where it lives):

* ``low_factors``: :data:`lm.nn.lstm_fused.LOW_FACTORS`, the bf16 saved factors of the C step
  (only bf16 windows change);
* ``fused``: :data:`lm.nn.lstm_fused.FUSED`, the C step against the torch step;
* ``byte_masks``: :data:`lm.nn.noise.BYTE_MASKS`, the step masks (cell dropout, zoneout) as bytes
  against float32 values (semeniuta and zoneout change).

    python bench/flag_ab.py --switch low_factors --sizes char --precision bf16 --rounds 7 --threads 2
    python bench/flag_ab.py --tiny                  # seconds (tests)
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
from lm.nn import lstm_fused, noise  # noqa: E402
from lm.nn.precision import Precision  # noqa: E402

SWITCHES = {  # name: (module, attribute, value when on, value when off)
    "low_factors": (lstm_fused, "LOW_FACTORS", True, False),
    "fused": (lstm_fused, "FUSED", None, False),
    "byte_masks": (noise, "BYTE_MASKS", True, False),
}
WINDOW = "variational,semeniuta,zoneout,wd_flipout,gauss_flipout"


def measure(size, name: str, precision: str, switch: str, rounds: int, warmup: int) -> dict:
    """Median ms per step with the switch on and off, and the per-round speed-ups of on over off."""
    module, attr, on, off = SWITCHES[switch]
    before = getattr(module, attr)
    device = torch.device("cpu")
    runner = build_runners(size, [name], device, Precision(precision, device))[name]
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for state in ("on", "off") * max(warmup, 1):
            setattr(module, attr, on if state == "on" else off)
            runner.train_step()
        for r in range(rounds):
            for state in (("on", "off") if r % 2 == 0 else ("off", "on")):
                setattr(module, attr, on if state == "on" else off)
                times[state].append(timed(runner.train_step, device))
    finally:
        setattr(module, attr, before)
    ratios = [b / a for a, b in zip(times["on"], times["off"])]
    return {"size": size.name, "name": name, "precision": precision, "switch": switch, "kernel": kernel_of(runner),
            "threads": torch.get_num_threads(), "rounds": rounds,
            "ms_on": statistics.median(times["on"]) * 1e3, "ms_off": statistics.median(times["off"]) * 1e3,
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--switch", default="low_factors", choices=sorted(SWITCHES))
    p.add_argument("--sizes", default="char,word", help="comma-separated: char, word")
    p.add_argument("--only", default=WINDOW, help=f"regularizers (default: the window kernel's, {WINDOW})")
    p.add_argument("--precision", default="bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--tiny", action="store_true", help="tiny models, 2 rounds (tests)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(regularizers("char"))
    sizes = [s for s in args.sizes.split(",") if s]
    precisions = [x for x in args.precision.split(",") if x]
    if unknown or set(sizes) - set(SIZES) or set(precisions) - {"fp32", "bf16"}:
        p.error(f"unknown regularizer, size or precision in {args.only!r}, {args.sizes!r}, {args.precision!r}; "
                f"regularizers: {', '.join(regularizers('char'))}; sizes: char, word; precisions: fp32, bf16")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    table, rounds = (TINY, 2) if args.tiny else (SIZES, args.rounds)
    records = []
    with torch_threads(args.threads):
        print(f"switch {args.switch}; torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
        print("| size | precision | regularizer | kernel | on ms | off ms | speed-up (range) |\n|---|---|---|---|---|---|---|")
        for size in sizes:
            for precision in precisions:
                for name in names:
                    rec = measure(table[size], name, precision, args.switch, rounds, args.warmup)
                    records.append(rec)
                    lo, hi = rec["speedup_range"]
                    print(f"| {size} | {precision} | {name} | {rec['kernel']} | {rec['ms_on']:.1f} | {rec['ms_off']:.1f} "
                          f"| {rec['speedup']:.3f} ({lo:.3f}-{hi:.3f}) |", flush=True)
    lstm_fused.clear_pool()
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
