"""Weight perturbations of W_hh (and optionally W_ih): shared by the batch, or flipped per example.

All four regularizers write the perturbed weight as ``W = W̄ + ΔŴ`` with a base perturbation
``ΔŴ`` drawn once per forward call (one BPTT window) and shared by the batch (paper Sec. 2.1):

* ``weight_drop``   DropConnect (Merity et al. 2017): ``ΔŴ = W ∘ (M/(1-p) - 1)``, ``M ~ Bern(1-p)``,
  i.e. ``W̄ + ΔŴ = W ∘ M/(1-p)`` -- AWD-LSTM's WeightDrop, one mask per window for all examples.
* ``wd_flipout``    the same at p = 0.5, ``W ∘ 2M = W + W ∘ (2M-1)``: mean W, ``ΔŴ = ±W``, with
  flipout signs, so example n uses ``W + ΔŴ ∘ r_n s_nᵀ``, entries in {0, 2W}: its own exact
  DropConnect mask (paper Sec. 4.2 "WD+Flipout", App. D.1, App. E.4).
* ``gauss``         multiplicative Gaussian ``W ∘ (1 + σ ε)``, ``ΔŴ = σ W ∘ ε`` shared by the batch
  (Table 2 "Mult. Gauss (σ = 1)").
* ``gauss_flipout`` the same with flipout (Table 2 "Mult. Gauss + Flipout").

Granularity: ``ΔŴ`` once per window; flipout signs ``r_n`` ``(B, 4H)`` and ``s_n`` ``(B, in)`` once
per example per window (as edward2's LSTMCellFlipout), or every step with ``resample_per_step``.
``ΔŴ`` is a shared draw: in training it comes from the generator keyed on (seed, step, layer) of
:mod:`lm.nn.rng`, so every process of a data-parallel run uses the same one; the flipout signs
are per example and come from the sign stream keyed on (seed, rank, step, layer), apart from the
default stream, so a flipout arm and its shared counterpart draw every other mask alike for a seed.
The pairs also draw the same ``ΔŴ`` for a seed, step and layer (``wd_flipout`` and ``weight_drop``
at p = 0.5 map one uniform draw to the same ±W; ``gauss_flipout`` and ``gauss`` share ``ε``): the
arms of a paired comparison differ only in the signs.
Shared perturbations run on the fused LSTM kernel; flipout needs the explicit loop.
No KL term: the perturbation is used as pure regularizing noise.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.nn.flipout import Flip
from lm.nn.lstm import LSTMLayer
from lm.nn.noise import RecurrentNoise
from lm.nn.fastrand import two_valued
from lm.nn.rng import randn_like, shared_generator, sign_generator
from lm.nn.tape import drawn
from lm.regularizers.base import Regularizer


class WeightNoise(Regularizer):
    """Shared machinery: draw ``ΔŴ``; add it (shared) or hand it to flipout (per example)."""

    flipout: ClassVar[bool] = False

    def base_perturbation(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``ΔŴ`` for ``weight`` (same shape), or None when the rate is zero."""
        raise NotImplementedError

    def _perturb(self, weight: torch.Tensor, batch: int, steps: int) -> tuple[torch.Tensor, Flip | None]:
        delta = self.base_perturbation(weight)
        if delta is None:
            return weight, None
        if not self.flipout:
            return weight + delta, None
        return weight, Flip.sample(delta, batch, steps if self.cfg.resample_per_step else None,
                                   functools.partial(sign_generator, weight.device))

    def shares_noise_across_batch(self) -> bool:
        """The shared perturbations (weight_drop, gauss) draw one ``ΔŴ`` for the whole batch.
        Flipout counts as per example: each example gets its own signs, hence its own weights
        (pseudo-independent: the examples of one window share ``ΔŴ``, as in training)."""
        active = self.cfg.weight_p > 0 if "weight_p" in self.options else self.cfg.sigma > 0
        return super().shares_noise_across_batch() or (active and not self.flipout)

    def layer_noise(self, layer: LSTMLayer, batch: int, steps: int) -> RecurrentNoise:
        noise = super().layer_noise(layer, batch, steps)
        if not self.training:
            return noise
        noise.weight_hh, noise.flip_hh = self._perturb(layer.weight_hh, batch, steps)
        if self.cfg.perturb_ih:
            noise.weight_ih, noise.flip_ih = self._perturb(layer.weight_ih, batch, steps)
        return noise


