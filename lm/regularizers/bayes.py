"""Bayes by Backprop (Blundell et al. 2015) on the LSTM's recurrent weights: ``bbb`` and ``bbb_flipout``.

A mean-field Gaussian variational posterior over ``W_hh`` (and ``W_ih`` with ``perturb_ih``)::

    q(W) = N(μ, σ²),  σ = softplus(ρ),     prior p(W) = N(0, σ_p²)

``μ`` is the layer's own weight (initialised as usual); ``ρ`` is a parameter of this regularizer,
one per perturbed weight, initialised so that ``σ = init_sigma``. Training minimises the
negative ELBO per token::

    loss = CE(data) + w(step) · KL(q ‖ p) / N_train

with ``N_train`` the training set's token count and ``w`` = ``kl_scale`` times a linear warm-up
(``kl_warmup_steps``); ``kl_scale`` < 1 is the paper's "downscaled the KL term" (App. E.2: 0.1).
The closed form (per element, summed)::

    KL(N(μ, σ²) ‖ N(0, σ_p²)) = log(σ_p / σ) + (σ² + μ²) / (2 σ_p²) - 1/2

The reparameterised sample is ``W = μ + ΔŴ`` with ``ΔŴ = σ ∘ ε``, ``ε ~ N(0, I)``:

* ``bbb``: one ``ε`` per forward call (one BPTT window), shared by the batch (the "shared
  perturbation" of Wen et al. 2018, Sec. 2.1), drawn from the keyed generator of
  :mod:`lm.nn.rng` so that every process of a data-parallel run uses the same sample; runs on
  the fused LSTM kernel.
* ``bbb_flipout``: the same ``ΔŴ`` per window, and per example ``n`` flipout signs ``r_n, s_n``
  held over the window: example n uses ``μ + ΔŴ ∘ r_n s_nᵀ``. The entries of ``σ ∘ ε`` are
  independent and symmetric about zero, so each example's weights are again distributed as q
  (Wen et al. 2018, Sec. 3.1, Eq. 4; the BBB experiment of Sec. 4.3); explicit window kernel.

Evaluation uses the posterior mean ``μ`` (the base class's eval path); a predictive average over
K posterior samples is the evaluation's ``--mc-samples`` (its own issue).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import RegularizerConfig
from lm.nn.flipout import Flip
from lm.nn.lstm import LSTMLayer
from lm.nn.noise import RecurrentNoise
from lm.nn.rng import randn_like, shared_generator, sign_generator
from lm.nn.tape import drawn
from lm.regularizers.base import Regularizer


def inverse_softplus(sigma: float) -> float:
    """``ρ`` with ``softplus(ρ) = sigma`` (``log(expm1(sigma))``, stable for small sigma)."""
    return sigma + math.log(-math.expm1(-sigma))


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """``Σ KL(N(μ, σ²) ‖ N(0, σ_p²))`` over all elements (a 0-d tensor), in float64-safe closed form."""
    var_ratio = (sigma / prior_sigma).pow(2)
    return (0.5 * (var_ratio + (mu / prior_sigma).pow(2) - 1) - torch.log(sigma / prior_sigma)).sum()


class BayesByBackprop(Regularizer):
    name = "bbb"
    summary = "Bayes by Backprop: Gaussian posterior N(mu, softplus(rho)^2) on W_hh, one sample per window shared by the batch"
    perturbs = "W_hh (and W_ih with perturb_ih): posterior N(μ, σ²), KL to N(0, σ_p²) in the loss"
    granularity = "one sample per window, shared by the batch"
    paper = "Blundell et al. 2015; Wen et al. 2018 Sec. 4.3 ('shared perturbation')"
    options = ("init_sigma", "prior_sigma", "kl_scale", "kl_warmup_steps", "perturb_ih")
    flipout: ClassVar[bool] = False

    def __init__(self, cfg: RegularizerConfig) -> None:
        super().__init__(cfg)
        self.rho_hh = nn.ParameterList()
        self.rho_ih = nn.ParameterList()
        self._layers: list[LSTMLayer] = []  # set by attach
        self._index: dict[int, int] = {}  # id(layer) -> its position (the layers are not submodules here)
        self._kl_sum: torch.Tensor | None = None  # sum of KL/N over the steps since the last log_stats
        self._kl_steps, self._kl_weight = 0, 0.0

    def attach(self, layers: Sequence[LSTMLayer]) -> None:
        """One ``ρ`` per perturbed weight, shaped like it, all ``softplus⁻¹(init_sigma)``."""
        rho0 = inverse_softplus(self.cfg.init_sigma)
        full = lambda w: nn.Parameter(torch.full_like(w.detach(), rho0))  # noqa: E731
        self.rho_hh = nn.ParameterList(full(layer.weight_hh) for layer in layers)
        self.rho_ih = nn.ParameterList(full(layer.weight_ih) for layer in layers) if self.cfg.perturb_ih \
            else nn.ParameterList()
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self._layers = list(layers)  # a plain list: not registered, so the weights are not listed twice

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(μ, ρ)`` of every perturbed weight, layer by layer (``W_hh`` [, ``W_ih``])."""
        out = []
        for i, layer in enumerate(self._layers):
            out.append((layer.weight_hh, self.rho_hh[i]))
            if self.cfg.perturb_ih:
                out.append((layer.weight_ih, self.rho_ih[i]))
        return out

    def draw_eps(self, rho: torch.Tensor) -> torch.Tensor:
        """``ε ~ N(0, I)`` shaped like ``rho``: a draw shared by the batch, from the keyed stream."""
        return drawn(lambda: randn_like(rho, shared_generator(rho.device)), rho.shape)

    def _sample(self, mu: torch.Tensor, rho: torch.Tensor, batch: int) -> tuple[torch.Tensor, Flip | None]:
        delta = F.softplus(rho) * self.draw_eps(rho)  # ΔŴ = σ ∘ ε: gradients reach ρ through σ
        if not self.flipout:
            return mu + delta, None
        # signs per example, held over the window, from the keyed sign stream
        return mu, Flip.sample(delta, batch, generator=functools.partial(sign_generator, mu.device))

    def layer_noise(self, layer: LSTMLayer, batch: int, steps: int) -> RecurrentNoise:
        noise = super().layer_noise(layer, batch, steps)
        if not self.training:  # posterior mean
            return noise
        i = self._index[id(layer)]
        noise.weight_hh, noise.flip_hh = self._sample(layer.weight_hh, self.rho_hh[i], batch)
        if self.cfg.perturb_ih:
            noise.weight_ih, noise.flip_ih = self._sample(layer.weight_ih, self.rho_ih[i], batch)
        return noise

    def shares_noise_across_batch(self) -> bool:
        """For Monte-Carlo evaluation (``evaluate.py --mc-samples``, lm/eval/mc.py of issue 15): ``bbb``
        draws one sample for the whole batch, so K samples need K passes; ``bbb_flipout`` is per
        example (its own signs), so K copies of a stream in one batch are K samples. Embedding
        dropout is shared by the batch either way."""
        return self.cfg.embed_p > 0 or not self.flipout

    # -- the KL term ---------------------------------------------------------------------
    def kl(self) -> torch.Tensor:
        """``KL(q ‖ p)`` summed over every perturbed weight (0-d tensor, differentiable in μ and ρ)."""
        return sum(gaussian_kl(mu, F.softplus(rho), self.cfg.prior_sigma) for mu, rho in self.pairs())

    def kl_weight(self, step: int) -> float:
        """``kl_scale`` times the linear warm-up ``min(1, (step + 1) / kl_warmup_steps)`` (1 without warm-up)."""
        k = self.cfg.kl_warmup_steps
        return self.cfg.kl_scale * (1.0 if k == 0 else min(1.0, (step + 1) / k))

    def extra_loss(self, step: int, train_tokens: int) -> torch.Tensor:
        """``w(step) · KL(q ‖ p) / N_train``: the per-token share of the ELBO's KL (Blundell et al. Eq. 2)."""
        per_token = self.kl() / train_tokens
        self._kl_weight = self.kl_weight(step)
        detached = per_token.detach()
        self._kl_sum = detached if self._kl_sum is None else self._kl_sum + detached  # no sync per step
        self._kl_steps += 1
        return self._kl_weight * per_token

    def sigma_mean(self) -> float:
        """Mean posterior std over every perturbed weight."""
        with torch.no_grad():
            total = sum(float(F.softplus(rho).sum()) for _, rho in self.pairs())
            return total / sum(rho.numel() for _, rho in self.pairs())

    def log_stats(self) -> dict[str, float]:
        """``kl``: mean KL/N_train (nats per token) over the steps since the last call; ``kl_weight``:
        its weight at the last step; ``sigma_mean``: the mean posterior std now."""
        kl = float(self._kl_sum) / self._kl_steps if self._kl_steps else float("nan")
        self._kl_sum, self._kl_steps = None, 0
        return {"kl": kl, "kl_weight": self._kl_weight, "sigma_mean": self.sigma_mean()}


class BBBFlipout(BayesByBackprop):
    name = "bbb_flipout"
    summary = "Bayes by Backprop + Flipout: the same posterior, a pseudo-independent sample per example"
    granularity = "ΔŴ per window; signs per example per window"
    paper = "Wen et al. 2018 Sec. 4.3 / App. E.2 (BBB with flipout)"
    flipout = True
