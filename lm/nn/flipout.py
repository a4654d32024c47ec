"""Flipout (Wen et al. 2018, Sec. 3.1, Eq. 4) for any dense map.

A layer with mean weights ``W̄`` and a base perturbation ``ΔŴ`` shared by the minibatch gives
example ``n`` the weights ``W̄ + ΔŴ ∘ (r_n s_nᵀ)`` with ``r_n, s_n`` uniform ±1 vectors.
Vectorised (PyTorch weight layout ``(out, in)``)::

    Y = X W̄ᵀ + ((X ∘ S) ΔŴᵀ) ∘ R

This is unbiased and decorrelates the examples' gradients only if the entries of ``ΔŴ`` are
independent and symmetric about zero (Sec. 3.1), which is why DropConnect must use p = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.nn.fastrand import two_valued
from lm.nn.tape import drawn, like as _like


def sample_signs(shape: tuple[int, ...], like: torch.Tensor, generator=None) -> torch.Tensor:
    """Uniform ±1 entries of ``shape`` with ``like``'s dtype and device (through the noise tape).

    ``generator``: a ``torch.Generator``, None (the default stream), or a function returning either
    (keyed signs, :func:`lm.nn.rng.sign_generator`). A function is called inside the draw's recipe,
    so a CUDA graph's tape, which re-runs the recipe before every replay, reseeds it for each step."""
    meta = _like(like)
    return drawn(lambda: two_valued(shape, meta, 0.5, 1.0, -1.0, generator() if callable(generator) else generator),
                 shape)


@dataclass
class Flip:
    """One draw of a flipout perturbation of a dense map ``(out, in)``.

    Attributes:
        delta: ``ΔŴ``, ``(out, in)``, shared by the batch.
        sign_in: ``S``, ``(B, in)``, or ``(T, B, in)`` when signs are redrawn every step.
        sign_out: ``R``, ``(B, out)``, or ``(T, B, out)``.
    """

    delta: torch.Tensor
    sign_in: torch.Tensor
    sign_out: torch.Tensor

    @classmethod
    def sample(cls, delta: torch.Tensor, batch: int, steps: int | None = None, generator=None) -> "Flip":
        """Draw sign vectors for ``batch`` examples, once (``steps=None``) or for each of ``steps`` steps."""
        lead = (batch,) if steps is None else (steps, batch)
        out_f, in_f = delta.shape
        return cls(delta, sample_signs((*lead, in_f), delta, generator), sample_signs((*lead, out_f), delta, generator))

    @property
    def per_step(self) -> bool:
        return self.sign_in.dim() == 3

    def example_weight(self, weight: torch.Tensor, n: int, t: int = 0) -> torch.Tensor:
        """Explicit weights ``W̄ + ΔŴ ∘ (r_n s_nᵀ)`` of example ``n`` (at step ``t`` if per step); for tests."""
        s = self.sign_in[t, n] if self.per_step else self.sign_in[n]
        r = self.sign_out[t, n] if self.per_step else self.sign_out[n]
        return weight + self.delta * torch.outer(r, s)


def flipout_linear(x: torch.Tensor, weight: torch.Tensor, flip: Flip | None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W̄ᵀ + b + ((x ∘ S) ΔŴᵀ) ∘ R`` (Eq. 4); a plain linear map when ``flip`` is None.

    Args:
        x: ``(..., B, in)``; signs of shape ``(B, in)`` broadcast over leading dims (e.g. time),
            per-step signs ``(T, B, in)`` need ``x`` of shape ``(T, B, in)``.
        weight: ``W̄``, ``(out, in)``.
        flip: the perturbation draw, or None.
        bias: optional ``(out,)``.
    Returns:
        ``(..., B, out)``.
    """
    y = F.linear(x, weight, bias)
    if flip is None:
        return y
    return torch.addcmul(y, F.linear(x * flip.sign_in, flip.delta), flip.sign_out)
