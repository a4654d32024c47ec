#!/usr/bin/env python
"""The cost of a fixed glibc mmap threshold (lm/train/malloc.py) on a real training, in one process.

Trains windows of a config at its fixed BPTT (``train.variable_bptt=false``: the same work every
window) and alternates glibc's mmap threshold between ``--low`` MiB (the trainer's setting) and 32
MiB (where glibc's own dynamic threshold settles once a training has freed its first large
blocks): ``--rounds`` rounds of ``--per`` timed windows each, one untimed window after every
switch, the order flipped every round. Prints the median seconds per window under each and their
ratio (above 1: the low threshold is faster). Usage::

    PTB_DIR=../shared/data/ptb python bench/malloc_ab.py --config word_awd_wd_flipout.yaml --rounds 6 --per 3
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm.nn import hardware  # noqa: E402
from lm.train.malloc import M_MMAP_THRESHOLD  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="word_awd_wd_flipout.yaml")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per", type=int, default=3, help="timed windows per threshold and round")
    p.add_argument("--low", type=int, default=4, help="the threshold under test, MiB (default 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    from lm.config import load_config
    from lm.train.trainer import Trainer

    libc = ctypes.CDLL(None)
    cfg = load_config(args.config, [*args.set, "train.variable_bptt=false", f"train.threads={args.threads}",
                                    "train.progress=false"])
    times: dict[int, list[float]] = {args.low: [], 32: []}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        windows = trainer.dist.windows(trainer.train_data, cfg.train.bptt, 0, False)

        def window() -> float:
            _, x, y = next(windows)
            t0 = time.perf_counter()
            trainer.train_step(x, y)
            return time.perf_counter() - t0

        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        for _ in range(3):  # warm-up
            window()
        for r in range(args.rounds):
            for mib in (args.low, 32) if r % 2 == 0 else (32, args.low):
                libc.mallopt(M_MMAP_THRESHOLD, mib << 20)
                window()  # settles after the switch
                times[mib] += [window() for _ in range(args.per)]
        trainer.threads.stop()
    low, high = statistics.median(times[args.low]), statistics.median(times[32])
    print(f"{hardware.describe('cpu')}, {args.threads} threads, {args.config} at bptt {cfg.train.bptt}")
    print(f"median s/window: {args.low} MiB {low:.3f} ({min(times[args.low]):.3f}-{max(times[args.low]):.3f}), "
          f"32 MiB {high:.3f} ({min(times[32]):.3f}-{max(times[32]):.3f}); ratio 32 MiB / {args.low} MiB time "
          f"{high / low:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
