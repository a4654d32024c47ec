"""The fault battery, part 3: an unexpected failure after training has started keeps the training
(lm/train/failure.py), and a run directory without a checkpoint starts afresh (lm/train/rundir.py).
Shared fixtures: tests/conftest.py (``trained``: 4 steps, validations at steps 2 and 4)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lm.train.failure import EXIT_FAILED
from tests.faults import call, one_line, steps

NOISY = ("elapsed_s", "tokens_per_s")  # wall-clock figures differ between any two runs


def _rows(run):
    """metrics.jsonl without its wall-clock figures, floats to 1e-6 relative (the thread count of the
    evaluation can change the summation order: the runs compared may share the cores differently)."""
    return [{k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v
             for k, v in json.loads(line).items() if k not in NOISY}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _fail_once(monkeypatch, target, name):
    """Make ``target.name`` raise the first time it is called (a bug, a missing kernel, a full GPU)."""
    real = getattr(target, name)
    calls = []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("could not create a primitive descriptor (injected)")
        return real(self, *a, **k)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("where", ["evaluate", "_log"])
def test_failure_at_the_first_validation_keeps_the_training(capsys, tmp_path, trained, monkeypatch, where):
    """A failure while validating (scoring, or logging after best.pt was written) saves last.pt from the
    state before that validation; the resume repeats it and ends exactly as the uninterrupted run."""
    from lm.train.checkpoint import load_checkpoint
    from lm.train.trainer import Trainer

    cfg, reference = trained
    run = tmp_path / "run"
    _fail_once(monkeypatch, Trainer, where)
    line = one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), EXIT_FAILED, "RuntimeError",
                    "injected", "at step 2 (validation)", str(run / "traceback.txt"),
                    f"python train.py --run-dir {run} --resume")
    assert "saved" in line and "repeats first" in line
    assert "Traceback (most recent call last)" in (run / "traceback.txt").read_text()
    ck = load_checkpoint(run / "last.pt")
    assert ck["step"] == 2 and ck["pending_validation"] is True
    monkeypatch.undo()
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume")
    assert code == 0, err
    assert steps(run) == [2, 4]
    assert _rows(run) == _rows(reference)
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    assert got["valid"] == pytest.approx(want["valid"], rel=1e-6) and got["best_step"] == want["best_step"]


def test_failure_between_validations_saves_the_current_state(capsys, tmp_path, trained, monkeypatch):
    import lm.train.trainer as trainer_module

    cfg, reference = trained
    run = tmp_path / "run"
    real = trainer_module.ThreadPolicy.maybe_adjust
    calls = []

    def failing(self):
        calls.append(1)
        if len(calls) == 3:  # after step 3: between the validations of steps 2 and 4
            raise ValueError("a bug in the bookkeeping (injected)")
        return real(self)

    monkeypatch.setattr(trainer_module.ThreadPolicy, "maybe_adjust", failing)
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), EXIT_FAILED, "ValueError",
             "at step 3 (loop)", f"saved {run}/last.pt at step 3", "--resume")
    monkeypatch.undo()
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume")
    assert code == 0, err
    assert _rows(run) == _rows(reference)


def test_failure_inside_a_step_keeps_the_last_checkpoint(capsys, tmp_path, trained, monkeypatch):
    from lm.train.checkpoint import load_checkpoint
    from lm.train.trainer import Trainer

    cfg, _ = trained
    run = tmp_path / "run"
    real, calls = Trainer.train_step, []

    def failing(self, x, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (injected)")
        return real(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", failing)
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), EXIT_FAILED, "at step 2 (step)",
             f"{run}/last.pt (step 2) keeps the last good state", "--resume")
    assert load_checkpoint(run / "last.pt")["step"] == 2


def test_failure_at_the_first_step_then_the_same_command_starts_afresh(capsys, tmp_path, trained, monkeypatch):
    from lm.train.trainer import Trainer

    cfg, reference = trained
    run = tmp_path / "run"
    _fail_once(monkeypatch, Trainer, "train_step")
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), EXIT_FAILED, "at step 0",
             "no checkpoint was written yet", "the same command starts the run afresh")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "traceback.txt"]
    monkeypatch.undo()
    code, _, err = call(capsys, "train", "--config", cfg, "--run-dir", run)
    assert code == 0, err
    assert "holds no checkpoint" in err and "starting it afresh" in err
    assert _rows(run) == _rows(reference) and not (run / "traceback.txt").exists()


# -- a run directory without a checkpoint ------------------------------------------------------
def _no_checkpoint(run, cfg):
    """What a run killed before its first last.pt leaves: its config and the lock file."""
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(cfg.read_text())))
    (run / ".lock").write_text("12345\n")


@pytest.mark.parametrize("resume", [False, True])
def test_run_directory_without_checkpoint_starts_afresh(capsys, tmp_path, trained, resume):
    cfg, reference = trained
    run = tmp_path / "run"
    _no_checkpoint(run, cfg)
    args = ["--run-dir", run, "--resume"] if resume else ["--config", cfg, "--run-dir", run]
    code, _, err = call(capsys, "train", *args)
    assert code == 0, err
    assert f"notice: {run} holds no checkpoint" in err and "error" not in err
    assert _rows(run) == _rows(reference)


def test_advice_of_each_refusal_works(capsys, tmp_path, trained):
    """Follow every error's advice to the letter: it never leads to another error."""
    cfg, _ = trained
    run = tmp_path / "run"
    assert call(capsys, "train", "--config", cfg, "--run-dir", run, "--train.max_steps", "2")[0] == 0
    # a finished run: --resume and --force both work
    line = one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), 2, "--resume", "--force")
    assert "already exists" in line
    assert call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "4")[0] == 0
    assert call(capsys, "train", "--config", cfg, "--run-dir", run, "--force", "--train.max_steps", "2")[0] == 0
    # best.pt without last.pt: --resume is not offered; the --force command given works
    (run / "last.pt").unlink()
    line = one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), 2, "--force")
    assert "--resume" not in line
    line = one_line(call(capsys, "train", "--run-dir", run, "--resume"), 2, "no last.pt")
    advice = line.split("train it again with python train.py ")[1].split()
    code, _, err = call(capsys, "train", *advice, "--train.max_steps", "2")
    assert code == 0, err
    # last.pt without config.yaml: --resume (as advised) works from the config in last.pt
    (run / "config.yaml").unlink()
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run), 2, "--resume")
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "4")
    assert code == 0, err
    # a directory of other files: --force is not offered (it would refuse)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("x")
    for extra in ([], ["--force"], ["--resume"]):
        line = one_line(call(capsys, "train", "--config", cfg, "--run-dir", notes, *extra), 2,
                        "not a flipout-lm run directory", "ideas.txt", "another --run-dir")
        assert "--force" not in line and "--resume" not in line
    # nothing to resume: the advised command (with a config) trains
    line = one_line(call(capsys, "train", "--run-dir", tmp_path / "absent", "--resume"), 2, "holds no run")
    assert f"python train.py --config CONFIG --run-dir {tmp_path / 'absent'}" in line
    assert call(capsys, "train", "--config", cfg, "--run-dir", tmp_path / "absent", "--train.max_steps", "2")[0] == 0
    assert torch.load(tmp_path / "absent" / "last.pt", weights_only=True)["step"] == 2
