"""The recurrence of one LSTM layer window, forward and backward, four ways: cuDNN's ``nn.LSTM``,
the window kernel on the torch step, on the Triton step, and on the Triton step captured in a
CUDA graph (static inputs and noise, replayed). At the paper's char size (H 1000, B 32, T 100) and
one word-size layer (H 650, B 40, T 35), in fp32 and bf16; window kinds ``zoneout`` (per-step
masks) and ``wd_flipout`` (flipout of ``W_hh``, signs per window). ``scripts/gpu_check.sh``
runs it on a GPU; nothing here has been measured on one yet (docs/gpu.md).

    python bench/gpu_steps.py --json steps.json                  # on a GPU: ms per window and x cuDNN
    TRITON_INTERPRET=1 python bench/gpu_steps.py --tiny --json /tmp/s.json   # CPU, tiny, interpreter

``vs_cudnn`` is cuDNN's ms over the row's ms (1 = as fast as cuDNN). On a CPU (``--tiny``) the
"cudnn" row is oneDNN's ``nn.LSTM``, the Triton rows run under the interpreter and the graph row
runs its static buffers without capture: a check that every path runs, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lm.nn.flipout import Flip  # noqa: E402
from lm.nn.lstm_kernel import lstm_window  # noqa: E402
from lm.nn.noise import WindowDraws  # noqa: E402
from lm.nn.steps import ENV  # noqa: E402

SIZES = {"char": (1000, 32, 100), "word": (650, 40, 35)}  # (H, B, T); input size = H
TINY = {"char": (24, 4, 6), "word": (16, 4, 5)}
KINDS = ("zoneout", "wd_flipout")


def _draws(kind: str, hid: int, batch: int, steps: int, device: torch.device) -> WindowDraws:
    g = torch.Generator().manual_seed(0)
    if kind == "zoneout":
        mask = lambda: (torch.rand(steps, batch, hid, generator=g) < 0.3).float().to(device)  # noqa: E731
        return WindowDraws(zoneout_c=mask(), zoneout_h=mask())
    delta = (0.01 * torch.randn(4 * hid, hid, generator=g)).to(device)
    return WindowDraws(flip=Flip.sample(delta, batch, generator=g))


def _timed(fn: Callable[[], None], reps: int, device: torch.device, warmup: int = 2) -> float:
    """Median ms of ``reps`` calls after ``warmup`` calls (which also compile the Triton kernels)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def _window(x, state, w_hh, w_ih, bias, draws, low) -> Callable[[], torch.Tensor]:
    def run():
        with torch.autocast(x.device.type, dtype=low or torch.float32, enabled=low is not None):
            out, (_, c) = lstm_window(x, state, w_hh, draws, weight_ih=w_ih, bias=bias)
        (out.float().square().mean() + c.square().mean()).backward()
    return run


def _graphed(run: Callable[[], None], params: list[torch.Tensor], device: torch.device) -> Callable[[], None]:
    """``run`` captured once (fixed inputs and noise) and replayed; without CUDA, ``run`` itself."""
    if device.type != "cuda":
        return run
    for p in params:
        p.grad = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up on a side stream, as torch's capture recipe asks
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def measure(size: str, shape: tuple[int, int, int], precision: str, device: torch.device, reps: int) -> list[dict]:
    hid, batch, steps = shape
    low = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(0)
    lstm = nn.LSTM(hid, hid).to(device)
    x = torch.randn(steps, batch, hid, device=device, requires_grad=True)
    h0, c0 = (torch.zeros(1, batch, hid, device=device) for _ in range(2))
    params = [x, *lstm.parameters()]

    def cudnn():
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            out, (_, c) = lstm(x, (h0, c0))
        (out.float().square().mean() + c.float().square().mean()).backward()
    warmup = 1 if reps == 1 else 2  # --tiny: one of each, a check that every path runs
    base = _timed(cudnn, reps, device, warmup)
    records = [dict(size=size, precision=precision, kind="nn_lstm", step="cudnn", ms=base, vs_cudnn=1.0)]
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    bias = lstm.bias_ih_l0 + 0
    state = (h0[0], c0[0])
    for kind in KINDS:
        draws = _draws(kind, hid, batch, steps, device)
        run = _window(x, state, w_hh, w_ih, bias.detach(), draws, low)
        for step in ("torch", "triton", "triton_graph"):
            os.environ[ENV] = "torch" if step == "torch" else "triton"
            try:
                fn = _graphed(run, params, device) if step == "triton_graph" else run
                ms = _timed(fn, reps, device, warmup)
                rec = dict(ms=ms, vs_cudnn=base / ms)
            except Exception as e:  # noqa: BLE001 -- a row that cannot run is reported, the others still run
                rec = dict(ms=None, vs_cudnn=None, error=f"{type(e).__name__}: {e}"[:300])
            records.append(dict(size=size, precision=precision, kind=kind,
                                step=step if device.type == "cuda" or step != "triton_graph" else
                                "triton_graph (capture off)", **rec))
    os.environ.pop(ENV, None)
    return records


def table(records: list[dict]) -> str:
    lines = ["| size | precision | kind | step | ms per window (fwd+bwd) | x cuDNN |", "|---|---|---|---|---|---|"]
    for r in records:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else f"failed: {r['error']}"
        ratio = f"{r['vs_cudnn']:.2f}" if r["vs_cudnn"] is not None else "-"
        lines.append(f"| {r['size']} | {r['precision']} | {r['kind']} | {r['step']} | {ms} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 rep (a CPU check that every path runs)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--json", type=Path, help="write the records here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("on a CPU the Triton rows need TRITON_INTERPRET=1 (the interpreter)")
    records = []
    for size, shape in (TINY if args.tiny else SIZES).items():
        for precision in args.precision.split(","):
            if device.type == "cpu" and precision == "bf16":
                continue  # the interpreter has no bf16 arithmetic: GPU only
            records += measure(size, shape, precision, device, 1 if args.tiny else args.reps)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 1 if any(r["ms"] is None for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
