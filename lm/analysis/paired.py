"""Statistics of a paired comparison: two arms run on the same seeds, compared seed by seed.

With ``a_i`` and ``b_i`` the figures of arm A (e.g. ``wd_flipout``) and arm B (``weight_drop``) on seed
``i``, everything is computed on the differences ``d_i = a_i - b_i`` (negative: A is better):

* :func:`paired_t`: mean difference, sample SD, a ``level`` (95%) t-interval and the paired t-test;
* :func:`wilcoxon`: Wilcoxon's signed-rank test, exact (the conditional null distribution of ``W+``
  given the ranks, ties as mid-ranks, zero differences dropped) for up to :data:`EXACT_MAX` non-zero
  differences, the normal approximation with tie and continuity corrections beyond;
* :func:`sign_test`: the exact binomial sign test (zeros dropped);
* :func:`t_power` / :func:`pairs_for_power`: the power of the two-sided paired t-test against a true
  mean difference ``effect`` with SD ``sd`` (exact, through the noncentral t), and the smallest number
  of pairs that reaches a given power;
* :func:`verdict`: reproduced / refuted at the paper's effect size / unresolved, from the interval.

Perplexities are compared on two scales: the perplexity itself, and its logarithm (the mean test loss
in nats), where a relative effect is a difference: the paper's 73.20 against 75.71 (Wen et al. 2018,
Table 3) is ``log(73.20 / 75.71) = -0.0337``, a 3.3% lower perplexity. The log scale is the primary
one (the interval and the verdict): its spread does not grow with the perplexity's level.
No SciPy: the t distribution comes from :mod:`lm.analysis.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lm.analysis.stats import t_quantile, t_two_sided_p

EXACT_MAX = 200  # non-zero differences up to which the signed-rank p-value is exact


@dataclass(frozen=True)
class PairedT:
    """``d = a - b``: ``n`` pairs, mean, sample SD, standard error, ``level`` t-interval, t and p."""

    n: int
    mean: float
    sd: float
    se: float
    low: float
    high: float
    t: float
    p: float


def differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} and {len(b)})")
    return np.asarray(a, float) - np.asarray(b, float)


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedT:
    """Paired t-test of ``mean(a - b) == 0`` and the ``level`` interval of the mean difference (n >= 2)."""
    d = differences(a, b)
    n = len(d)
    if n < 2:
        raise ValueError("a paired t-test needs at least two pairs")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = t_quantile((1 - level) / 2, n - 1) * se
    if se == 0.0:
        return PairedT(n, mean, 0.0, 0.0, mean, mean, math.copysign(math.inf, mean) if mean else 0.0,
                       0.0 if mean else 1.0)
    t = mean / se
    return PairedT(n, mean, sd, se, mean - half, mean + half, t, t_two_sided_p(t, n - 1))


def _mid_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@dataclass(frozen=True)
class SignedRank:
    """``w_plus``: the sum of the ranks of ``|d|`` over positive ``d``; ``n``: non-zero differences."""

    w_plus: float
    n: int
    zeros: int
    p: float
    exact: bool


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> SignedRank:
    """Two-sided Wilcoxon signed-rank test of a distribution of ``a - b`` symmetric about 0."""
    d = differences(a, b)
    nz = d[d != 0]
    n, zeros = len(nz), int((d == 0).sum())
    if n == 0:
        return SignedRank(0.0, 0, zeros, 1.0, True)
    ranks = _mid_ranks(np.abs(nz))
    w_plus = float(ranks[nz > 0].sum())
    if n <= EXACT_MAX:
        # Under the null each rank enters W+ with probability 1/2, independently: the distribution of
        # the sum of doubled (integer) ranks by dynamic programming over the ranks.
        doubled = np.rint(2 * ranks).astype(np.int64)
        dist = np.zeros(int(doubled.sum()) + 1)
        dist[0] = 1.0
        for r in doubled:
            shifted = np.zeros_like(dist)
            shifted[r:] = dist[: len(dist) - r]
            dist = 0.5 * (dist + shifted)
        w2 = int(round(2 * w_plus))
        lower, upper = float(dist[: w2 + 1].sum()), float(dist[w2:].sum())
        return SignedRank(w_plus, n, zeros, min(1.0, 2 * min(lower, upper)), True)
    mean = n * (n + 1) / 4
    _, counts = np.unique(np.abs(nz), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - float((counts ** 3 - counts).sum()) / 48
    z = (abs(w_plus - mean) - 0.5) / math.sqrt(var)
    return SignedRank(w_plus, n, zeros, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))), False)


@dataclass(frozen=True)
class SignTest:
    """``negative`` / ``positive``: counts of ``a - b`` below / above zero (zeros dropped)."""

    negative: int
    positive: int
    p: float


def sign_test(a: Sequence[float], b: Sequence[float]) -> SignTest:
    """Exact two-sided sign test: ``P(a < b) == 1/2`` among the non-tied pairs."""
    d = differences(a, b)
    neg, pos = int((d < 0).sum()), int((d > 0).sum())
    n, k = neg + pos, min(neg, pos)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 0.5
    return SignTest(neg, pos, min(1.0, 2 * tail))


def _phi(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF, elementwise."""
    return 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2))


