"""``train.py --seeds``: sibling run directories, skip finished, resume interrupted, config checks."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

import train as train_script
from lm.train.checkpoint import load_checkpoint
from lm.cli.sweep import config_differences
from lm.train.trainer import Trainer
from tests.textdata import tiny_config, write_config, write_corpus


@pytest.fixture
def cfg(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    return write_config(tmp_path / "tiny.yaml", tiny_config({"path": str(root), "tokenizer": "char"},
                                                            train={"max_steps": 6, "eval_every_steps": 3}))


def sweep(cfg, base, *extra) -> int:
    return train_script.main(["--config", str(cfg), "--run-dir", str(base), "--seeds", "1", "2", *extra])


def test_sweep_skips_finished_and_resumes_interrupted(cfg, tmp_path, capsys, monkeypatch):
    base = tmp_path / "sw"
    step = Trainer.train_step

    def ctrl_c_in_seed2(self, x, y):  # Ctrl-C during seed 2's fifth step
        if self.cfg.train.seed == 2 and self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_seed2)
    assert sweep(cfg, base) == 128 + signal.SIGINT  # the sweep stops with the run's exit code
    assert (base / "seed1" / "results.json").is_file() and not (base / "seed2" / "results.json").exists()
    assert load_checkpoint(base / "seed2" / "last.pt")["step"] == 5
    monkeypatch.undo()
    finished = (base / "seed1" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert sweep(cfg, base) == 0  # the same command continues the sweep
    assert "seed 1 skip, seed 2 resume" in capsys.readouterr().out
    assert (base / "seed1" / "results.json").stat().st_mtime_ns == finished
    for seed in (1, 2):
        run = base / f"seed{seed}"
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
        results = json.loads((run / "results.json").read_text())
        assert results["seed"] == seed and results["steps"] == 6


def test_run_without_checkpoint_restarts(cfg, tmp_path, capsys):
    base = tmp_path / "sw"
    (base / "seed2").mkdir(parents=True)
    (base / "seed2" / "config.yaml").write_text("crashed before its first checkpoint\n")
    capsys.readouterr()
    assert sweep(cfg, base) == 0
    assert "seed 1 train, seed 2 restart" in capsys.readouterr().out
    assert (base / "seed2" / "results.json").is_file()


def test_changed_config_is_refused(cfg, tmp_path, capsys):
    base = tmp_path / "sw"
    assert sweep(cfg, base) == 0
    capsys.readouterr()
    assert sweep(cfg, base, "--optim.lr", "0.5") == 2
    err = capsys.readouterr().err
    assert "trained with another config (differs in optim.lr)" in err and "--force" in err
    assert sweep(cfg, base, "--optim.lr", "0.5", "--force") == 0
    assert yaml.safe_load((base / "seed1" / "config.yaml").read_text())["optim"]["lr"] == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1", "1"], "repeats a seed"),
    (["--seeds", "1", "--train.seed", "4"], "contradict"),
])
def test_bad_seed_arguments(cfg, tmp_path, capsys, extra, message):
    assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_default_run_directory_and_runtime_keys(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_script.main(["--config", str(cfg), "--seeds", "5"]) == 0
    assert (tmp_path / "runs" / "tiny" / "seed5" / "results.json").is_file()
    assert config_differences({"train": {"threads": 1, "seed": 1}}, {"train": {"threads": 2, "seed": 2}}) == [
        "train.seed"]
