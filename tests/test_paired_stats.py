"""lm.analysis.paired: known answers, exact enumeration, and the statistical properties checked by
simulation (fixed seeds; tolerances of 4 binomial standard errors of the simulated rate)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lm.analysis.paired import analyse, pairs_for_power, paired_t, sign_test, t_power, verdict, wilcoxon
from lm.analysis.stats import t_quantile

A = [412.3, 398.1, 421.7, 405.2, 415.9, 401.4, 409.8]
B = [418.9, 401.2, 430.1, 404.8, 425.3, 410.0, 411.1]
PAPER = math.log(73.20 / 75.71)  # Wen et al. 2018, Table 3: WD+Flipout against WD, test perplexity


def _tol(rate: float, reps: int) -> float:
    return 4 * math.sqrt(rate * (1 - rate) / reps)


def test_paired_t_known_answer():
    # reference values: scipy.stats.ttest_rel (1.17.1) and its confidence_interval(0.95)
    r = paired_t(A, B)
    assert r.n == 7 and r.t == pytest.approx(-3.565006050728362, rel=1e-9)
    assert r.p == pytest.approx(0.0118553455520901, rel=1e-7)
    assert (r.low, r.high) == (pytest.approx(-8.913667995593176, rel=1e-8), pytest.approx(-1.657760575835412, rel=1e-8))
    log = paired_t(np.log(A), np.log(B))
    assert log.p == pytest.approx(0.011484787393117687, rel=1e-7)
    assert log.low == pytest.approx(-0.021398433133510704, rel=1e-8)
    with pytest.raises(ValueError, match="length"):
        paired_t(A, B[:-1])


def test_wilcoxon_exact_known_answers():
    # scipy.stats.wilcoxon(A, B, method="exact"): p = 0.03125 (one positive difference, of rank 1)
    w = wilcoxon(A, B)
    assert w.exact and w.w_plus == 1.0 and w.p == pytest.approx(0.03125, abs=1e-12)
    # tables: n = 10 without ties, W+ = 8 is the two-sided 5% critical value, P(W+ <= 8) = 25/1024
    d = -np.arange(1, 11, dtype=float)
    d[[0, 6]] *= -1  # positive ranks 1 and 7: W+ = 8
    w = wilcoxon(d, np.zeros(10))
    assert w.w_plus == 8 and w.p == pytest.approx(2 * 25 / 1024, abs=1e-12)


def test_wilcoxon_with_ties_and_zeros_equals_enumeration():
    """The exact p-value is the share of the 2^n sign patterns (zeros dropped, mid-ranks kept) whose
    W+ is at least as far out in the tail as the observed one."""
    d = np.array([1.5, -2, 3, 3, -3, 4, 5, -1.5, 6, 7, 0, 8.5])
    w = wilcoxon(d, np.zeros_like(d))
    nz = d[d != 0]
    abs_sorted = np.sort(np.abs(nz))
    ranks = np.array([np.mean(np.nonzero(abs_sorted == v)[0] + 1) for v in np.abs(nz)])
    assert w.zeros == 1 and w.n == 11 and w.w_plus == ranks[nz > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(nz))])
    expected = min(1.0, 2 * min((sums <= w.w_plus + 1e-9).mean(), (sums >= w.w_plus - 1e-9).mean()))
    assert w.p == pytest.approx(expected, abs=1e-12)


def test_sign_test_is_binomial():
    s = sign_test([-1] * 2 + [1] * 9 + [0], [0] * 12)  # one tie, dropped
    assert (s.negative, s.positive) == (2, 9)
    assert s.p == pytest.approx(2 * (1 + 11 + 55) / 2 ** 11, abs=1e-15)  # scipy.stats.binomtest(2, 11): 0.0654296875
    assert sign_test([1, 2], [1, 2]).p == 1.0


def test_interval_coverage_and_type_one_errors_by_simulation():
    """Null: d ~ N(0, 1), n = 8. The 95% t-interval covers 0 in 95% of the samples, the t-test rejects
    5% at α = 0.05, and the exact rank tests reject exactly their attainable levels: Wilcoxon
    P(p <= 0.05) = 2 P(W+ <= 3) = 10/256, sign test 2/256 (all 8 signs alike)."""
    reps, n = 3000, 8
    rng = np.random.default_rng(1)
    d = rng.standard_normal((reps, n))
    c = t_quantile(0.025, n - 1)
    covered = rejected_t = rejected_w = rejected_s = 0
    for row in d:
        r = paired_t(row, np.zeros(n)) if rng.random() < 0.1 else None  # the function itself on a subsample
        mean, se = row.mean(), row.std(ddof=1) / math.sqrt(n)
        if r is not None:
            assert (r.low, r.high) == (pytest.approx(mean - c * se), pytest.approx(mean + c * se))
        covered += abs(mean) <= c * se
        rejected_t += abs(mean) > c * se
        rejected_w += wilcoxon(row, np.zeros(n)).p <= 0.05
        rejected_s += sign_test(row, np.zeros(n)).p <= 0.05
    assert abs(covered / reps - 0.95) < _tol(0.95, reps)
    assert abs(rejected_t / reps - 0.05) < _tol(0.05, reps)
    assert abs(rejected_w / reps - 10 / 256) < _tol(10 / 256, reps)
    assert abs(rejected_s / reps - 2 / 256) < _tol(2 / 256, reps)


def test_power_matches_simulation_and_pairs_are_minimal():
    sd = 0.05
    n = pairs_for_power(PAPER, sd)
    assert t_power(n, PAPER, sd) >= 0.8 > t_power(n - 1, PAPER, sd)
    # the normal approximation ((z_.975 + z_.8) sd / effect)^2 undercounts by about one pair
    approx = ((1.959964 + 0.841621) * sd / PAPER) ** 2
    assert approx <= n <= approx + 3
    reps = 3000
    rng = np.random.default_rng(2)
    d = PAPER + sd * rng.standard_normal((reps, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rate = float((np.abs(t) > t_quantile(0.025, n - 1)).mean())
    assert abs(rate - t_power(n, PAPER, sd)) < _tol(0.8, reps)
    assert t_power(5, 1.0, 1.0) == pytest.approx(0.40138991737179536, abs=1e-5)  # scipy.stats.nct (1.17.1)


def test_verdicts():
    assert verdict(-0.05, -0.01, PAPER) == "reproduced"
    assert verdict(-0.02, -0.01, PAPER).startswith("reproduced in sign")
    assert verdict(-0.02, 0.01, PAPER) == "refuted at the paper's effect size"
    assert verdict(0.01, 0.02, PAPER) == "refuted at the paper's effect size"
    assert verdict(-0.05, 0.01, PAPER) == "unresolved"


@pytest.mark.parametrize("true_ratio, n, sd, expected", [
    (73.20 / 75.71, 30, 0.02, "reproduced"),  # the paper's effect, a well-powered design
    (1.0, 60, 0.02, "refuted at the paper's effect size"),  # no effect: the interval excludes 3.3%
    # half the paper's effect, four noisy pairs (the study's situation): unresolved with probability 0.90
    (math.sqrt(73.20 / 75.71), 4, 0.08, "unresolved"),
])
def test_analyse_reaches_the_known_answer(true_ratio, n, sd, expected):
    rng = np.random.default_rng(3)
    b = 415 * np.exp(0.04 * rng.standard_normal(n))  # the shared arm's seed-to-seed spread ...
    a = b * true_ratio * np.exp(sd * rng.standard_normal(n))  # ... which the pairing cancels
    out = analyse(a, b, "ppl", 73.20, 75.71)
    assert out["verdict"] == expected
    assert out["paper_effect"] == pytest.approx(PAPER) and out["n"] == n
    assert out["pairs_needed"] == pairs_for_power(PAPER, out["primary"].sd)
    assert out["raw"].mean == pytest.approx(float(np.mean(a - b)))
