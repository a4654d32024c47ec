"""The noise tape: every random draw of a training forward, replayable into static buffers.

A CUDA graph (:mod:`lm.train.graphs`) replays fixed kernels on fixed buffers, so the training
noise cannot be drawn inside it: the keyed shared draws reseed a generator per draw
(:mod:`lm.nn.rng`), and a draw baked into a graph would repeat every step. So every draw of the
forward goes through :func:`drawn` (embedding dropout, dropout masks, variational and cell masks,
zoneout masks, weight perturbations, flipout signs), which does one of three things:

* no tape (the default, evaluation, eager training): draws, as before;
* a tape recording (the first, eager, window of a captured length): draws and keeps the draw
  (its recipe) and the result, which becomes the draw's static buffer;
* a tape replaying (during capture, and every run of a captured window): hands back the next
  static buffer and draws nothing; before each run :meth:`Tape.refill` redraws every recipe, in
  the recorded order, into its buffer, outside the graph.

The recipes draw from the same generators in the same order as the forward would, so a run with
graphs consumes its random streams exactly as an eager run does (tests/test_graphs.py trains
both ways and compares every weight).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

Draw = Callable[[], torch.Tensor]


class TapeMismatch(RuntimeError):
    """A replayed forward asked for a draw the recording does not have (another shape or count)."""


class Tape:
    """The draws of one window, in order: ``(recipe, buffer)``."""

    def __init__(self) -> None:
        self.entries: list[tuple[Draw, torch.Tensor]] = []
        self.mode: str | None = None
        self.cursor = 0

    def take(self, make: Draw, shape: torch.Size | None = None) -> torch.Tensor:
        if self.mode == "record":
            out = make()
            self.entries.append((make, out))
            return out
        if self.cursor >= len(self.entries):
            raise TapeMismatch(f"the forward drew more than the {len(self.entries)} recorded draws")
        buf = self.entries[self.cursor][1]
        if shape is not None and tuple(shape) != tuple(buf.shape):
            raise TapeMismatch(f"draw {self.cursor}: shape {tuple(shape)}, recorded {tuple(buf.shape)}")
        self.cursor += 1
        return buf

    def refill(self) -> None:
        """Redraw every recorded draw into its buffer, in the recorded order (outside a graph)."""
        with torch.no_grad():
            for make, buf in self.entries:
                buf.copy_(make())

    @contextlib.contextmanager
    def active(self, mode: str) -> Iterator["Tape"]:
        """Make this tape the current one, ``mode`` ``"record"`` or ``"replay"``."""
        global _current
        if mode not in ("record", "replay"):
            raise ValueError(mode)
        outer, _current = _current, self
        self.mode, self.cursor = mode, 0
        try:
            yield self
        finally:
            _current = outer
        if mode == "replay" and self.cursor != len(self.entries):
            raise TapeMismatch(f"the forward drew {self.cursor} of the {len(self.entries)} recorded draws")


_current: Tape | None = None


def drawn(make: Draw, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """``make()``, or under a tape its recorded/static buffer (``shape``: checked on replay).

    ``make`` must draw everything itself, the generator included (``shared_generator`` inside
    the lambda: it counts the step's shared draws), and must not hold on to activations."""
    if _current is None:
        return make()
    return _current.take(make, shape)


def like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with ``x``'s dtype and device: what a recipe keeps instead of ``x``."""
    return x.new_empty(0)
