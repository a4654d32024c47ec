#!/usr/bin/env python
"""Why flipout's CPU ratio depends on the hidden size: the per-step matmul against cache size.

Every step of the recurrence multiplies a ``(B, H)`` state by ``W_hhᵀ`` ``(H, 4H)``; flipout adds a
second product with ``ΔŴ`` (one ``bmm`` of both, as in :mod:`lm.nn.lstm_kernel`). With ``B`` = 32
rows the product does 2·B = 64 flops per weight read, so its speed depends on whether the
weights stay in the last-level cache from one step to the next. ``nn.LSTM`` streams ``4H·H``
floats per step; flipout streams twice that. This script times, for a range of ``H``, the plain
per-step product (``mm``) and flipout's (``bmm`` of two), each repeated many times as in the loop,
and prints the ratio (ideal 0.50: twice the flops). Where twice the weights outgrow the cache and
once does not, the ratio drops below 0.5 and no kernel that keeps ``W_hh`` and ``ΔŴ`` in fp32 can
reach the compute bound.

With ``--window``, it instead measures the *matmul floor of a whole training window* at one
size, for each backend of :mod:`lm.nn.lstm_matmul` (``bmm``; ``packed`` where oneDNN works): the
per-step matmuls exactly as the window kernel issues them (``GateMatmul`` forward,
``HiddenGrad`` backward, T of each, weight reorders included) plus the input projection and the
window-wide weight-gradient matmuls, with no other work, against ``nn.LSTM``'s forward +
backward of the same layer (oneDNN on CPU). The ratio ``nn.LSTM / matmuls only`` is the best
training ratio a window kernel built on these matmuls can reach: element-wise work, mask draws
and Python only lower it. Timings are interleaved (R, plain, R, flipout, R, ..., the order
rotating per round) and the median of the per-round ratios is printed: the *layer floor*. The
code is :mod:`bench._floor`, which ``bench/throughput.py`` also uses: its ``layer_floor`` is this
ratio for a model's layers, its ``matmul_floor`` adds the rest of a training step (loss, decoder,
optimizer...) to both sides.

    python bench/flipout_gemm.py --threads 2
    python bench/flipout_gemm.py --threads 1 --sizes 500 1000 --batch 32
    python bench/flipout_gemm.py --threads 2 --window --sizes 1000 --batch 32 --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _floor  # noqa: E402
from lm.nn import lstm_matmul  # noqa: E402


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
    p.add_argument("--repeats", type=int, default=30, help="timed calls per product (median reported); "
                   "with --window: rounds")
    p.add_argument("--window", action="store_true", help="matmul floor of a training window against nn.LSTM")
    p.add_argument("--steps", type=int, default=100, help="window length T for --window (char: 100)")
    p.add_argument("--input", type=int, default=50, help="input size for --window's nn.LSTM (char: 50)")
    args = p.parse_args(argv)
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        window_table(args) if args.window else table(args)
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


def window_table(args: argparse.Namespace) -> None:
    """One row per size and backend: the medians of the timings (ms) and of the rounds' floors."""
    backends = ["bmm"] + (["packed"] if lstm_matmul.onednn_linear_available() else [])
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, window {args.steps}, "
          f"last-level cache {last_level_cache()}, {args.repeats} rounds")
    print(f"{'H':>6} {'backend':>8} {'nn.LSTM ms':>11} {'plain ms':>9} {'flipout ms':>11} {'plain floor':>12} "
          f"{'flipout floor':>14}")
    for hid in args.sizes:
        torch.manual_seed(0)
        reference = _floor.lstm_reference(args.input, hid, 1, args.batch, args.steps)
        runs = {f"{kind} {b}": _floor.window_matmuls(hid, args.input, args.batch, args.steps, kind == "flipout",
                                                    packed=b == "packed")
                for b in backends for kind in ("plain", "flipout")}
        for fn in (reference, *runs.values()):  # warm-up
            fn()
        t = _floor.interleave(reference, runs, args.repeats)
        ms = lambda key: statistics.median(t.own[key]) * 1e3  # noqa: E731
        floor = lambda key: statistics.median(t.ratios(key))  # noqa: E731
        for b in backends:
            print(f"{hid:>6} {b:>8} {statistics.median(t.ref_all) * 1e3:>11.1f} {ms(f'plain {b}'):>9.1f} "
                  f"{ms(f'flipout {b}'):>11.1f} {floor(f'plain {b}'):>12.2f} {floor(f'flipout {b}'):>14.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
