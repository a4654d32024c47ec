"""CUDA-graph windows: each training window's forward and backward captured once per BPTT
length and replayed, so that a step costs one graph launch instead of thousands of kernel launches.

With ``train.cuda_graphs: true`` :class:`WindowGraphs` runs the trainer's forward-and-backward
(``Trainer.forward_backward``):

* **lengths**: a fixed BPTT captures its one length (an epoch's shorter last window runs
  eagerly); variable BPTT captures the ``train.cuda_graph_lengths`` most likely lengths of
  AWD-LSTM's draw (:func:`likely_lengths`), the rest run eagerly. Each graph keeps its own
  memory (about one eager step's activations).
* **first window of a length**: eager, with the noise tape recording (:mod:`lm.nn.tape`); its
  inputs, carried state and noise become the graph's static buffers. **Second**: captured.
  **Every run**: the noise is redrawn outside the graph into the static buffers, in the eager
  order (:meth:`lm.nn.tape.Tape.refill`), the window and its state are copied in, the graph is
  replayed, and the parameters' ``.grad`` point at the graph's gradients.
* **the optimizer step** stays outside the graph: ``guarded_update`` checks the loss and the
  gradient norm on the host before the weights change (lm/train/step.py); not measured inside.
* **fallback**: eager for everything when a capture is impossible -- not CUDA, fp16 loss
  scaling, AR/TAR (its statistics are read per step), ``bbb``'s KL weight (changes per step),
  several processes (DDP's hooks) -- or for a length whose capture failed; the reason is in the
  start-up summary (:meth:`WindowGraphs.describe`).

``CAPTURE = False`` runs all of this without capturing (the "graph" is the forward called on the
static buffers): how tests/test_graphs.py checks buffers, lengths and fallbacks on a CPU.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch

from lm.nn.tape import Tape
from lm.train.report import log

CAPTURE: bool | None = None
"""None (default): capture on CUDA; False: the static-buffer path without capture, on any device."""

Step = Callable[[torch.Tensor, torch.Tensor, list], tuple[torch.Tensor, list]]


def likely_lengths(bptt: int, variable: bool, count: int, longest: int | None = None) -> list[int]:
    """The window lengths to capture: ``[bptt]``, or with ``variable`` the ``count`` most likely of
    :func:`lm.data.batching.sample_window_length` (``bptt`` w.p. 0.95 else ``bptt/2``, then
    ``max(5, int(N(base, 5)))``, at most ``longest``, which takes the tail's mass), most likely first."""
    if not variable:
        return [bptt]

    def cdf(x: float, mu: float) -> float:
        return 0.5 * (1 + math.erf((x - mu) / (5 * math.sqrt(2))))

    def p(length: int) -> float:
        total = 0.0
        for base, w in ((bptt, 0.95), (bptt / 2, 0.05)):
            if length == 5:  # everything below 6 (int() truncates towards zero) is clamped to 5
                total += w * cdf(6, base)
            elif length == longest:  # everything from longest on is cut to it
                total += w * (1 - cdf(length, base))
            else:
                total += w * (cdf(length + 1, base) - cdf(length, base))
        return total

    candidates = range(5, int(bptt + 40) if longest is None else longest + 1)
    return sorted(candidates, key=lambda n: (-p(n), n))[:count]


def _clone(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else type(x)(_clone(v) for v in x)


def _copy(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            _copy(d, s)


class _Graph:
    """One captured length: its tape, static inputs and outputs, the graph, and the gradients."""

    def __init__(self, tape: Tape, x: torch.Tensor, y: torch.Tensor, state: list) -> None:
        self.tape, self.x, self.y, self.state = tape, _clone(x), _clone(y), _clone(state)
        self.graph = None
        self.captured = False
        self.out = None  # (loss, state) of the capture: the buffers every replay writes
        self.grads: list[torch.Tensor | None] = []


class WindowGraphs:
    """Forward-and-backward of a training window, graphed per length or eager (module docstring).

    Args:
        step: ``(x, y, state) -> (loss, state)``: one window's forward, loss and backward, fresh
            gradients in the parameters' ``.grad``; the loss detached.
        params: the parameters whose gradients the graphs hold.
        lengths: the window lengths to capture.
        reason: why graphs are off (None: on).
        capture: capture for real (CUDA); False: run the static buffers eagerly (tests).
    """

    def __init__(self, step: Step, params: list[torch.nn.Parameter], lengths: list[int], reason: str | None = None,
                 capture: bool = True) -> None:
        self.step, self.params, self.lengths = step, params, list(lengths)
        self.reason, self.capture = reason, capture
        self.graphs: dict[int, _Graph] = {}
        self.failed: dict[int, str] = {}
        self.counts: Counter = Counter()  # "eager", "recorded", "captured", "replayed"

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        """The start-up summary's line."""
        if not self.enabled:
            return f"  graphs      off: {self.reason}"
        how = "captured" if self.capture else "static buffers, capture switched off"
        return f"  graphs      CUDA graphs per window length {self.lengths} ({how}); other lengths eager"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        length = x.size(0)
        if not self.enabled or length not in self.lengths or length in self.failed:
            self.counts["eager"] += 1
            return self.step(x, y, state)
        g = self.graphs.get(length)
        if g is None:  # the first window of this length: eager, recording its draws
            tape = Tape()
            with tape.active("record"):
                out = self.step(x, y, state)
            self.graphs[length] = _Graph(tape, x, y, state)
            self.counts["recorded"] += 1
            return out
        if not g.captured:
            try:
                self._capture(g)
            except Exception as e:  # noqa: BLE001 -- any capture failure means: this length runs eagerly
                self.failed[length] = f"{type(e).__name__}: {e}"
                log(f"graphs: windows of length {length} run eagerly: capture failed ({self.failed[length]})")
                del self.graphs[length]
                self.counts["eager"] += 1
                return self.step(x, y, state)
        return self._replay(g, x, y, state)

    def _capture(self, g: _Graph) -> None:
        if not self.capture:
            g.captured = True
            return
        for p in self.params:  # backward allocates fresh gradients inside the graph's pool
            p.grad = None
        g.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with g.tape.active("replay"), torch.cuda.graph(g.graph):
            g.out = self.step(g.x, g.y, g.state)
        g.grads = [p.grad for p in self.params]
        g.captured = True
        self.counts["captured"] += 1

    def _replay(self, g: _Graph, x: torch.Tensor, y: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        g.tape.refill()  # this step's noise, drawn outside the graph in the eager order
        _copy(g.x, x)
        _copy(g.y, y)
        _copy(g.state, state)
        self.counts["replayed"] += 1
        if not self.capture:
            with g.tape.active("replay"):
                return self.step(g.x, g.y, g.state)
        g.graph.replay()
        for p, grad in zip(self.params, g.grads):
            p.grad = grad
        loss, new_state = g.out
        return loss, _clone(new_state)  # the next replay overwrites the graph's outputs


def for_run(cfg, device: torch.device, act_reg: bool, world: int, step: Step, params: list) -> WindowGraphs:
    """The trainer's :class:`WindowGraphs` for config ``cfg`` (off unless ``train.cuda_graphs``)."""
    t = cfg.train
    reason = "train.cuda_graphs is false" if not t.cuda_graphs else why_not(
        device, t.precision, act_reg, cfg.regularizer.name, world, CAPTURE)
    return WindowGraphs(step, params, likely_lengths(t.bptt, t.variable_bptt, t.cuda_graph_lengths, t.variable_bptt_max), reason,
                        capture=CAPTURE is not False)


def why_not(device: torch.device, precision: str, act_reg: bool, regularizer: str, world: int,
            capture: bool | None) -> str | None:
    """Why windows cannot be captured in this run (None: they can)."""
    if capture is False:
        return None
    if device.type != "cuda":
        return f"capture needs a CUDA device (this run: {device.type})"
    if precision == "fp16":
        return "fp16 loss scaling (the scaler's skipped steps and scale updates happen on the host)"
    if act_reg:
        return "AR/TAR is on (its statistics are read every step)"
    if regularizer in ("bbb", "bbb_flipout"):
        return f"{regularizer}'s KL weight changes every step"
    if world > 1:
        return "several processes (DDP's all-reduce hooks are not captured)"
    return None
