"""Variance of the stochastic gradient of an LSTM's ``W_hh`` against mini-batch size.

The estimator behind ``bench/variance.py`` (Wen et al. 2018, Sec. 4.1 / App. C): a frozen
:class:`lm.nn.model.LanguageModel` is run under one of four weight-noise schemes (shared or flipout,
Gaussian or DropConnect), or Bayes by Backprop (``bbb`` / ``bbb_flipout``: the gradient of the
posterior mean μ = W_hh, or with the ``_rho`` suffix of its scale parameter ρ), and :func:`measure`
returns per-group variance estimates for mini-batch sizes ``N = 1, 2, 4, ...``. The script owns the model, the CLI and the report; this module owns
the measurement, so it can be reused on other checkpoints or layers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.nn.model import LanguageModel
from lm.regularizers import Regularizer, build_regularizer
from lm.regularizers.bayes import BayesByBackprop

GATES = ("i", "f", "g", "o")  # PyTorch's row blocks of W_hh

# name -> (family, perturbation, regularizer options); the flipout twin uses the same ΔŴ law.
SCHEMES: dict[str, tuple[str, str, dict]] = {
    "gauss": ("gauss", "shared", {"sigma": 1.0}),
    "gauss_flipout": ("gauss", "flipout", {"sigma": 1.0}),
    "weight_drop": ("dropconnect", "shared", {"weight_p": 0.5}),
    "wd_flipout": ("dropconnect", "flipout", {"weight_p": 0.5}),
    # Bayes by Backprop: the same posterior N(μ, softplus(ρ)²); the data-loss gradient of μ or of ρ
    "bbb": ("bbb_mu", "shared", {}),
    "bbb_flipout": ("bbb_mu", "flipout", {}),
    "bbb_rho": ("bbb_rho", "shared", {}),
    "bbb_flipout_rho": ("bbb_rho", "flipout", {}),
}
CLASSIC = ("gauss", "gauss_flipout", "weight_drop", "wd_flipout")  # the default of bench/variance.py


@contextlib.contextmanager
def frozen_base_perturbation(reg: Regularizer) -> Iterator[Callable[[], None]]:
    """Hold the regularizer's base perturbation ``ΔŴ`` fixed until the yielded ``redraw()`` is called.

    All four schemes draw ``ΔŴ = W ∘ ξ`` with ``ξ`` independent of ``W`` (checked by
    :func:`check_multiplicative`), so we draw ``ξ = base_perturbation(1)`` once per weight and
    return ``W ∘ ξ``: gradients still flow through ``W`` as in training. Flipout signs are not
    frozen: :class:`lm.nn.flipout.Flip` draws new ones on every forward call.

    For ``bbb``/``bbb_flipout`` (``ΔŴ = σ ∘ ε``) the frozen part is ``ε``, so gradients still
    reach μ and ρ through ``σ = softplus(ρ)``.
    """
    xis: dict[int, torch.Tensor] = {}
    if isinstance(reg, BayesByBackprop):
        name, draw = "draw_eps", type(reg).draw_eps

        def frozen(rho: torch.Tensor) -> torch.Tensor:
            if id(rho) not in xis:
                xis[id(rho)] = draw(reg, rho).detach()
            return xis[id(rho)]
    else:
        name, draw = "base_perturbation", type(reg).base_perturbation

        def frozen(weight: torch.Tensor) -> torch.Tensor:
            if id(weight) not in xis:
                xis[id(weight)] = draw(reg, torch.ones_like(weight)).detach()
            return weight * xis[id(weight)]

    setattr(reg, name, frozen)
    try:
        yield xis.clear
    finally:
        delattr(reg, name)


def bayes_regularizer(model: LanguageModel, name: str) -> Regularizer:
    """``bbb``/``bbb_flipout`` attached to ``model``'s layers, with the posterior scales ρ of the
    model's own bbb regularizer when it has one (a bbb-trained checkpoint), else ``init_sigma``."""
    reg = build_regularizer(RegularizerConfig(name=name))
    reg.attach(model.layers)
    old = model.regularizer
    if isinstance(old, BayesByBackprop) and len(old.rho_hh) == len(reg.rho_hh):
        with torch.no_grad():
            for new, trained in zip(reg.rho_hh, old.rho_hh):
                new.copy_(trained)
    return reg


