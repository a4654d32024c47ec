"""What a training tells its user: the start-up summary, the progress bar, the resumed train loss."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lm.train.trainer as trainer_module
import train as train_script
from lm.train import report
from lm.train.trainer import Trainer
from tests.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[1]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_startup_summary_comes_before_data_loading(ptb_dir, tmp_path, capsys, monkeypatch):
    seen = {}
    real = trainer_module.load_data

    def spy(*args, **kwargs):
        seen["before"] = capsys.readouterr().out
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_data", spy)
    cfg = write_tiny(tmp_path, regularizer={"name": "variational", "hidden_p": 0.3, "input_p": 0.2})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.max_steps", "3"]) == 0
    before, after = seen["before"].splitlines(), capsys.readouterr().out
    assert before[0].startswith(f"flipout-lm: training {run}")
    text = "\n".join(before)
    for part in ("1x16 LSTM", "sgd lr 5", "batch 4 x bptt 10", "at most 3 steps", "seed 7",
                 "variational (hidden_p=0.3, input_p=0.2)", "device      cpu", "threads ", "precision fp32",
                 f"PTB word level from {ptb_dir}", "first 3,000 training tokens"):
        assert part in text, part
    assert "parameters" not in text  # the model is built after the data
    params = json.loads((run / "results.json").read_text())["params"]
    assert "train 3,000 | valid" in after and "vocabulary 10,000" in after
    assert f"{params:,} parameters" in after
    # how the recurrence steps run, with the fused step's one-time build cost (or why it is off)
    assert "  steps       C kernel (" in after or "  steps       off (" in after
    # and which generator draws the noise: Philox where its library loaded, else torch's (and why)
    from lm.nn import fastrand
    assert f"  noise       {fastrand.generator_name('cpu')} (" in after


def test_startup_line_is_flushed_to_a_pipe(ptb_dir, tmp_path):
    """With stdout a pipe (nohup, a batch system), the first line arrives while the run goes on."""
    cfg = write_tiny(tmp_path, train={"max_epochs": 10000})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--run-dir",
                             str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no output within 120 s"
        first = proc.stdout.readline().decode()
        assert first.startswith("flipout-lm: training") and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


class RecordingBar:
    """Stands in for tqdm: records what each bar was created with."""

    bars: list[dict] = []

    def __init__(self, **kwargs) -> None:
        RecordingBar.bars.append(kwargs)

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(message: str) -> None:
        print(message)


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.bars = []
    monkeypatch.setattr(trainer_module, "tqdm", RecordingBar)
    return RecordingBar.bars


def test_progress_total_follows_max_steps(ptb_dir, tmp_path, bars):
    cfg = write_tiny(tmp_path)  # 3000 tokens, batch 4, bptt 10: 75 windows per epoch
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.max_steps", "30"]) == 0
    assert [(b["initial"], b["total"]) for b in bars] == [(0, 30)]
    assert bars[0]["desc"] == "epoch 1/2 (run ends at step 30)"
    bars.clear()  # a resume to step 100 crosses an epoch: 30..75 of epoch 1, then 0..25 of epoch 2
    assert train_script.main(["--run-dir", str(run), "--resume", "--train.max_steps", "100"]) == 0
    assert [(b["initial"], b["total"], b["desc"]) for b in bars] == [
        (30, 75, "epoch 1/2"), (0, 25, "epoch 2/2 (run ends at step 100)")]


def test_progress_without_cap_is_the_epoch(ptb_dir, tmp_path, bars):
    cfg = write_tiny(tmp_path)
    assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    assert [(b["initial"], b["total"], b["desc"]) for b in bars] == [(0, 75, "epoch 1/2"), (0, 75, "epoch 2/2")]


def test_bar_span_and_label():
    assert report.bar_span(100, 0, 0, None) == 100
    assert report.bar_span(100, 0, 0, 40) == 40
    assert report.bar_span(100, 10, 210, 250) == 50  # resumed mid-epoch: 10 done + 40 to go
    assert report.bar_span(100, 0, 500, 2000) == 100
    assert report.bar_label(0, 50, 0, None, 100, 0) == "epoch 1/50"
    assert report.bar_label(4, 50, 400, 450, 100, 0) == "epoch 5/50 (run ends at step 450)"


def test_resumed_train_loss_covers_the_whole_interval(ptb_dir, tmp_path, monkeypatch):
    """Interrupted at step 20 of a 30-step logging interval, then resumed: the same train_loss as one go."""
    cfg = write_tiny(tmp_path, train={"max_epochs": 1, "eval_every_steps": 30})
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(a)]) == 0
    real = Trainer.train_step

    def interrupt_at_20(self, x, y):
        value = real(self, x, y)
        if self.step + 1 == 20:  # as if Ctrl-C arrived during step 20
            self.interrupted = signal.SIGINT
        return value

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_20)
    assert train_script.main(["--config", str(cfg), "--run-dir", str(b)]) == 128 + signal.SIGINT
    monkeypatch.setattr(Trainer, "train_step", real)
    assert not (b / "metrics.jsonl").exists()
    assert train_script.main(["--run-dir", str(b), "--resume"]) == 0
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [30, 60, 75]
    for x, y in zip(ra, rb):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-9)
        assert y["train_ppl"] == pytest.approx(x["train_ppl"], rel=1e-9)


def test_checkpoint_holds_only_the_carried_state(ptb_dir, tmp_path):
    """The saved hidden state is (B, H) per layer, not the window-long buffer it may be a view of."""
    from lm.train.checkpoint import load_checkpoint

    cfg = write_tiny(tmp_path, regularizer={"name": "variational", "hidden_p": 0.3})  # runs on the window kernel
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.max_steps", "2"]) == 0
    for name in ("last.pt", "best.pt"):
        for h, c in load_checkpoint(run / name)["hidden"]:
            for t in (h, c):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