class WeightDrop(WeightNoise):
    name = "weight_drop"
    summary = "Merity et al. 2017 WeightDrop: DropConnect on W_hh, one mask per window shared by the batch"
    perturbs = "W_hh (and W_ih with perturb_ih)"
    granularity = "one mask per window, shared by the batch"
    paper = "Merity et al. 2017 (Table 3 'WD')"
    options = ("weight_p", "perturb_ih")

    def base_perturbation(self, weight: torch.Tensor) -> torch.Tensor | None:
        p = self.cfg.weight_p
        if p == 0:
            return None
        # W ∘ (M/(1-p) - 1), M ~ Bernoulli(1-p): -1 where dropped (u < p), else 1/(1-p) - 1
        return weight * drawn(lambda: two_valued(weight.shape, weight, p, -1.0, 1 / (1 - p) - 1,
                                                 shared_generator(weight.device)), weight.shape)


class WDFlipout(WeightDrop):
    name = "wd_flipout"
    summary = "WD+Flipout: DropConnect p=0.5 on W_hh with a different exact mask per example"
    perturbs = "W_hh (and W_ih with perturb_ih)"
    granularity = "ΔŴ per window; signs per example per window (option: per step)"
    paper = "Wen et al. 2018 Sec. 4.2 (Table 3 'WD+Flipout')"
    options = ("weight_p", "perturb_ih", "resample_per_step")
    flipout = True

    @classmethod
    def check(cls, cfg: RegularizerConfig) -> None:
        super().check(cfg)
        if cfg.weight_p not in (0.0, 0.5):
            raise UserError(f"config key regularizer.weight_p={cfg.weight_p} is invalid for wd_flipout: flipout "
                            "needs a perturbation symmetric about zero, which DropConnect is only at p = 0.5 "
                            "(set 0.5, or use weight_drop for other rates)")

    def base_perturbation(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.weight_p == 0:
            return None
        # W ∘ (2M - 1) with M ~ Bernoulli(0.5): entries ±W, independent and symmetric about zero. M
        # keeps where weight_drop keeps (u >= 0.5), so one uniform draw gives both the same ΔŴ.
        return weight * drawn(lambda: two_valued(weight.shape, weight, 0.5, -1.0, 1.0, shared_generator(weight.device)),
                              weight.shape)


class Gauss(WeightNoise):
    name = "gauss"
    summary = "Mult. Gauss: W_hh(1 + sigma*eps), one draw per window shared by the batch"
    perturbs = "W_hh (and W_ih with perturb_ih)"
    granularity = "one draw per window, shared by the batch"
    paper = "Wen et al. 2018 (Table 2 'Mult. Gauss (σ = 1)')"
    options = ("sigma", "perturb_ih")

    def base_perturbation(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.sigma == 0:
            return None
        eps = drawn(lambda: randn_like(weight, shared_generator(weight.device)), weight.shape)
        # σ = 1 is the paper's rate: skip a pass over the (4H, H) noise that would change nothing
        return weight * (eps if self.cfg.sigma == 1 else eps.mul_(self.cfg.sigma))


class GaussFlipout(Gauss):
    name = "gauss_flipout"
    summary = "Mult. Gauss + Flipout: W_hh(1 + sigma*eps) with flipout signs per example"
    perturbs = "W_hh (and W_ih with perturb_ih)"
    granularity = "ΔŴ per window; signs per example per window (option: per step)"
    paper = "Wen et al. 2018 (Table 2 'Mult. Gauss + Flipout')"
    options = ("sigma", "perturb_ih", "resample_per_step")
    flipout = True
