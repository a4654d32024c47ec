#!/usr/bin/env python
"""Bayesian / Flipout LSTMs side by side: ``lm.nn.RegularizedLSTM`` against bayesian-torch's
``LSTMFlipout`` and blitz's ``BayesianLSTM``, with ``torch.nn.LSTM`` as the reference.

The same LSTM size and batch for every layer (default: the paper's char size, App. D.1: 50 inputs,
1000 units, batch 32, 100 steps), batch-first random input (the peers take nothing else). One
training step is what each library's user runs: forward over the sequence, a loss on the outputs
plus the layer's KL (``kl()``; bayesian-torch's returned ``kl``; blitz's ``log_variational_posterior -
log_prior``) scaled by 1e-6, backward; no optimizer (the same for all). Timed interleaved with the
``nn.LSTM`` step (R, A, R, B, ..., R; ``bench/_floor.py``), median over ``--rounds``; peak memory as
``bench/throughput.py`` (tensor memory allocated during one step above the level at its start).

What each computes (the ``perturbs``, ``per`` and ``resampled`` columns):

* ``nn_lstm``: nothing perturbed;
* ``ours_wd_flipout``: DropConnect p = 0.5 on ``W_hh`` (Wen et al. 2018 Table 3), an exact mask per
  example via flipout, drawn once per sequence;
* ``ours_bbb_flipout``: Gaussian posterior on ``W_ih`` and ``W_hh`` (``perturb_ih``), one ``ΔŴ`` per
  sequence, flipout signs per example, held over the sequence;
* ``ours_bbb``: the same posterior, one sample per sequence shared by the batch (blitz's scheme);
* ``bayesian_torch``: ``LSTMFlipout`` calls ``LinearFlipout`` at every time step for ``W_ih`` and
  ``W_hh`` (and biases): a new ``ΔŴ`` and new signs every step, the KL summed over the steps;
* ``blitz``: one posterior sample of ``W_ih``, ``W_hh`` and bias per forward call, shared by the batch.

The peers are optional (``pip install --no-deps bayesian-torch blitz-bayesian-pytorch``, keeping
your torch); a missing one is reported as skipped. Usage::

    python bench/peers.py --json docs/measurements/peers/char_cpu2.json  # docs/layer.md shows the table
    python bench/peers.py --tiny                            # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._floor import interleave, torch_threads, write_json  # noqa: E402
from bench._profiler import peak_step_memory  # noqa: E402
from lm.nn import RegularizedLSTM  # noqa: E402

REFERENCE = "nn_lstm"
WHAT = {  # name: (perturbs, per, resampled)
    "nn_lstm": ("nothing", "-", "-"),
    "ours_wd_flipout": ("W_hh (DropConnect 0.5)", "example (flipout)", "per sequence"),
    "ours_bbb_flipout": ("W_ih, W_hh (Gaussian posterior)", "example (flipout)", "per sequence"),
    "ours_bbb": ("W_ih, W_hh (Gaussian posterior)", "batch (shared)", "per sequence"),
    "bayesian_torch": ("W_ih, W_hh, biases (Gaussian posterior)", "example (flipout)", "every time step"),
    "blitz": ("W_ih, W_hh, bias (Gaussian posterior)", "batch (shared)", "per sequence"),
}


class Size(NamedTuple):
    inputs: int
    hidden: int
    batch: int
    steps: int


SIZES = {"char": Size(50, 1000, 32, 100), "small": Size(50, 256, 32, 35), "tiny": Size(5, 8, 3, 4)}


def _ours(name: str, size: Size) -> tuple[nn.Module, Callable]:
    options = {"ours_wd_flipout": dict(regularizer="wd_flipout"),
               "ours_bbb_flipout": dict(regularizer="bbb_flipout", perturb_ih=True),
               "ours_bbb": dict(regularizer="bbb", perturb_ih=True)}[name]
    layer = RegularizedLSTM(size.inputs, size.hidden, batch_first=True, **options)
    bayes = "bbb" in name
    return layer, lambda x: (layer(x)[0], layer.kl() if bayes else None)


def _nn_lstm(size: Size) -> tuple[nn.Module, Callable]:
    layer = nn.LSTM(size.inputs, size.hidden, batch_first=True)
    return layer, lambda x: (layer(x)[0], None)


def _bayesian_torch(size: Size) -> tuple[nn.Module, Callable]:
    from bayesian_torch.layers import LSTMFlipout

    layer = LSTMFlipout(size.inputs, size.hidden)
    def step(x):
        out, _, kl = layer(x)
        return out, kl
    return layer, step


def _blitz(size: Size) -> tuple[nn.Module, Callable]:
    from blitz.modules import BayesianLSTM

    layer = BayesianLSTM(size.inputs, size.hidden)
    def step(x):
        out, _ = layer(x)
        return out, layer.log_variational_posterior - layer.log_prior
    return layer, step


def build(name: str, size: Size) -> tuple[nn.Module, Callable] | str:
    """``(layer, forward)`` with ``forward(x) -> (output, kl or None)``, or why it is skipped."""
    try:
        if name == REFERENCE:
            return _nn_lstm(size)
        if name.startswith("ours_"):
            return _ours(name, size)
        return _bayesian_torch(size) if name == "bayesian_torch" else _blitz(size)
    except ImportError as e:
        return f"not installed ({e.name or e})"


def train_step(layer: nn.Module, forward: Callable, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out, kl = forward(x)
        loss = out.square().mean()
        if kl is not None:
            loss = loss + 1e-6 * kl
        loss.backward()
        layer.zero_grad(set_to_none=True)
    return run


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def measure(size: Size, names: Sequence[str], rounds: int, warmup: int, log: Callable[[str], None]) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(size.batch, size.steps, size.inputs)
    built = {name: build(name, size) for name in [REFERENCE, *names]}
    steps = {n: train_step(*b, x) for n, b in built.items() if not isinstance(b, str)}
    for name, b in built.items():
        if isinstance(b, str):
            log(f"{name}: skipped, {b}")
    log(f"warm-up: {warmup} steps each of {', '.join(steps)}")
    for run in steps.values():
        for _ in range(warmup):
            run()
    log(f"timing {rounds} rounds")
    t = interleave(steps[REFERENCE], {n: s for n, s in steps.items() if n != REFERENCE}, rounds)
    load = list(os.getloadavg())
    tokens = size.batch * size.steps
    records = []
    for name, b in built.items():
        perturbs, per, resampled = WHAT[name]
        rec = {"name": name, "perturbs": perturbs, "per": per, "resampled": resampled, "size": size._asdict(),
               "threads": torch.get_num_threads(), "rounds": rounds, "loadavg": load, "machine": machine()}
        if isinstance(b, str):
            records.append({**rec, "skipped": b})
            continue
        secs = statistics.median(t.ref_all) if name == REFERENCE else statistics.median(t.own[name])
        ratio = 1.0 if name == REFERENCE else statistics.median(t.ratios(name))
        records.append({**rec, "train_tokens_per_s": tokens / secs, "step_s": secs, "speed_vs_nn_lstm": ratio,
                        "peak_mem_mb": peak_step_memory(steps[name], torch.device("cpu"))})
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| layer | tokens/s (train) | vs nn.LSTM | peak MiB | perturbs | noise per | resampled |",
             "|---|---:|---:|---:|---|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | {r['perturbs']} | {r['per']} | {r['resampled']} |")
            continue
        mem = "n/a" if math.isnan(r["peak_mem_mb"]) else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['name']} | {r['train_tokens_per_s']:,.0f} | {r['speed_vs_nn_lstm']:.2f}x | {mem} | "
                     f"{r['perturbs']} | {r['per']} | {r['resampled']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="char")
    ap.add_argument("--tiny", action="store_true", help="the tiny size, 1 round, 1 warm-up step (a smoke test)")
    ap.add_argument("--only", default=",".join(n for n in WHAT if n != REFERENCE),
                    help="comma-separated layers besides nn_lstm (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in WHAT or n == REFERENCE]
    if bad:
        print(f"error: --only {','.join(bad)} is unknown: expected names from "
              f"{', '.join(n for n in WHAT if n != REFERENCE)}", file=sys.stderr)
        return 2
    size = SIZES["tiny" if args.tiny else args.size]
    rounds, warmup = (1, 1) if args.tiny else (args.rounds, args.warmup)
    with torch_threads(args.threads):
        records = measure(size, names, rounds, warmup, lambda s: print(s, file=sys.stderr))
    print(f"{size.inputs} inputs, {size.hidden} units, batch {size.batch}, {size.steps} steps; {records[0]['machine']}, "
          f"{records[0]['threads']} threads, load average {records[0]['loadavg'][0]:.1f}")
    print(format_table(records))
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
