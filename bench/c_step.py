#!/usr/bin/env python
"""The fused C step of one training window alone: its element-wise work without the matmuls.

``lm.nn.lstm_fused.window_forward`` and ``window_backward`` run as in training, with every
per-step product (``h̃ W_hhᵀ``, ``dgates W_hh`` and the ``ΔŴ`` ones) replaced by a fixed buffer of
the product's shape and dtype. What is left is the C calls, the Python step loops and the
window's buffers: the part of a window that issue 19's matmul floor charges to the kernel.
One layer of the paper's size (``bench/_models.py``); the masks are zoneout's (plain) or the
flipout signs (flipout), the input projection arrives with its bias as in the model.

The figures are a lower bound for the step inside training: there each product streams the
whole ``W_hh`` through the caches between two C calls, so the C step finds its operands evicted
(docs/performance_fused.md compares the two).

    python bench/c_step.py --threads 2                      # char and word, fp32 and bf16
    python bench/c_step.py --sizes char --precision bf16 --rounds 15
    python bench/c_step.py --tiny                            # seconds (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._floor import torch_threads, write_json  # noqa: E402
from bench._models import SIZES, TINY  # noqa: E402
from lm.nn import lstm_fused  # noqa: E402
from lm.nn.precision import LOW_DTYPES  # noqa: E402

KINDS = ("plain", "flipout")


def _inputs(steps: int, batch: int, hid: int, kind: str, low: torch.dtype | None) -> dict:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    flip = kind == "flipout"
    return dict(
        xproj=rnd(steps, batch, 4 * hid).to(low or torch.float32), h0=rnd(batch, hid), c0=rnd(batch, hid),
        w=rnd(4 * hid, hid) / hid ** 0.5, delta=rnd(4 * hid, hid) / hid ** 0.5 if flip else None,
        s=rnd(batch, hid).sign() if flip else None, r=rnd(batch, 4 * hid).sign() if flip else None,
        zc=None if flip else (torch.rand(steps, batch, hid, generator=g) < 0.5).float(),
        zh=None if flip else (torch.rand(steps, batch, hid, generator=g) < 0.05).float(),
        bias=rnd(4 * hid), d_out=rnd(steps, batch, hid), d_h=rnd(batch, hid), d_c=rnd(batch, hid))


def measure(steps: int, batch: int, hid: int, kind: str, precision: str, rounds: int) -> dict:
    """Median ms of the C step's forward and backward of one window over ``rounds`` windows."""
    low = LOW_DTYPES.get(precision)
    a = _inputs(steps, batch, hid, kind, low)
    flip, ldt = kind == "flipout", low or torch.float32
    fixed = {False: torch.randn(batch, 4 * hid).to(ldt) * 0.1, True: torch.randn(batch, hid).to(ldt) * 0.1}
    real = lstm_fused.products
    lstm_fused.products = lambda w, delta, low, batch, backward=False: [lambda x: fixed[backward]] * (2 if flip else 1)
    fwd, bwd = [], []
    try:
        for _ in range(rounds + 1):  # the first window fills the pool: not timed
            start = time.perf_counter()
            _, _, fac, aux, left, _ = lstm_fused.window_forward(
                a["xproj"], a["h0"], a["c0"], a["w"], a["delta"], a["s"], a["r"], None, None, a["zc"], a["zh"], low,
                True, a["bias"])
            mid = time.perf_counter()
            got = lstm_fused.window_backward(
                a["d_out"], a["d_h"], a["d_c"], fac, aux, a["w"], a["delta"], a["s"], a["r"], None, a["zc"], a["zh"],
                low, keep=low is None, signed=flip, bias=True)
            fwd.append(mid - start)
            bwd.append(time.perf_counter() - mid)
            lstm_fused.release(aux, left, got.dgates_low, fac, got.signed)
    finally:
        lstm_fused.products = real
    ms = lambda xs: statistics.median(xs[1:]) * 1e3  # noqa: E731
    return {"kind": kind, "precision": precision, "forward_ms": ms(fwd), "backward_ms": ms(bwd)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="char,word", help="comma-separated subset of: char, word")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=int, default=9, help="windows timed (default 9; the median is printed)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--tiny", action="store_true", help="bench/throughput.py's tiny sizes and 2 rounds (tests)")
    p.add_argument("--json", type=Path, help="also write the records to this JSON file")
    args = p.parse_args(argv)
    args.sizes, args.precisions = args.sizes.split(","), args.precision.split(",")
    bad = [s for s in args.sizes if s not in SIZES] + [x for x in args.precisions if x not in ("fp32", "bf16")]
    if bad:
        p.error(f"unknown size or precision: {', '.join(bad)}; sizes: char, word; precisions: fp32, bf16")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if lstm_fused.library() is None:
        print("error: the fused C step is not built here (no C compiler?): nothing to time", file=sys.stderr)
        return 2
    table = TINY if args.tiny else SIZES
    rounds = 2 if args.tiny else args.rounds
    records = []
    with torch_threads(args.threads):
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} windows each")
        print("| size | precision | kind | forward ms | backward ms |\n|---|---|---|---|---|")
        for name in args.sizes:
            size = table[name]
            for precision in args.precisions:
                if precision == "bf16" and not lstm_fused.usable(torch.zeros(4, 1), torch.bfloat16):
                    print(f"| {name} | bf16 | - | (no oneDNN bf16 here) | |")
                    continue
                for kind in KINDS:
                    rec = {"size": name, **measure(size.bptt, size.batch, size.model.hidden_size, kind, precision,
                                                   rounds)}
                    records.append(rec)
                    print(f"| {name} | {precision} | {kind} | {rec['forward_ms']:.2f} | {rec['backward_ms']:.2f} |")
    lstm_fused.clear_pool()
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
