"""The fault battery (issue 12), part 1: starting, resuming and configuring a run. Nothing a user
wrote is lost, and every failure is one line with a documented exit code (docs/guarantees.md).
One test (or more) per failure class; each failed on the code before the fix. Real PTB (tiny word
model) unless a synthetic corpus says enough. Part 2 (training, devices, disk, Ctrl-C):
tests/test_faults_runtime.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import train as train_script
from lm.config import load_config
from tests.faults import ROOT, call, one_line, snapshot, steps
from tests.textdata import tiny_config, write_corpus


# -- 1, 2: --force ----------------------------------------------------------------------------
@pytest.mark.parametrize("override", [["--eval.batch_size", "100000"], ["--train.batch_size", "100000"]])
def test_force_checks_everything_before_deleting(capsys, run_copy, override):
    cfg, run = run_copy
    before = snapshot(run)
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", run, "--force", *override), 2,
             override[0][2:], "too few")
    assert snapshot(run) == before


def test_force_refuses_a_directory_that_is_not_a_run(capsys, tmp_path, trained):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("precious")
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", notes, "--force"), 2,
             "not a flipout-lm run directory", "ideas.txt")
    assert (notes / "ideas.txt").read_text() == "precious"


# -- 3: one run per directory -----------------------------------------------------------------
HOLD = ("import fcntl, os, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.truncate(0); f.write(str(os.getpid())); f.flush()\nprint('locked', flush=True)\ntime.sleep(120)\n")


def test_second_start_on_a_locked_run_directory_names_the_holder(capsys, run_copy):
    cfg, run = run_copy
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        one_line(call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "6"), 2,
                 f"in use by process {holder.pid}")
        one_line(call(capsys, "train", "--config", cfg, "--run-dir", run, "--force"), 2, str(holder.pid))
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_two_trainings_started_together_on_one_directory(tmp_path, trained):
    """The battery's case: both used to exit 0 and leave a mixture. Now one trains, the other exits 2."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(trained[0]), "--run-dir", str(run),
           "--train.max_steps", "20", "--train.eval_every_steps", "10", "--train.progress", "false"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err for _, _, err in results]
    loser = next(err for code, _, err in results if code == 2)
    assert "in use by process" in loser or "already exists" in loser, loser
    assert steps(run) == [10, 20]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 20


def test_lock_of_a_dead_process_does_not_block(capsys, tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999\n")  # left by a killed run: no process holds the flock
    code, _, err = call(capsys, "train", "--config", trained[0], "--run-dir", run, "--train.max_steps", "2")
    assert code == 0, err
    assert (run / ".lock").read_text().strip() != "999999"  # it held the lock while running


# -- 4, 5, 8: --resume ------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [(["--optim.name", "adam"], "optim.name"),
                                          (["--train.batch_size", "8"], "train.batch_size"),
                                          (["--model.hidden_size", "32"], "model.hidden_size"),
                                          (["--data.train_tokens", "2500"], "data.train_tokens")])
def test_resume_refuses_overrides_that_cannot_apply(capsys, run_copy, override, key):
    _, run = run_copy
    before = snapshot(run)
    one_line(call(capsys, "train", "--run-dir", run, "--resume", *override), 2, key, "cannot change on --resume")
    assert snapshot(run) == before  # config.yaml not rewritten: a plain --resume still works


def test_plain_resume_works_after_a_refused_override(capsys, run_copy):
    _, run = run_copy
    one_line(call(capsys, "train", "--run-dir", run, "--resume", "--optim.name", "adam"), 2, "optim.name")
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume", "--train.max_steps", "6")
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["name"] == "sgd"


def test_resume_lr_override_sets_the_current_rate_and_is_logged(capsys, run_copy):
    from lm.train.checkpoint import load_checkpoint

    _, run = run_copy
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume", "--optim.lr", "0.5", "--train.max_steps", "6")
    assert code == 0, err
    assert load_checkpoint(run / "last.pt")["lr"] == 0.5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == 0.5 and "lr set to 0.5 on resume (was 5)" in rows[-1]["event"]
    assert [r["event"] for r in rows[:-1]] == ["", ""]