def t_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided level-``alpha`` paired t-test with ``n`` pairs when the differences have
    mean ``effect`` and SD ``sd``.

    ``T = (Z + λ) / S`` with ``λ = effect √n / sd``, ``Z`` standard normal and ``S² ~ χ²_ν / ν``
    (``ν = n - 1``), so ``P(|T| > c) = E_S[Φ(λ - cS) + Φ(-λ - cS)]``: an integral over ``S``'s density,
    by the trapezoid rule on a grid that spans it (error below 1e-5 for ``ν >= 1``).
    """
    if n < 2 or sd <= 0:
        raise ValueError("t_power needs n >= 2 pairs and a positive sd")
    nu = n - 1
    lam = abs(effect) * math.sqrt(n) / sd
    c = t_quantile(alpha / 2, nu)
    spread = 1 / math.sqrt(2 * nu)  # S's standard deviation, for large ν
    lo, hi = max(1e-12, 1 - 12 * spread), 1 + 12 * spread + (10.0 if nu < 8 else 0.0)
    s = np.linspace(lo, hi, 8001)
    log_f = (nu - 1) * np.log(s) - nu * s * s / 2  # S's density up to a constant (normalised below)
    f = np.exp(log_f - log_f.max())
    f /= _trapezoid(f, s)
    return float(_trapezoid((_phi(lam - c * s) + _phi(-lam - c * s)) * f, s))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


def pairs_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, limit: int = 100_000) -> int:
    """The smallest number of pairs ``n >= 2`` at which :func:`t_power` reaches ``power`` (bisection on
    ``n``: the power grows with ``n``); ``limit`` + 1 when even ``limit`` pairs fall short."""
    if t_power(limit, effect, sd, alpha) < power:
        return limit + 1
    lo, hi = 1, limit  # t_power(hi) >= power; lo is below the answer
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 2 and t_power(mid, effect, sd, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def verdict(low: float, high: float, paper: float) -> str:
    """The conclusion from the interval ``[low, high]`` of the difference (A - B, negative: A is better)
    and the paper's difference ``paper`` (< 0, A better):

    * ``reproduced``: the interval lies below 0 and reaches the paper's effect;
    * ``reproduced in sign, smaller than the paper's effect``: below 0, but it excludes the paper's effect;
    * ``refuted at the paper's effect size``: it excludes an improvement as large as the paper's and does
      not exclude 0 (or shows A worse);
    * ``unresolved``: it holds both 0 and the paper's effect.
    """
    if high < 0:
        return "reproduced" if low <= paper else "reproduced in sign, smaller than the paper's effect"
    if low > paper:
        return "refuted at the paper's effect size"
    return "unresolved"


def analyse(a: Sequence[float], b: Sequence[float], metric: str, paper_a: float, paper_b: float,
            power: float = 0.8, alpha: float = 0.05) -> dict:
    """Everything the results page reports for one pair of arms (``a``, ``b``: test figures per seed, in
    seed order; ``metric`` 'ppl' or 'bpc'; ``paper_a``, ``paper_b``: the paper's figures).

    The primary scale is ``log`` (log-perplexity) for 'ppl' and BPC itself (a log2-perplexity per
    character) for 'bpc'; the paper's effect is the difference of the paper's figures on that scale.
    """
    if metric not in ("ppl", "bpc"):
        raise ValueError(f"metric {metric!r}: expected 'ppl' or 'bpc'")
    scale = (lambda x: np.log(np.asarray(x, float))) if metric == "ppl" else (lambda x: np.asarray(x, float))
    la, lb = scale(a), scale(b)
    paper = float(scale([paper_a])[0] - scale([paper_b])[0])
    primary = paired_t(la, lb, 1 - alpha)
    out = {"metric": metric, "n": len(la), "paper_effect": paper, "primary": primary,
           "raw": paired_t(a, b, 1 - alpha) if metric == "ppl" else None,
           "wilcoxon": wilcoxon(la, lb), "sign": sign_test(la, lb),
           "verdict": verdict(primary.low, primary.high, paper),
           "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b))}
    if primary.sd > 0:
        out["power_at_paper"] = t_power(len(la), paper, primary.sd, alpha)
        out["pairs_needed"] = pairs_for_power(paper, primary.sd, power, alpha)
    return out
