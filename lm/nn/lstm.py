"""The one LSTM layer of the codebase, parameterised by a per-window noise plan.

The extension point for regularizers is :class:`lm.nn.noise.RecurrentNoise`: once per forward call (one
BPTT window) the regularizer hands each layer the weights to use (the mean weights or a
perturbation shared by the batch), optional flipout draws for ``W_ih`` and ``W_hh``, and the
per-window / per-step masks of the recurrence. The layer then picks its kernel:

* fused: nothing per-example or per-step inside the recurrence -> PyTorch's own LSTM kernel
  (cuDNN on GPU, oneDNN on CPU), with the (possibly perturbed) weights passed functionally
  through :func:`torch.func.functional_call` -- the module's parameters are never replaced;
* window kernel (:func:`lstm_window`): the input projection of the whole window is one matmul
  outside the recurrence, all per-step masks are drawn before it starts, and one autograd
  Function runs the recurrence of the whole window forward and backward (see below).

Equations (paper App. D, Eqs. 19-22; PyTorch gate order i, f, g, o), with the noise hooks::

    h̃ = h_{t-1} ∘ m                                   hidden mask m (variational), per window
    [i, f, g, o] = x̂_t + h̃ W_hhᵀ + ((h̃ ∘ s) ΔŴᵀ) ∘ r    x̂_t = W_ih x_t + b (+ its flipout term)
    c̃ = σ(f) ∘ c_{t-1} + σ(i) ∘ (tanh(g) ∘ d_t)         cell mask d_t (semeniuta), per step
    h̃_t = σ(o) ∘ tanh(c̃)
    c_t = lerp(c̃, c_{t-1}, z^c_t),  h_t = lerp(h̃_t, h_{t-1}, z^h_t)   zoneout (1 = keep old)

Layout: inputs ``(T, B, in)``, outputs ``(T, B, H)``, state ``(h, c)`` each ``(B, H)``.

The window kernel lives in :mod:`lm.nn.lstm_kernel` (why it has a hand-written backward is
explained there). :func:`reference_loop` is the plain autograd loop it is tested against (tests/test_lstm_kernel.py);
bench/throughput.py measures it against nn.LSTM (docs/performance_throughput.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call

from lm.nn.flipout import flipout_linear
from lm.nn.lstm_kernel import lstm_window
from lm.nn.noise import RecurrentNoise, State, WindowDraws, draw_window
from lm.nn.precision import fused_in_float32

WINDOW_PROJECTS = True
"""True (default): the window kernel computes the input projection itself (into a reused buffer,
see :func:`lm.nn.lstm_kernel.lstm_window`) wherever ``W_ih`` has no flipout; False: ``F.linear``
outside it, as before 2026-11-30 (for the A/B benchmarks: ``bench/fused_step.py``,
``bench/profile_step.py --compare``). The same numbers up to float rounding either way."""


def reference_loop(xproj: torch.Tensor, state: State, weight_hh: torch.Tensor,
                   draws: WindowDraws) -> tuple[torch.Tensor, State]:
    """The recurrence written step by step and differentiated by autograd (the specification).

    Args:
        xproj: ``(T, B, 4H)`` input projection ``W_ih x_t + b_ih + b_hh`` (plus its flipout term).
        state: ``(h, c)`` each ``(B, H)``.
        weight_hh: ``(4H, H)``.
        draws: the window's noise.
    Returns:
        outputs ``(T, B, H)`` and the final ``(h, c)``.
    """
    h, c = state
    w_hh_t = weight_hh.t()
    draws = draws.dense(h.dtype)  # byte masks as values
    flip = draws.flip
    outputs = []
    for t, xt in enumerate(xproj.unbind(0)):
        hr = h if draws.hidden_mask is None else h * draws.hidden_mask
        gates = torch.addmm(xt, hr, w_hh_t)
        if flip is not None:
            s = flip.sign_in[t] if flip.per_step else flip.sign_in
            r = flip.sign_out[t] if flip.per_step else flip.sign_out
            gates = torch.addcmul(gates, (hr * s).mm(flip.delta.t()), r)
        i, f, g, o = gates.chunk(4, 1)
        g = torch.tanh(g)
        if draws.cell_mask is not None:
            g = g * draws.cell_mask[t]
        c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        # Zoneout keeps the previous value where the mask is 1: lerp(new, old, z); eval uses z = p.
        zc, zh = draws.zoneout_c, draws.zoneout_h
        if zc is not None:
            c_new = torch.lerp(c_new, c, zc[t] if isinstance(zc, torch.Tensor) else zc)
        if zh is not None:
            h_new = torch.lerp(h_new, h, zh[t] if isinstance(zh, torch.Tensor) else zh)
        h, c = h_new, c_new
        outputs.append(h)
    return torch.stack(outputs), (h, c)


class LSTMLayer(nn.Module):
    """One LSTM layer whose weights live in an ``nn.LSTM`` (names ``weight_ih_l0`` etc.).

    Args:
        input_size: features of ``x_t``.
        hidden_size: ``H``.
        bias: with ``b_ih``, ``b_hh`` (as ``nn.LSTM``'s ``bias``).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers=1, bias=bias)

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
        # oneDNN's CPU LSTM has no float16 kernel anywhere and no bfloat16 one without bf16 units
        # ("could not create a primitive descriptor"): there the fused layer runs in float32
        fp32 = fused_in_float32(x.device)
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            x = x.to(state[0].dtype) if fp32 else x
            if noise.weight_ih is self.weight_ih and noise.weight_hh is self.weight_hh:
                out, (h, c) = self.rnn(x, (h0, c0))
            else:
                weights = {"weight_ih_l0": noise.weight_ih, "weight_hh_l0": noise.weight_hh}
                out, (h, c) = functional_call(self.rnn, weights, (x, (h0, c0)))
        # under autocast cuDNN/oneDNN hand the state back in the low dtype: the carried state stays float32
        return out, (h.squeeze(0).to(state[0].dtype), c.squeeze(0).to(state[1].dtype))

    def _loop(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        bias = self.rnn.bias_ih_l0 + self.rnn.bias_hh_l0 if self.rnn.bias else None
        if noise.flip_ih is None and WINDOW_PROJECTS:  # the window kernel projects the window's input itself
            draws = draw_window(noise, state[0], x.size(0))
            return lstm_window(x, state, noise.weight_hh, draws, weight_ih=noise.weight_ih, bias=bias)
        # One matmul for the whole window's input projection (flipout signs broadcast over T).
        xproj = flipout_linear(x, noise.weight_ih, noise.flip_ih, bias)
        draws = draw_window(noise, state[0], x.size(0))
        return lstm_window(xproj, state, noise.weight_hh, draws)