def test_resume_allows_what_does_not_change_the_run(capsys, run_copy, ptb_dir):
    """A moved PTB copy, and a config.yaml that a resume rewrote before it crashed (stopping keys differ
    from last.pt's): neither is a foreign checkpoint."""
    _, run = run_copy
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["max_epochs"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    code, _, err = call(capsys, "train", "--run-dir", run, "--resume", "--data.ptb_dir", f"{ptb_dir}/",
                        "--train.max_steps", "6")
    assert code == 0, err
    assert steps(run) == [2, 4, 6]


def test_resume_refuses_a_last_pt_of_another_run(capsys, run_copy, tmp_path):
    cfg, run = run_copy
    other = tmp_path / "other"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(other), "--train.seed", "8",
                              "--train.max_steps", "2"]) == 0
    shutil.copy(other / "last.pt", run / "last.pt")  # same shapes, another run
    one_line(call(capsys, "train", "--run-dir", run, "--resume"), 2, "belongs to another run", "train.seed")


# -- 6, 15: data cache ------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "shorten", "out_of_range"])
def test_damaged_data_cache_is_rebuilt_with_a_notice(tmp_path, monkeypatch, capsys, damage):
    from lm.data.custom import load_data

    monkeypatch.setenv("FLIPOUT_LM_DATA", str(tmp_path / "data"))
    cfg = load_config(base=tiny_config({"path": str(write_corpus(tmp_path / "corpus")), "tokenizer": "word"}))
    good = load_data(cfg)
    (cache,) = (tmp_path / "data" / "cache").glob("text-*.pt")
    payload = torch.load(cache, weights_only=True)
    if damage == "flip":
        payload["valid"][3] = (int(payload["valid"][3]) + 1) % len(payload["vocab"])
    elif damage == "shorten":
        payload["train"] = payload["train"][:-7].clone()
    else:  # a consistent checksum, but ids the vocabulary does not have
        from lm.data.corpus import _digest

        payload["test"][0] = len(payload["vocab"]) + 5
        payload["check"]["sha256"] = _digest(payload)
    torch.save(payload, cache)
    capsys.readouterr()
    again = load_data(cfg)
    err = capsys.readouterr().err
    assert "data cache" in err and "rebuilding it" in err and len(err.strip().splitlines()) == 1
    assert all(torch.equal(good.split(s), again.split(s)) for s in ("train", "valid", "test"))
    assert load_data(cfg) is not None and "rebuilding" not in capsys.readouterr().err  # rebuilt cache is intact


# -- 7 and unclear messages: config files and overrides ---------------------------------------
def test_duplicate_yaml_key_is_refused(capsys, tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("train:\n  seed: 1\n  seed: 2\n")
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", tmp_path / "r"), 2, "'seed' appears twice",
             "lines 2 and 3")
    cfg.write_text("model:\n  hidden_size: 8\nmodel:\n  num_layers: 1\n")
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", tmp_path / "r"), 2, "'model' appears twice")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, needles", [
    ("model: 5\n", ["model must be a mapping"]),
    ("model:\n  hidden_size: 8\n  num_layers: [1\n", ["line 4", "fix the YAML syntax"]),
])
def test_config_file_messages(capsys, tmp_path, text, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    one_line(call(capsys, "train", "--config", cfg, "--run-dir", tmp_path / "r"), 2, *needles)


def test_override_without_value_before_another_override(capsys, tmp_path):
    one_line(call(capsys, "train", "--config", "quickstart", "--run-dir", tmp_path / "r", "--optim.lr",
                  "--train.max_steps", "20"), 2, "--optim.lr has no value")


def test_directory_as_config(capsys, tmp_path):
    one_line(call(capsys, "train", "--config", tmp_path), 2, "is a directory")
