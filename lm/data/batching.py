"""Batching of a token stream into (T, B) columns and BPTT windows over them.

Layout is time-major, ``(T, B)``, as in AWD-LSTM's ``batchify``: column ``b`` is one contiguous
stream of the corpus, so the hidden state of example ``b`` carries from one window to the next.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token tensor into ``batch_size`` contiguous streams.

    Args:
        data: ``(N,)`` token ids.
        batch_size: number of streams ``B``.
    Returns:
        ``(N // B, B)`` tensor; the last ``N mod B`` tokens are dropped.
    """
    steps = data.numel() // batch_size
    if steps < 2:
        raise ValueError(f"{data.numel()} tokens are too few for batch size {batch_size}")
    return data[: steps * batch_size].view(batch_size, steps).t().contiguous()


def sample_window_length(bptt: int, generator: torch.Generator | None = None, longest: int | None = None) -> int:
    """AWD-LSTM's variable BPTT: ``bptt`` w.p. 0.95 else ``bptt/2``, then N(len, 5), at least 5, and
    at most ``longest`` when given (``train.variable_bptt_max``: the same draws, the tail cut)."""
    base = bptt if torch.rand((), generator=generator).item() < 0.95 else bptt / 2
    length = max(5, int(torch.normal(float(base), 5.0, (), generator=generator).item()))
    return length if longest is None else min(length, longest)


def bptt_windows(source: torch.Tensor, bptt: int, start: int = 0, variable: bool = False,
                 generator: torch.Generator | None = None,
                 longest: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Iterate over non-overlapping windows of a batchified stream.

    Args:
        source: ``(N, B)`` from :func:`batchify`.
        bptt: window length (the nominal one when ``variable``).
        start: row to start at (for resuming inside an epoch).
        variable: draw each window length with :func:`sample_window_length` (at most ``longest``).
    Yields:
        ``(start_row, x, y)`` with ``x, y`` of shape ``(L, B)``; ``y`` is ``x`` shifted by one step.
        The last window may be shorter. The number of predicted tokens is ``y.numel()``.
    """
    i = start
    while i < source.size(0) - 1:
        length = sample_window_length(bptt, generator, longest) if variable else bptt
        length = min(length, source.size(0) - 1 - i)
        yield i, source[i: i + length], source[i + 1: i + 1 + length]
        i += length


def num_windows(source: torch.Tensor, bptt: int) -> int:
    """Number of fixed-length windows :func:`bptt_windows` yields (an estimate when variable)."""
    return math.ceil((source.size(0) - 1) / bptt)
