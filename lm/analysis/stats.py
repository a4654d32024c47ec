"""Small statistics helpers with no SciPy dependency.

* Welch's t-test for seed comparisons (:mod:`lm.analysis.study_report`);
* t quantiles (the CDF inverted), ``a + b/N`` fits and group summaries for ``bench/variance.py``.

The two-sided p-value uses the Student t CDF written through the regularized incomplete beta
function, ``P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)``, evaluated with Lentz's continued fraction.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _betacf(a: float, b: float, x: float, iters: int = 300, eps: float = 1e-14) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` (not necessarily integer) degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Welch:
    """``mean(a) - mean(b)`` with its standard error, Welch's t, degrees of freedom and p-value."""

    diff: float
    se: float
    t: float
    df: float
    p: float


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's unequal-variance t-test of ``mean(a) == mean(b)`` (needs two or more values each)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("welch needs at least two values in each sample")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Welch(diff, 0.0, math.copysign(math.inf, diff) if diff else 0.0, float("nan"),
                     0.0 if diff else 1.0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    return Welch(diff, se, t, df, t_two_sided_p(t, df))


def t_quantile(q: float, df: float) -> float:
    """Upper ``q`` point of Student's t (``P(T > t) = q``, ``0 < q < 1/2``): the t CDF above, inverted
    by bisection on ``t`` (the two-sided p-value falls monotonically in ``|t|``) to 1e-12."""
    if df <= 0 or not 0.0 < q < 0.5:
        return math.nan
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 2 * q:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * q else (lo, mid)
    return (lo + hi) / 2


def t95(df: float) -> float:
    """Upper 5% point of Student's t with ``df`` degrees of freedom (two-sided 90% intervals)."""
    return t_quantile(0.05, df)


# -- bench/variance.py: variance against mini-batch size ------------------------------------
def fit(ns: Sequence[int], v: Sequence[float]) -> dict:
    """Log-log slopes (all N; the upper half of the N range) and ``a + b/N`` by relative least squares."""
    n, v = np.asarray(ns, float), np.asarray(v, float)
    slope = float(np.polyfit(np.log(n), np.log(v), 1)[0]) if len(n) > 1 else math.nan
    half = len(n) // 2
    tail = float(np.polyfit(np.log(n[half:]), np.log(v[half:]), 1)[0]) if len(n) - half > 1 else math.nan
    design = np.stack([1 / v, 1 / (n * v)], 1)  # minimise sum(((a + b/N) / v - 1)^2)
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(v), rcond=None)
    return {"slope": slope, "slope_upper_half": tail, "a": float(a), "b": float(b),
            "crossover_n": float(b / a) if a > 0 else None}


def summarize(ns: list[int], groups: np.ndarray, column: int) -> dict:
    """Mean over groups, 90% t-interval, and the fit, for one gate column."""
    vals = groups[:, :, column]
    mean = vals.mean(0)
    k = vals.shape[0]
    half = t95(k - 1) * vals.std(0, ddof=1) / math.sqrt(k) if k > 1 else np.full_like(mean, math.nan)
    return {"variance": mean.tolist(), "ci_low": (mean - half).tolist(), "ci_high": (mean + half).tolist(),
            **fit(ns, mean)}


def tail_summary(sq: np.ndarray) -> dict:
    """Median, max and the largest single repetition's share of the squared N = 1 gradient norms."""
    return {"median": float(np.median(sq)), "max": float(sq.max()), "largest_share": float(sq.max() / sq.sum()),
            "largest_rep": int(sq.argmax())}


def t_stat_equal(x: np.ndarray, y: np.ndarray) -> float:
    """Welch t statistic of the difference of two sets of group estimates (nan when both are constant)."""
    if len(x) < 2 or len(y) < 2:
        return math.nan
    w = welch(x.tolist(), y.tolist())
    return w.t if w.se > 0 else math.nan
