"""lm.analysis.stats (Welch's t-test) and lm.analysis.study_report (docs/results.md from a study's run directories)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from lm.errors import run_cli
from lm.analysis.stats import betainc, t95, t_quantile, t_two_sided_p, welch
from lm.analysis.study_report import kendall_tau, main as report_main
from tests.test_compare import fake_run


# Reference values: two-sided critical values of Student's t from standard tables.
@pytest.mark.parametrize("t, df, p", [(12.706, 1, 0.05), (2.776, 4, 0.05), (4.604, 4, 0.01), (1.960, 1e6, 0.05),
                                      (2.228, 10, 0.05), (0.0, 3, 1.0)])
def test_t_p_values_match_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


# Upper 5% and 2.5% points from standard tables (3 decimals, so within 5e-4 plus rounding).
@pytest.mark.parametrize("df, upper5, upper25", [(1, 6.314, 12.706), (2, 2.920, 4.303), (5, 2.015, 2.571),
                                                 (10, 1.812, 2.228), (30, 1.697, 2.042), (120, 1.658, 1.980)])
def test_t_quantiles_match_tables(df, upper5, upper25):
    assert t95(df) == pytest.approx(upper5, abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(upper25, abs=6e-4)


def test_t_quantile_inverts_the_cdf_and_reaches_the_normal_limit():
    for df in (1.5, 3, 7.3, 40):
        assert t_two_sided_p(t95(df), df) == pytest.approx(0.10, abs=1e-9)
    assert t95(1e7) == pytest.approx(1.6448536, abs=1e-5)
    assert math.isnan(t95(0)) and math.isnan(t_quantile(0.7, 5))


def test_betainc_symmetry_and_uniform_case():
    # I_x(1, 1) = x, and I_x(a, b) = 1 - I_{1-x}(b, a)
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-12)
    assert betainc(2.5, 0.5, 0.7) == pytest.approx(1 - betainc(0.5, 2.5, 0.3), abs=1e-12)


def test_welch_false_positive_rate_is_alpha():
    """Under the null (equal means) p < 0.05 happens about 5% of the time, even with 3 seeds a side."""
    rng = random.Random(0)
    trials = 4000
    hits = sum(welch([rng.gauss(0, 1) for _ in range(3)], [rng.gauss(0, 2) for _ in range(3)]).p < 0.05
               for _ in range(trials))
    # Welch is slightly conservative at df ~ 2-4; binomial sd of the rate is sqrt(.05*.95/4000) = 0.0034
    assert 0.02 < hits / trials < 0.05 + 4 * math.sqrt(0.05 * 0.95 / trials)


def test_welch_detects_a_large_difference():
    w = welch([1.00, 1.01, 0.99], [1.20, 1.22, 1.19])
    assert w.diff == pytest.approx(-0.2033, abs=1e-3) and w.p < 0.001


def test_kendall_tau():
    assert kendall_tau("abc", "abc") == 1 and kendall_tau("abc", "cba") == -1
    assert kendall_tau("abcd", "abdc") == pytest.approx(4 / 6)


def _study(root, level, tests: dict[str, list[float]]):
    for reg, values in tests.items():
        for seed, test in enumerate(values, 1):
            fake_run(root / level / reg / f"seed{seed}", level=level, seed=seed, valid=test + 0.03, test=test)


def test_report_states_findings_with_paper_figures(tmp_path, capsys):
    _study(tmp_path / "study", "char", {"unregularized": [1.60, 1.61, 1.62], "gauss": [1.50, 1.51, 1.49],
                                        "flipout": [1.50, 1.52, 1.49]})
    out = tmp_path / "results.md"
    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written remark.\n")
    assert report_main(["--study-dir", str(tmp_path / "study"), "--out", str(out), "--notes", str(notes)]) == 0
    page = out.read_text()
    assert "| unregularized | Unregularized LSTM | 1.468 / 1.423 | 1.640 ± 0.010 | 1.610 ± 0.010 |" in page
    assert "- Regularized beats unregularized? gauss vs unregularized: test 1.500 vs 1.610" in page
    gauss_line = next(line for line in page.splitlines() if line.startswith("- Regularized beats unregularized? gauss"))
    assert "**better**" in gauss_line and "(paper: better)" in gauss_line
    flip_line = next(line for line in page.splitlines() if line.startswith("- Flipout vs"))
    assert "no significant difference" in flip_line and "test 1.227 vs 1.230" in flip_line
    assert "Hand-written remark." in page and "## Design" in page and "![char learning curves]" in page


def test_report_refuses_an_unfinished_study(tmp_path, capsys):
    _study(tmp_path / "study", "word", {"unregularized": [100.0, 101.0]})
    fake_run(tmp_path / "study" / "word" / "unregularized" / "seed3", level="word", seed=3, done=False)
    code = run_cli(report_main, ["--study-dir", str(tmp_path / "study"), "--out", str(tmp_path / "r.md")])
    assert code == 2 and "finish the study" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    assert run_cli(report_main, ["--study-dir", str(tmp_path / "none")]) == 2


def test_report_includes_the_notes_page_below_its_marker_only(tmp_path):
    """docs/study/notes.md is a page of its own (title, introduction); results.md takes the part after
    its marker, and the generated page carries no timestamp."""
    _study(tmp_path / "study", "char", {"unregularized": [1.60, 1.61, 1.62], "gauss": [1.50, 1.51, 1.49]})
    out = tmp_path / "results.md"
    notes = tmp_path / "notes.md"
    notes.write_text("# Reading the study\n\nIntroduction of the page.\n\n<!-- results.md includes this file from "
                     "the next line on (x) -->\n**Cost.** Hand-written remark.\n")
    assert report_main(["--study-dir", str(tmp_path / "study"), "--out", str(out), "--notes", str(notes)]) == 0
    page = out.read_text()
    assert "## Reading the results\n\n**Cost.** Hand-written remark." in page
    assert "Introduction of the page." not in page and "# Reading the study" not in page
    assert " UTC" not in page
    real = Path(__file__).resolve().parent.parent / "docs" / "study" / "notes.md"
    assert "<!-- results.md includes this file from the next line on" in real.read_text()
