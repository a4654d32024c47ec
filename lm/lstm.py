"""The one LSTM layer of the codebase, parameterised by a per-window noise plan.

The extension point for regularizers is :class:`RecurrentNoise`: once per forward call (one
BPTT window) the regularizer hands each layer the weights to use (the mean weights or a
perturbation shared by the batch), optional flipout draws for ``W_ih`` and ``W_hh``, and the
per-window / per-step masks of the recurrence. The layer then picks its kernel:

* fused: nothing per-example or per-step inside the recurrence -> PyTorch's own LSTM kernel
  (cuDNN on GPU), with the (possibly perturbed) weights passed functionally through
  :func:`torch.func.functional_call` -- the module's parameters are never replaced;
* explicit loop: the input projection of the whole window is one matmul, the loop walks the
  steps with ``unbind`` (indexing ``x[t]`` would make backward quadratic in T) and draws all
  per-step masks for the window before it starts.

Equations (paper App. D, Eqs. 19-22; PyTorch gate order i, f, g, o)::

    [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
    c_t = σ(f) ∘ c_{t-1} + σ(i) ∘ tanh(g)
    h_t = σ(o) ∘ tanh(c_t)

Layout: inputs ``(T, B, in)``, outputs ``(T, B, H)``, state ``(h, c)`` each ``(B, H)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from lm.flipout import Flip, flipout_linear

State = tuple[torch.Tensor, torch.Tensor]


@dataclass
class RecurrentNoise:
    """What a regularizer asks one LSTM layer to do for one window.

    Attributes:
        weight_ih: ``(4H, in)`` input weights to use (mean, or perturbed and shared by the batch).
        weight_hh: ``(4H, H)`` recurrent weights to use.
        flip_ih, flip_hh: per-example flipout perturbations of those maps, or None.
        hidden_mask: ``(B, H)`` scaled mask on ``h_{t-1}`` inside the recurrence, held over the window.
        cell_p: dropout probability on the cell update ``g_t``, a new mask every step.
        zoneout_c, zoneout_h: zoneout probabilities of ``c_t`` and ``h_t`` (training: a new
            Bernoulli mask every step; evaluation: the expectation).
        training: whether stochastic parts are active.
    """

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    flip_ih: Flip | None = None
    flip_hh: Flip | None = None
    hidden_mask: torch.Tensor | None = None
    cell_p: float = 0.0
    zoneout_c: float = 0.0
    zoneout_h: float = 0.0
    training: bool = False

    @property
    def fused(self) -> bool:
        """True when PyTorch's fused LSTM computes exactly this window."""
        return (self.flip_ih is None and self.flip_hh is None and self.hidden_mask is None
                and (self.cell_p == 0 or not self.training) and self.zoneout_c == 0 and self.zoneout_h == 0)


def _step_masks(p: float, like: torch.Tensor, steps: int, scale: bool) -> list[torch.Tensor] | None:
    """``steps`` Bernoulli(1-p) masks shaped like ``like`` (``(B, H)``), drawn in one call."""
    if p == 0:
        return None
    keep = torch.empty((steps, *like.shape), dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    return list((keep / (1 - p) if scale else keep).unbind(0))


class LSTMLayer(nn.Module):
    """One LSTM layer whose weights live in an ``nn.LSTM`` (names ``weight_ih_l0`` etc.).

    Args:
        input_size: features of ``x_t``.
        hidden_size: ``H``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers=1)

    @property
    def weight_ih(self) -> torch.Tensor:
        return self.rnn.weight_ih_l0

    @property
    def weight_hh(self) -> torch.Tensor:
        return self.rnn.weight_hh_l0

    def forward(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        """Run one window. ``x``: ``(T, B, in)``; ``state``: ``(h, c)`` each ``(B, H)``."""
        if noise.fused:
            return self._fused(x, state, noise)
        return self._loop(x, state, noise)

    def _fused(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        h0, c0 = state[0].unsqueeze(0), state[1].unsqueeze(0)
        if noise.weight_ih is self.weight_ih and noise.weight_hh is self.weight_hh:
            out, (h, c) = self.rnn(x, (h0, c0))
        else:
            weights = {"weight_ih_l0": noise.weight_ih, "weight_hh_l0": noise.weight_hh}
            out, (h, c) = functional_call(self.rnn, weights, (x, (h0, c0)))
        return out, (h.squeeze(0), c.squeeze(0))

    def _loop(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        steps = x.size(0)
        h, c = state
        bias = self.rnn.bias_ih_l0 + self.rnn.bias_hh_l0
        # One matmul for the whole window's input projection (flipout signs broadcast over T).
        xproj = flipout_linear(x, noise.weight_ih, noise.flip_ih, bias)
        w_hh_t = noise.weight_hh.t()
        flip = noise.flip_hh
        if flip is not None:
            delta_t = flip.delta.t()
            s_steps = flip.sign_in.unbind(0) if flip.per_step else None
            r_steps = flip.sign_out.unbind(0) if flip.per_step else None
        train = noise.training
        g_masks = _step_masks(noise.cell_p, h, steps, scale=True) if train else None
        zc_masks = _step_masks(noise.zoneout_c, h, steps, scale=False) if train else None
        zh_masks = _step_masks(noise.zoneout_h, h, steps, scale=False) if train else None
        outputs = []
        for t, xt in enumerate(xproj.unbind(0)):
            hr = h if noise.hidden_mask is None else h * noise.hidden_mask
            gates = torch.addmm(xt, hr, w_hh_t)
            if flip is not None:
                s = s_steps[t] if s_steps is not None else flip.sign_in
                r = r_steps[t] if r_steps is not None else flip.sign_out
                gates = torch.addcmul(gates, (hr * s).mm(delta_t), r)
            i, f, g, o = gates.chunk(4, 1)
            g = torch.tanh(g)
            if g_masks is not None:
                g = g * g_masks[t]
            c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            # Zoneout keeps the previous value where the mask is 1: lerp(new, old, z); eval uses z = p.
            if noise.zoneout_c:
                c_new = torch.lerp(c_new, c, zc_masks[t] if zc_masks is not None else noise.zoneout_c)
            if noise.zoneout_h:
                h_new = torch.lerp(h_new, h, zh_masks[t] if zh_masks is not None else noise.zoneout_h)
            h, c = h_new, c_new
            outputs.append(h)
        return torch.stack(outputs), (h, c)
