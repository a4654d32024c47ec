"""A newcomer's workflow after the quick start: typos reported as typos, seed sweeps that never hide
inside a finished run, compare that writes only where asked, shows the tokens behind every figure
and agrees with results.json, and a best that stays comparable on resume. Each test failed on the
code before its fix. Shared fixtures: tests/conftest.py (``trained``, ``run_copy``)."""

from __future__ import annotations

import json

import pytest

from tests.faults import call, one_line, snapshot
from tests.test_compare import compare, fake_run


# -- the command line and the config before the run directory --------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--optim.lrr", "0.001"], ["unknown config key 'optim.lrr'", "valid keys in optim"]),
    (["--train.max_step", "10"], ["unknown config key 'train.max_step'", "max_steps"]),
    (["--trian.max_steps", "10"], ["unknown config key 'trian'", "valid sections"]),
    (["--train.max_steps", "ten"], ["train.max_steps", "'ten'"]),
    (["--model.hidden_size", "-3"], ["model.hidden_size=-3"]),
])
def test_typos_are_reported_before_an_existing_run_directory(capsys, run_copy, args, needles):
    cfg, run = run_copy
    before = snapshot(run)
    for extra in ([], ["--resume"]):
        base = ["--run-dir", run] if extra else ["--config", cfg, "--run-dir", run]
        line = one_line(call(capsys, "train", *base, *extra, *args), 2, *needles)
        assert "already exists" not in line
    assert snapshot(run) == before


def test_missing_config_file_is_reported_before_an_existing_run_directory(capsys, run_copy):
    _, run = run_copy
    one_line(call(capsys, "train", "--config", "quickstart.yml", "--run-dir", run), 2,
             "config file 'quickstart.yml' not found")


# -- seed sweeps --------------------------------------------------------------------------------
def test_seeds_refuse_to_write_inside_a_finished_run(capsys, run_copy):
    cfg, run = run_copy
    before = snapshot(run)
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run, "--seeds", "1", "2"), 2,
             f"{run} is a run directory", f"--run-dir {run}_seeds")
    assert not list(run.glob("seed*")) and snapshot(run) == before


def test_sweep_suggests_a_compare_command_that_shows_its_seeds(capsys, tmp_path, trained):
    cfg, _ = trained
    base = tmp_path / "sweep"
    fake_run(base / "other", valid=9.0)  # an earlier run in the same directory, another config
    code, out, err = call(capsys, "train", "--config", cfg, "--run-dir", base, "--seeds", "3",
                          "--train.max_steps", "2")
    assert code == 0, err
    command = out.strip().splitlines()[-1].split("compare with ")[1]
    assert command == f"python evaluate.py compare {base / 'seed3'}"
    code, text, _ = compare(capsys, *command.split()[3:])
    assert code == 0 and "seed3" in text and "other" not in text


# -- compare ---------------------------------------------------------------------------------------
def test_compare_without_out_writes_nothing(capsys, tmp_path, monkeypatch):
    fake_run(tmp_path / "runs" / "a")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, text, _ = compare(capsys, tmp_path / "runs" / "a")
    assert code == 0 and "| a |" in text and "add --out DIR" in text
    assert not list(work.iterdir()) and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a"]


def test_compare_shows_the_tokens_of_each_figure_and_warns_when_they_differ(capsys, tmp_path):
    fake_run(tmp_path / "smoke", valid=1.8, tokens=(5000, 5000), lr=0.01)
    fake_run(tmp_path / "full", valid=1.6, tokens=(393042, 442423))
    code, text, _ = compare(capsys, tmp_path / "smoke", tmp_path / "full", "--out", tmp_path / "out", "--no-plot")
    assert code == 0
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    assert "valid tokens" in header and "test tokens" in header
    assert "| 5,000 | 5,000 |" in text and "| 393,042 | 442,423 |" in text
    assert ("Not on the same tokens:** the rows above were scored on different tokens (the valid figures on 5,000 "
            "and 393,042 tokens and the test figures on 5,000 and 442,423 tokens") in text
    table = json.loads((tmp_path / "out" / "compare.json").read_text())["tables"][0]
    assert table["tokens_differ"] == {"valid": [5000, 393042], "test": [5000, 442423]}
    code, text, _ = compare(capsys, tmp_path / "full")
    assert "Not on the same tokens" not in text


# -- results.json and compare agree on the best epoch ----------------------------------------------
def test_best_epoch_is_fractional_and_agrees_with_compare(capsys, trained):
    _, run = trained
    results = json.loads((run / "results.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in rows if r["step"] == results["best_step"])
    assert results["best_epoch"] == best["epoch"] and 0 < results["best_epoch"] < 1
    code, text, _ = compare(capsys, run)
    assert code == 0 and f"| {best['epoch']:.2f} |" in text


# -- resume: a best stays comparable ----------------------------------------------------------------
def test_resume_refuses_an_eval_change_that_makes_best_incomparable(capsys, run_copy):
    _, run = run_copy
    results = json.loads((run / "results.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert results["best_valid_tokens"] == results["valid"]["tokens"] == rows[-1]["valid_tokens"]
    before = snapshot(run)
    for override in (["--eval.max_tokens", "1000"], ["--eval.batch_size", "3"]):
        one_line(call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "6", *override), 2,
                 f"{override[0][2:]} cannot change on --resume", f"{results['best_valid_tokens']:,} validation tokens",
                 "evaluate.py")
    assert snapshot(run) == before
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "6", "--eval.bptt", "20")
    assert code == 0, err  # eval.bptt changes the speed only


# -- dynamic evaluation: the defaults help a trained model -------------------------------------------
@pytest.mark.parametrize("rule", ["rms", "sgd"])
def test_dynamic_evaluation_defaults_improve_on_static(capsys, trained, rule):
    """evaluate.py's own defaults (no --dynamic-lr / --dynamic-decay), one stream as Krause, lower the loss."""
    _, run = trained
    code, out, err = call(capsys, "evaluate", run / "best.pt", "--split", "valid", "--max-tokens", "600",
                          "--batch-size", "1", "--dynamic-eval", "--dynamic-rule", rule, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["dynamic"]["tokens"] == result["tokens"]
    assert result["dynamic"]["loss"] < result["loss"] - 0.01, result
