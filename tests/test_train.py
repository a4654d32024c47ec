"""End-to-end training on the real PTB: outputs, exact resume, schedules, divergence, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train as train_script
from lm.train.checkpoint import load_checkpoint
from lm.train.optim import NonMonotonic
from tests.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[1]


def final_valid_loss(run: Path) -> float:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["valid_loss"]


def test_run_directory_contents(ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path)
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.max_epochs", "1"]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "best.pt", "last.pt", "results.json"}
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("epoch", "step", "lr", "train_loss", "train_ppl", "valid_loss", "valid_ppl", "tokens_per_s",
                "elapsed_s"):
        assert key in record
    results = json.loads((run / "results.json").read_text())
    assert results["params"] > 0 and {"loss", "ppl"} <= results["valid"].keys() <= results["test"].keys() | {"x"}
    ck = load_checkpoint(run / "last.pt")
    assert ck["config"]["data"]["level"] == "word" and isinstance(ck["model"], dict)


def test_resume_is_exact(ptb_dir, tmp_path):
    """2 epochs in one go == 1 epoch, resume, 1 more epoch (same seed, CPU)."""
    cfg = write_tiny(tmp_path, regularizer={"name": "variational", "hidden_p": 0.3, "input_p": 0.2},
                     train={"variable_bptt": True})
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(a)]) == 0
    assert train_script.main(["--config", str(cfg), "--run-dir", str(b), "--train.max_epochs", "1"]) == 0
    assert train_script.main(["--run-dir", str(b), "--resume", "--train.max_epochs", "2"]) == 0
    assert final_valid_loss(a) == final_valid_loss(b)
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 2


def test_mid_epoch_resume_is_exact(ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path, train={"max_epochs": 1, "eval_every_steps": 30})
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(a)]) == 0
    assert train_script.main(["--config", str(cfg), "--run-dir", str(b), "--train.max_steps", "30"]) == 0
    assert train_script.main(["--run-dir", str(b), "--resume", "--train.max_steps", "1000"]) == 0
    assert final_valid_loss(a) == final_valid_loss(b)


def test_nonmonotonic_criterion():
    nm = NonMonotonic(2)
    fired = [nm.step(v) for v in (5.0, 4.0, 3.0, 3.5, 3.6, 2.0, 3.1)]
    # fires when len(log) > 2 and v > min(log[:-2]): only 3.1, worse than 3.0 (min of [5, 4, 3, 3.5]);
    # 3.6 is worse than recent values but not than the best of all but the last two (4.0).
    assert fired == [False, False, False, False, False, False, True]


def test_nonmono_decay_divides_lr(ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path, optim={"schedule": "nonmono_decay", "nonmono": 0, "decay_factor": 4.0,
                                      "lr": 50.0}, train={"max_epochs": 1, "eval_every_steps": 5})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] for r in records)
    for prev, cur in zip(records, records[1:]):  # "lr" is the rate in force after that validation's event
        expected = prev["lr"] / 4 if cur["event"] else prev["lr"]
        assert cur["lr"] == pytest.approx(expected)


def test_nt_asgd_switch_and_resume(ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path, optim={"schedule": "nt_asgd", "nonmono": 0, "lr": 80.0},
                     train={"max_epochs": 1, "eval_every_steps": 5})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "switched to ASGD" in events
    ck = load_checkpoint(run / "last.pt")
    assert ck["asgd"] and any("ax" in s for s in ck["optimizer"]["state"].values())
    assert train_script.main(["--run-dir", str(run), "--resume", "--train.max_epochs", "2"]) == 0


def test_non_finite_loss_stops_and_keeps_checkpoints(ptb_dir, tmp_path, capsys):
    cfg = write_tiny(tmp_path, train={"max_steps": 4, "eval_every_steps": 2})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run), "--train.max_steps", "2"]) == 0
    before = (run / "last.pt").read_bytes()
    ck = load_checkpoint(run / "last.pt")
    ck["model"]["decoder.bias"][:] = float("nan")  # poison the weights the resume starts from
    torch.save(ck, run / "last.pt")
    poisoned = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_script.main(["--run-dir", str(run), "--resume", "--train.max_steps", "4"]) == 1
    err = capsys.readouterr()
    assert "non-finite training loss" in err.out + err.err
    assert (run / "last.pt").read_bytes() == poisoned != before  # nothing overwritten after the failure


def test_sigterm_saves_last_and_prints_resume_command(ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path, data={"train_tokens": 200000}, train={"max_epochs": 50})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--run-dir", str(run)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 60
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Resume with: python train.py --run-dir" in out + err and "Traceback" not in err
    assert load_checkpoint(run / "last.pt")["step"] > 0


def test_adam_is_torch_fused_where_it_applies():
    """The trainer's Adam/AMSGrad uses torch's fused kernel for float CPU/CUDA parameters (one
    kernel per tensor), and its update equals the unfused one up to float rounding."""
    import dataclasses
    from lm.config import Config
    from lm.train.optim import fused_adam_ok, make_optimizer
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 20)), torch.nn.Parameter(torch.randn(20))]
    assert not fused_adam_ok([torch.nn.Parameter(torch.zeros(2, device="meta"))]) and not fused_adam_ok([])
    cfg = Config()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="amsgrad", lr=0.01))
    fused = make_optimizer(cfg, params)
    assert isinstance(fused, torch.optim.Adam) and fused.defaults["fused"] and fused.defaults["amsgrad"]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.Adam(twins, lr=0.01, amsgrad=True)
    for _ in range(5):
        for a, b in zip(params, twins):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step(), plain.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_windows_respect_variable_bptt_max(ptb_dir, tmp_path, monkeypatch):
    """The trainer hands train.variable_bptt_max to the window sampler: with the cap at bptt no window
    is longer than bptt, and without it (same seed) some are (P(> 10) = 0.95 * 0.5 per window)."""
    from lm.train.trainer import Trainer
    seen = []
    real = Trainer.train_step

    def record(self, x, y):
        seen.append(x.size(0))
        return real(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", record)
    cfg = write_tiny(tmp_path, train={"variable_bptt": True, "max_epochs": 1})
    for cap, run in ((["--train.variable_bptt_max", "10"], "capped"), ([], "free")):
        seen.clear()
        assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / run), *cap]) == 0
        longest = max(seen)
        assert (longest == 10) if cap else (longest > 10), (cap, seen)
