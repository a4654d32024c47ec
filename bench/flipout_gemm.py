#!/usr/bin/env python
"""Why flipout's CPU ratio depends on the hidden size: the per-step matmul against cache size.

Every step of the recurrence multiplies a ``(B, H)`` state by ``W_hhᵀ`` ``(H, 4H)``; flipout adds a
second product with ``ΔŴ`` (one ``bmm`` of both, as in :mod:`lm.lstm_kernel`). With ``B`` = 32
rows the product does 2·B = 64 flops per weight read, so its speed depends on whether the
weights stay in the last-level cache from one step to the next. ``nn.LSTM`` streams ``4H·H``
floats per step; flipout streams twice that. This script times, for a range of ``H``, the plain
per-step product (``mm``) and flipout's (``bmm`` of two), each repeated many times as in the loop,
and prints the ratio (ideal 0.50: twice the flops). Where twice the weights outgrow the cache and
once does not, the ratio drops below 0.5 and no kernel that keeps ``W_hh`` and ``ΔŴ`` in fp32 can
reach the compute bound.

    python bench/flipout_gemm.py --threads 2
    python bench/flipout_gemm.py --threads 1 --sizes 500 1000 --batch 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def last_level_cache() -> str:
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            return f"L{(index / 'level').read_text().strip()} {(index / 'size').read_text().strip()}"
        except OSError:
            continue
    return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[400, 600, 700, 800, 900, 1000, 1200], help="H values")
    p.add_argument("--batch", type=int, default=32, help="rows B (the paper's char batch: 32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per product (median reported)")
    args = p.parse_args(argv)
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        table(args)
    finally:
        torch.set_num_threads(before)
    return 0


def table(args: argparse.Namespace) -> None:
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, last-level cache {last_level_cache()}")
    print(f"{'H':>6} {'W_hh MiB':>9} {'mm ms':>8} {'flip bmm ms':>12} {'ratio':>6}  (ideal 0.50)")
    for hid in args.sizes:
        torch.manual_seed(0)
        weights = torch.randn(2, 4 * hid, hid).transpose(1, 2)  # [W_hh, ΔŴ]ᵀ as the kernel lays them out
        left = torch.randn(2, args.batch, hid)
        out = torch.empty(2, args.batch, 4 * hid)
        single = median_ms(lambda: torch.mm(left[0], weights[0], out=out[0]), args.repeats)
        flip = median_ms(lambda: torch.bmm(left, weights, out=out), args.repeats)
        mib = 4 * hid * hid * 4 / 2 ** 20
        print(f"{hid:>6} {mib:>9.1f} {single:>8.3f} {flip:>12.3f} {single / flip:>6.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
