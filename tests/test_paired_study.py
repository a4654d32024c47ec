"""The paired study's command (lm/cli/paired_study.py) in tiny mode, its plan, its section of the
results page, and its sizes against scripts/study.sh."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm.analysis.paired_report import BEGIN, END, PAIRS, SIZES, COMMON, carry, extract, render, splice
from lm.cli import paired_study
from lm.errors import run_cli
from tests.textdata import write_corpus

ROOT = Path(__file__).resolve().parents[1]
PAGE = "# Results\n\n## Word level\n\ntable\n\n## What this study cannot say\n\n- caveat\n"


def test_tiny_study_runs_pilot_plan_and_pairs_then_writes_its_section(tmp_path, one_thread, capsys):
    corpus, study, out = write_corpus(tmp_path / "corpus"), tmp_path / "study", tmp_path / "results.md"
    out.write_text(PAGE)
    argv = ["--tiny", str(corpus), "--pilot", "2", "--jobs", "1", "--max-pairs", "3", "--budget-min", "60",
            "--study-dir", str(study), "--out", str(out)]
    assert paired_study.main(argv) == 0
    assert len(re.findall(r"seed \d+: train ", capsys.readouterr().out)) == 6  # 3 pairs
    for arm in ("wd_flipout", "weight_drop"):
        assert sorted(p.name for p in (study / "word" / arm).glob("seed*") if p.is_dir()) == ["seed1", "seed2", "seed3"]
    plan = json.loads((study / "word" / "paired_plan.json").read_text())
    assert plan["pilot"] == 2 and plan["target"] == 3 and plan["pilot_sd"] > 0 and plan["needed"] >= 2
    page = out.read_text()
    section = extract(page)
    assert section is not None and page.replace(section, "") == PAGE.replace("## What this study cannot say",
                                                                              "\n\n## What this study cannot say")
    assert "Tiny mode" in section and "3 paired seeds" in section and "**Conclusion.**" in section
    assert "### Mult. Gauss + Flipout against Mult. Gauss (char level)\n\n**Not run yet**" in section
    # the same command again trains nothing new and writes the same section (the date-free page)
    stamps = {p: p.stat().st_mtime_ns for p in study.rglob("results.json")}
    assert paired_study.main(argv) == 0
    again = capsys.readouterr().out
    assert not re.search(r"seed \d+: (train|resume|restart) ", again) and again.count("exists, skipped") == 6
    assert {p: p.stat().st_mtime_ns for p in study.rglob("results.json")} == stamps
    assert extract(out.read_text()) == section
    assert paired_study.main([*argv, "--report-only"]) == 0 and extract(out.read_text()) == section


def test_budget_caps_the_pairs(tmp_path, one_thread):
    corpus, study, out = write_corpus(tmp_path / "corpus"), tmp_path / "study", tmp_path / "results.md"
    argv = ["--tiny", str(corpus), "--pilot", "2", "--jobs", "1", "--budget-min", "1e-6", "--study-dir", str(study),
            "--out", str(out), "--pair", "char"]
    assert paired_study.main(argv) == 0
    plan = json.loads((study / "char" / "paired_plan.json").read_text())
    assert plan["affordable"] == 2 and plan["target"] == 2  # the pilot already spent the budget
    assert not (study / "char" / "flipout" / "seed3").exists()
    assert "Mult. Gauss + Flipout against Mult. Gauss (char level), 2 paired seeds" in out.read_text()


def test_dry_run_prints_the_commands_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "results.md"
    assert paired_study.main(["--dry-run", "--study-dir", str(tmp_path / "s"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--config word_wd_flipout.yaml" in text and "--config word_weight_drop.yaml" in text
    assert "--seeds 1 2 3 4 5 6" in text and "--data.train_tokens 50000" in text
    assert not out.exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--pilot", "1"], "--pilot 1: a paired SD needs at least 2 pairs"),
    (["--power", "1.5"], "--power 1.5: give a probability"),
    (["--tiny", "/nonexistent/corpus"], "--tiny /nonexistent/corpus: no train.txt there"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert run_cli(paired_study.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sizes_are_the_study_scripts():
    text = (ROOT / "scripts" / "study.sh").read_text()
    for name, level in (("WORD", "word"), ("CHAR", "char")):
        value = re.search(rf'^{name}="([^"]*)"', text, re.M | re.S).group(1)
        assert shlex.split(value) == SIZES[level], level
    assert shlex.split(re.search(r'^COMMON="([^"]*)"', text, re.M).group(1)) == COMMON
    for pair in PAIRS.values():  # the arms' configs exist
        assert (ROOT / "configs" / f"{pair.level}_{pair.flipout}.yaml").is_file()
        assert (ROOT / "configs" / f"{pair.level}_{pair.shared}.yaml").is_file()


def test_unrun_section_says_so_and_splices_idempotently():
    section = render({})
    assert section.startswith(BEGIN) and section.endswith(END)
    assert section.count("**Not run yet**") == len(PAIRS) and "Conclusion" not in section
    once = splice(PAGE, section)
    assert once.index(BEGIN) < once.index("## What this study cannot say") and splice(once, section) == once
    # a page rewritten by the study report keeps the section
    assert extract(carry(once, PAGE)) == section and carry(PAGE, PAGE) == PAGE


def test_script_help_runs():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "paired_study.sh"), "--help"], capture_output=True, text=True,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0 and "--budget-min" in r.stdout


def test_run_pairs_alternates_arms_in_chunks_of_jobs(tmp_path):
    calls = []
    code = paired_study.run_pairs(PAIRS["word"], tmp_path, [1, 2, 3], 2, None, lambda argv: calls.append(argv) or 0)
    assert code == 0
    got = [(a[a.index("--config") + 1], a[a.index("--seeds") + 1: a.index("--parallel")], a[a.index("--parallel") + 1])
           for a in calls]
    assert got == [("word_wd_flipout.yaml", ["1", "2"], "2"), ("word_weight_drop.yaml", ["1", "2"], "2"),
                   ("word_wd_flipout.yaml", ["3"], "1"), ("word_weight_drop.yaml", ["3"], "1")]
    assert all(a[a.index("--run-dir") + 1] == str(tmp_path / "word" / a[1][5:-5]) for a in calls)
    interrupted = paired_study.run_pairs(PAIRS["word"], tmp_path, [1, 2, 3], 2, None, lambda argv: 130)
    assert interrupted == 130  # stops at the first interrupted sweep


def _fake_run(study: Path, arm: str, seed: int, ppl: float, wall: float) -> None:
    d = study / "word" / arm / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"test": {"ppl": ppl}, "wall_s": wall}))


def test_plan_arithmetic_and_report_from_known_runs(tmp_path):
    """Four pilot pairs with log-ratios of SD 0.05 around -0.02; runs of 300 s and 240 s, two at a time:
    4.5 machine-minutes per pair, so 60 minutes allow 4 + floor((60 - 18) / 4.5) = 13 pairs."""
    from lm.analysis.paired import pairs_for_power

    study = tmp_path / "study"
    logs = [-0.02 + 0.05 * z for z in (-1.2, 0.9, -0.1, 0.4)]
    for seed, r in enumerate(logs, 1):
        _fake_run(study, "wd_flipout", seed, 400 * math.exp(r), 300.0)
        _fake_run(study, "weight_drop", seed, 400.0, 240.0)
    args = paired_study.build_parser().parse_args(["--pilot", "4", "--budget-min", "60", "--jobs", "2"])
    plan = paired_study.make_plan(PAIRS["word"], study, args)
    sd = float(np.std(logs, ddof=1))
    assert plan["pilot"] == 4 and plan["pilot_sd"] == pytest.approx(sd)
    assert plan["pair_min"] == pytest.approx(4.5) and plan["affordable"] == 13
    assert plan["needed"] == pairs_for_power(math.log(73.20 / 75.71), sd) > 13 and plan["target"] == 13
    out = tmp_path / "results.md"
    assert paired_study.write_section(study, out, tiny=False).startswith("WD+Flipout against WD (word level), 4 paired")
    section = extract(out.read_text())
    assert "Size: the study's" in section and "4 paired seeds" in section and "Not run yet" in section  # char pair


def test_small_p_values_read_p_below_in_prose(tmp_path):
    """Twelve pairs all lower by about 5%: the rank tests' p-values are below 0.001, and the prose says
    'p < 0.001' (it used to print 'p = < 0.001')."""
    study = tmp_path / "study"
    for seed in range(1, 13):
        _fake_run(study, "wd_flipout", seed, 400 * math.exp(-0.05 + 0.001 * seed), 300.0)
        _fake_run(study, "weight_drop", seed, 400.0, 240.0)
    out = tmp_path / "results.md"
    paired_study.write_section(study, out, tiny=False)
    section = extract(out.read_text())
    assert "p = <" not in section
    assert "over 12 non-zero pairs, p < 0.001 (exact)" in section and "higher on 0 seeds, p < 0.001" in section
