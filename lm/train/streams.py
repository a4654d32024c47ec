"""The random streams and windows of a training run that do not live in the model (lm.nn.rng has those).

* :func:`rng_state` / :func:`set_rng_state`: one process's default generators (its per-example
  noise), saved per process in ``last.pt`` (``rng_ranks``) for an exact resume;
* :func:`epoch_lengths`: the variable BPTT window lengths of an epoch, keyed on ``(seed, epoch)``
  so that every process and a resumed run cut the epoch the same way; :func:`windows_of` turns
  them into windows.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from lm.data.batching import sample_window_length
from lm.nn.rng import keyed_generator

Window = tuple[int, torch.Tensor, torch.Tensor]
RNG = dict[str, torch.Tensor]  # {"cpu": state[, "cuda": state]} of one process


def rng_state(device: torch.device) -> RNG:
    """This process's default generator states (CPU, and the CUDA device's when training there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: RNG, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_lengths(rows: int, bptt: int, seed: int, epoch: int, longest: int | None = None) -> list[int]:
    """The variable BPTT window lengths of one epoch over ``rows`` rows (AWD's law,
    :func:`lm.data.batching.sample_window_length`), from a generator keyed on ``(seed, epoch)``:
    the same in every process and after a resume, with no state to save. The last is cut to fit;
    ``longest`` (``train.variable_bptt_max``) cuts the longer draws."""
    g = keyed_generator("bptt", seed, epoch)
    lengths, i = [], 0
    while i < rows - 1:
        n = min(sample_window_length(bptt, g, longest), rows - 1 - i)
        lengths.append(n)
        i += n
    return lengths


def windows_of(source: torch.Tensor, lengths: Sequence[int], start: int) -> Iterator[Window]:
    """The windows of ``lengths`` over ``source`` ``(N, B)`` from row 0, those ending after ``start``
    (a ``start`` inside a window, e.g. from a checkpoint of older code, begins a shortened one)."""
    i = 0
    for n in lengths:
        end = i + n
        if end > start:
            a = max(i, start)
            yield a, source[a:end], source[a + 1: end + 1]
        i = end
