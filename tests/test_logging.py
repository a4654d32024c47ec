"""Logging: metrics.jsonl always; TensorBoard only when switched on, and never a hard dependency."""

from __future__ import annotations

import json
import sys
import types

import pytest

import train as train_script
from tests.textdata import tiny_config, write_config, write_corpus


@pytest.fixture
def cfg(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    return write_config(tmp_path / "tiny.yaml", tiny_config({"path": str(root), "tokenizer": "char"},
                                                            train={"max_steps": 4, "eval_every_steps": 2}))


def test_metrics_jsonl_without_tensorboard(cfg, tmp_path):
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and not (run / "tensorboard").exists()


def test_missing_tensorboard_is_a_clear_error(cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.tensorboard", "true"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e .[tensorboard]" in err and err.count("\n") == 1 and not run.exists()


def test_tensorboard_scalars(cfg, tmp_path, monkeypatch):
    """A stand-in SummaryWriter records what the trainer logs (the real one is torch's, tested there)."""
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.tensorboard", "true"]) == 0
    assert calls[0] == ("dir", str(run / "tensorboard"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        assert ("valid_loss", rec["valid_loss"], rec["step"]) in calls
        assert ("valid_text_bpc", rec["valid_text_bpc"], rec["step"]) in calls
    assert not any(c[0] in ("best", "event") for c in calls)  # flags and strings are not scalars


def test_real_tensorboard_writes_events(cfg, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.tensorboard", "true"]) == 0
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
