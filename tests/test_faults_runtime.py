"""The fault battery (issue 12), part 2: what can go wrong while a run trains or writes --
divergence, kill -9, batches larger than their data, devices and memory, a full or read-only
disk, a damaged run config, Ctrl-C. Part 1 and the shared fixtures: tests/test_faults.py,
tests/faults.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train as train_script
from lm.config import load_config
from tests.faults import ROOT, call, one_line, snapshot, steps
from tests.textdata import tiny_config, write_config, write_corpus


# -- 9: divergence ----------------------------------------------------------------------------
def _poison_gradients(trainer):
    """A finite loss with an infinite gradient (what a bad batch or overflow produces)."""
    trainer.model.decoder.bias.register_hook(lambda g: g + float("inf"))


@pytest.mark.parametrize("clip", ["0.25", "0"])
def test_non_finite_gradient_stops_before_the_update(capsys, run_copy, clip):
    from lm.train.trainer import Trainer

    _, run = run_copy
    before = snapshot(run)
    cfg = load_config(base=yaml.safe_load((run / "config.yaml").read_text()),
                      overrides=[f"optim.clip={clip}", "train.eval_every_steps=1", "train.max_steps=6"])
    trainer = Trainer(cfg, run, resume=True)
    _poison_gradients(trainer)
    capsys.readouterr()
    assert trainer.fit() == 1
    err = capsys.readouterr().err
    assert "non-finite gradient norm" in err and "last.pt and best.pt in" in err and "keep the last good state" in err
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        assert (run / name).read_bytes() == before[name]


def test_divergence_before_any_checkpoint_says_so(capsys, trained, tmp_path):
    from lm.train.trainer import Trainer

    cfg = load_config(trained[0], ["train.max_steps=3", "train.eval_every_steps=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    _poison_gradients(trainer)
    capsys.readouterr()
    assert trainer.fit() == 1
    out = capsys.readouterr()
    assert "no checkpoint was written yet" in out.err and "keep" not in out.err and "error" not in out.out
    assert not (tmp_path / "run" / "last.pt").exists()


def test_checkpoint_with_non_finite_weights_is_never_written(run_copy):
    from lm.train.trainer import Diverged, Trainer

    _, run = run_copy
    before = (run / "last.pt").read_bytes()
    trainer = Trainer(load_config(base=yaml.safe_load((run / "config.yaml").read_text())), run, resume=True)
    with torch.no_grad():
        trainer.model.decoder.weight[0, 0] = float("nan")
    with pytest.raises(Diverged, match="non-finite weights"):
        trainer.save("last.pt")
    assert (run / "last.pt").read_bytes() == before


# -- 10: after kill -9 ------------------------------------------------------------------------
def test_stale_temporary_files_and_replayed_metrics_rows_are_cleaned(capsys, run_copy):
    _, run = run_copy
    (run / ".last.pt.tmp4242").write_bytes(b"")  # what kill -9 during a checkpoint write leaves
    with open(run / "metrics.jsonl", "a") as f:  # logged after last.pt (step 4), then killed
        f.write(json.dumps({"step": 6, "valid_loss": 1.0}) + "\n" + '{"step": 8, "val')
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "6")
    assert code == 0, err
    assert not list(run.glob(".*.tmp*"))
    assert steps(run) == [2, 4, 6]


# -- 11: batches larger than their data -------------------------------------------------------
@pytest.mark.parametrize("override, key", [(["--train.batch_size", "2000"], "train.batch_size"),
                                          (["--eval.batch_size", "1500"], "eval.batch_size"),
                                          (["--train.bptt", "800"], "train.bptt")])
def test_batch_larger_than_data_fails_at_start(capsys, tmp_path, trained, override, key):
    run = tmp_path / "run"
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", run, *override), 2, key)
    assert not run.exists()  # found before anything was written, not at the first validation


def test_evaluate_max_tokens_smaller_than_batch(capsys, trained):
    one_line(call(capsys, "evaluate", trained[1] / "best.pt", "--max-tokens", "15", "--batch-size", "10"), 2,
             "--max-tokens 15", "lower --batch-size")


# -- 12, 13: devices and memory ---------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path, trained):
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", tmp_path / "r", "--train.device", "cuda"),
             2, "CUDA is not available")
    one_line(call(capsys, "evaluate", trained[1] / "best.pt", "--device", "cuda"), 2, "CUDA is not available")


def test_cuda_device_index_that_does_not_exist():
    from lm.errors import UserError
    from lm.nn.device import resolve_device

    with pytest.raises(UserError, match="cuda:99"):
        resolve_device(f"cuda:{99}")


def test_model_too_large_for_memory(capsys, tmp_path, trained):
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", tmp_path / "r", "--model.hidden_size",
                  "200000"), 2, "too large", "parameters", "GiB", "model.hidden_size=200000")
    assert not (tmp_path / "r").exists()


def test_parameter_estimate_matches_the_model():
    from lm.config import ModelConfig, RegularizerConfig
    from lm.nn.model import LanguageModel, count_parameters
    from lm.train.preflight import parameter_count

    for m in (ModelConfig(emb_size=7, hidden_size=9, num_layers=2), ModelConfig(input="onehot", hidden_size=5),
              ModelConfig(emb_size=6, hidden_size=6, num_layers=3, tie_weights=True),
              ModelConfig(emb_size=4, hidden_size=9, num_layers=3, tie_weights=True)):  # AWD: last layer emb_size
        assert parameter_count(m, 13) == count_parameters(LanguageModel(m, RegularizerConfig(), 13))


# -- 14: disk full, read-only file system, a run directory that is a file ---------------------
def test_disk_full_while_writing_a_checkpoint(capsys, run_copy, monkeypatch):
    import lm.train.checkpoint as checkpoint

    _, run = run_copy
    before = snapshot(run)

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    line = one_line(call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "6"), 3,
                    "cannot write", "disk full", "--resume")
    assert "last.pt" in line and "intact" in line
    for name in ("last.pt", "best.pt"):
        assert (run / name).read_bytes() == before[name]
    assert not list(run.glob(".*.tmp*"))


def test_read_only_file_system(capsys, tmp_path, trained, monkeypatch):
    import lm.files as files
    import lm.train.rundir as rundir

    real_open = os.open

    def read_only_open(path, flags, *a, **kw):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(rundir.os, "open", read_only_open)
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", tmp_path / "r"), 3,
             "Read-only file system", "writable --run-dir")
    monkeypatch.undo()

    def read_only_replace(src, dst, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.os, "replace", read_only_replace)  # the lock worked, then the file system went
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", tmp_path / "r2"), 3,
             "config.yaml", "Read-only file system", "no checkpoint was written yet")
    assert not list((tmp_path / "r2").glob(".*.tmp*"))


def test_run_directory_that_is_a_file(capsys, tmp_path, trained):
    target = tmp_path / "run"
    target.write_text("not a directory")
    for extra in ([], ["--force"]):
        one_line(call(capsys, "train", "--config", trained[0], "--run-dir", target, *extra), 2, "is a file")
    assert target.read_text() == "not a directory"


# -- 15: a damaged run config -----------------------------------------------------------------
@pytest.mark.parametrize("text, needles", [("train: {seed: [1\n", ["config.yaml", "line 2", "YAML syntax"]),
                                           ("model:\n  hiden_size: 5\n", ["config.yaml", "model.hiden_size"])])
def test_damaged_run_config(capsys, run_copy, text, needles):
    _, run = run_copy
    (run / "config.yaml").write_text(text)
    one_line(call(capsys, "train", "--run-dir", run, "--resume"), 2, *needles)


# -- 16: Ctrl-C while starting ----------------------------------------------------------------
def test_ctrl_c_during_start_up(capsys, run_copy, monkeypatch):
    import lm.train.trainer as trainer

    cfg, run = run_copy
    before = snapshot(run)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_data", interrupted)  # Ctrl-C while the data loads
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run, "--force"), 130, "interrupted")
    assert snapshot(run) == before


def test_ctrl_c_during_start_up_in_a_real_process(tmp_path, ptb_dir):
    """SIGINT 2 s after the start: the process is importing torch or tokenizing the full char PTB
    (a fresh data root, so no cache), long before its first step."""
    import signal
    import time

    env = {**os.environ, "FLIPOUT_LM_DATA": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", "quickstart", "--run-dir",
                             str(tmp_path / "run"), "--train.max_steps", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    one_line((proc.returncode, out, err), 130, "interrupted (Ctrl-C) before training started")
    assert not (tmp_path / "run").exists()


# -- 17: checkpoints with non-finite weights --------------------------------------------------
def test_evaluate_and_generate_refuse_non_finite_weights(capsys, trained, tmp_path):
    ck = torch.load(trained[1] / "best.pt", weights_only=True)
    ck["model"]["decoder.bias"][2] = float("nan")
    bad = tmp_path / "run" / "best.pt"
    shutil.copytree(trained[1], bad.parent)
    torch.save(ck, bad)
    one_line(call(capsys, "evaluate", bad), 2, "non-finite weights", "decoder.bias")
    one_line(call(capsys, "evaluate", "generate", bad, "--tokens", "5"), 2, "non-finite weights")


# -- unclear messages: own corpus vocabulary ---------------------------------------------------
def test_own_corpus_vocabulary_changed(capsys, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = write_config(tmp_path / "c.yaml", tiny_config({"path": str(corpus), "tokenizer": "word"},
                                                        train={"max_steps": 2, "eval_every_steps": 2}))
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    with open(corpus / "train.txt", "a") as f:
        f.write("zebras quietly graze\n")
    one_line(call(capsys, "evaluate", run / "best.pt"), 2, str(corpus), "training split")