def check_multiplicative(reg: Regularizer, shape: tuple[int, int]) -> None:
    """Fail loudly if ``base_perturbation(W)`` is not ``W ∘ base_perturbation(1)`` for the same draw."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = type(reg).base_perturbation(reg, w)
    torch.set_rng_state(state)
    b = w * type(reg).base_perturbation(reg, torch.ones_like(w))
    if a is None or not torch.allclose(a, b, atol=1e-6):
        raise RuntimeError(f"regularizer {reg.name!r}: base perturbation is not multiplicative; "
                           "frozen_base_perturbation would change its distribution")


def batch_sizes(max_n: int) -> list[int]:
    """``1, 2, 4, ...`` below ``max_n``, then ``max_n``."""
    ns = [1 << k for k in range(max_n.bit_length()) if (1 << k) < max_n]
    return ns + [max_n]


def window_sampler(data: torch.Tensor, bptt: int, count: int, seed: int, fixed: bool
                   ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``rep -> (x, y)`` of shape ``(bptt, count)``: ``count`` random windows of the split.

    Each window starts at a uniform position and begins with a zero state. With ``fixed`` every
    repetition gets the same windows; otherwise repetition ``rep`` gets its own (the same for
    every scheme, so the schemes are compared on common data).
    """
    if data.numel() < bptt + 2:
        raise UserError(f"split has {data.numel()} tokens, too few for windows of {bptt}")
    offsets = torch.arange(bptt + 1)[:, None]

    def sample(rep: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + (0 if fixed else rep + 1))
        starts = torch.randint(0, data.numel() - bptt - 1, (count,), generator=g)
        seq = data[starts[None, :] + offsets]
        return seq[:-1], seq[1:]

    return sample


def block_gradient(model: LanguageModel, weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the block's windows of the gradient of each window's mean token loss, w.r.t. ``weight``."""
    logits, _ = model(x, model.init_state(x.size(1)))
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    (grad,) = torch.autograd.grad(nll.mean(0).sum(), weight)
    return grad


def measure(model: LanguageModel, scheme: str, sampler: Callable, ns: list[int], reps: int, groups: int,
            chunk: int, layer: int, seed: int, log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """Group estimates of the gradient variance of ``W_hh`` of ``layer`` (1-based), or for the
    ``bbb*_rho`` schemes of its posterior scale ρ (same shape, same gate blocks).

    Returns:
        ``(groups, len(ns), 5)``: per group and N, the per-element variance averaged over the
        gates i, f, g, o and (last column) over the whole matrix; and ``(reps,)``: the squared
        Frobenius norm of each repetition's N = 1 gradient (to detect heavy tails).
    """
    family, _, options = SCHEMES[scheme]
    if family.startswith("bbb"):
        reg = bayes_regularizer(model, scheme.removesuffix("_rho"))
    else:
        reg = build_regularizer(RegularizerConfig(name=scheme, **options))
        check_multiplicative(reg, (8, 4))
    restore = model.regularizer
    model.regularizer = reg
    model.train()
    weight = reg.rho_hh[layer - 1] if family == "bbb_rho" else model.layers[layer - 1].weight_hh
    hidden = model.layers[layer - 1].hidden_size
    per = reps // groups
    out = np.zeros((groups, len(ns), len(GATES) + 1))
    n1_sq = np.zeros(groups * per)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with frozen_base_perturbation(reg) as redraw:
        for g in range(groups):
            s1 = torch.zeros((len(ns), *weight.shape), dtype=torch.float64)
            s2 = torch.zeros_like(s1)
            for r in range(per):
                x, y = sampler(g * per + r)
                redraw()
                total = torch.zeros(weight.shape, dtype=torch.float64)
                start = 0
                for k, n in enumerate(ns):
                    for a in range(start, n, chunk):
                        b = min(n, a + chunk)
                        total += block_gradient(model, weight, x[:, a:b], y[:, a:b]).double()
                    start = n
                    est = total / n
                    if k == 0:
                        n1_sq[g * per + r] = float(est.pow(2).sum())
                    s1[k] += est
                    s2[k] += est * est
            var = ((s2 - s1 * s1 / per) / (per - 1)).clamp_min_(0)
            out[g, :, :4] = var.view(len(ns), 4, hidden, -1).mean((2, 3)).numpy()
            out[g, :, 4] = var.mean((1, 2)).numpy()
            log(f"  {scheme}: group {g + 1}/{groups} done, {time.perf_counter() - t0:.0f}s")
    model.regularizer = restore
    return out, n1_sq
