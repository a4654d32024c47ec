"""The noise plan of one window: what a regularizer hands an LSTM layer, and its drawn tensors.

:class:`RecurrentNoise` is the extension point for regularizers (built once per forward call,
i.e. per BPTT window); :func:`draw_window` turns it into the :class:`WindowDraws` that both the
window kernel (:mod:`lm.nn.lstm_kernel`) and the reference loop (:mod:`lm.nn.lstm`) consume.
Kept apart from the layer so that the kernel and the layer both import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm.nn.fastrand import bernoulli_bytes, two_valued
from lm.nn.flipout import Flip
from lm.nn.tape import drawn, like as _like

State = tuple[torch.Tensor, torch.Tensor]
Zone = torch.Tensor | float | None  # zoneout: (T, B, H) keep-old masks, a probability (eval), or off

BYTE_MASKS: bool = True
"""Draw the step masks as ``uint8`` bytes (default); False: as float32 values, the cell mask scaled
(the same draws; ``bench/flag_ab.py --switch byte_masks`` times the two)."""


def dense(mask: Zone, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Zone:
    """A step mask as values: a ``uint8`` 0/1 mask times ``scale`` in ``dtype``; a float mask, a
    probability or None as it is."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8:
        values = mask.to(dtype)
        return values.mul_(scale) if scale != 1.0 else values
    return mask


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


@dataclass
class WindowDraws:
    """The noise of one window's recurrence, drawn before the first step.

    The step masks (``cell_mask``, ``zoneout_c``, ``zoneout_h``) are drawn as exact ``uint8`` 0/1
    bytes, a quarter of float32's memory and traffic; the C step reads them so and applies the cell
    mask's scale as it reads it, and every other reader takes :meth:`dense` values. Float masks
    (with ``cell_scale`` 1) are accepted everywhere too.

    Attributes:
        hidden_mask: ``(B, H)`` scaled mask on ``h_{t-1}`` (before both matmuls), or None.
        flip: flipout draw of ``W_hh`` (signs ``(B, ·)`` per window or ``(T, B, ·)`` per step), or None.
        cell_mask: ``(T, B, H)`` masks on ``tanh(g_t)``: bytes (times ``cell_scale``) or scaled
            floats, or None.
        zoneout_c, zoneout_h: ``(T, B, H)`` Bernoulli masks (1 keeps the previous value), a
            probability used as the expectation (evaluation), or None.
        cell_scale: the value of a kept unit of a byte ``cell_mask`` (``1 / (1 - p)``).
    """

    hidden_mask: torch.Tensor | None = None
    flip: Flip | None = None
    cell_mask: torch.Tensor | None = None
    zoneout_c: Zone = None
    zoneout_h: Zone = None
    cell_scale: float = 1.0

    def dense(self, dtype: torch.dtype = torch.float32) -> "WindowDraws":
        """These draws with the byte masks as ``dtype`` values (the cell mask scaled): what torch
        ops read (the reference loop, the torch and Triton steps)."""
        return WindowDraws(self.hidden_mask, self.flip, dense(self.cell_mask, self.cell_scale, dtype),
                           dense(self.zoneout_c, 1.0, dtype), dense(self.zoneout_h, 1.0, dtype))


def _step_masks(p: float, like: torch.Tensor, steps: int, scale: float = 1.0) -> torch.Tensor | None:
    """``steps`` Bernoulli(1-p) masks shaped like ``like`` (``(B, H)``), drawn in one call: ``(T, B, H)``
    0/1 bytes, or with ``BYTE_MASKS`` off float values 0 and ``scale``."""
    if p == 0:
        return None
    # u < 1-p is Bernoulli(1-p); on a CPU drawn by Philox, 8x faster than torch.rand (lm.nn.fastrand)
    shape, meta = (steps, *like.shape), _like(like)
    if not BYTE_MASKS:
        return drawn(lambda: two_valued(shape, meta, 1 - p, scale, 0.0), shape)
    return drawn(lambda: bernoulli_bytes(shape, meta, 1 - p), shape)


def draw_window(noise: RecurrentNoise, like: torch.Tensor, steps: int) -> WindowDraws:
    """Turn a plan into the tensors of one window (``like``: ``(B, H)``, for shape, dtype, device)."""
    if not noise.training:  # no masks; zoneout uses its expectation
        return WindowDraws(noise.hidden_mask, noise.flip_hh, None, noise.zoneout_c or None, noise.zoneout_h or None)
    scale = 1 / (1 - noise.cell_p)
    cell = _step_masks(noise.cell_p, like, steps, scale)
    # Zoneout masks are 1 (keep the previous value) with probability p, i.e. Bernoulli(1 - (1 - p)).
    zc = _step_masks(1 - noise.zoneout_c, like, steps) if noise.zoneout_c else None
    zh = _step_masks(1 - noise.zoneout_h, like, steps) if noise.zoneout_h else None
    return WindowDraws(noise.hidden_mask, noise.flip_hh, cell, zc, zh, scale if BYTE_MASKS else 1.0)
