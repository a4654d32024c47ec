"""The fault battery (issue 12): nothing a user wrote is lost, and every failure is one line with a
documented exit code (README, "Guarantees"). One test (or more) per failure class; each failed on
the code before the fix. Real PTB (tiny word model) unless a synthetic corpus says enough."""

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

import evaluate as evaluate_script
import train as train_script
from lm.config import load_config
from tests.textdata import tiny_config, write_config, write_corpus
from tests.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ptb_dir):
    """A tiny finished-for-now run: 4 steps, validations (and last.pt) at steps 2 and 4."""
    base = tmp_path_factory.mktemp("faults")
    os.environ["FLIPOUT_LM_DATA"] = str(tmp_path_factory.getbasetemp() / "lm-data")
    cfg = write_tiny(base, train={"max_steps": 4, "eval_every_steps": 2, "progress": False})
    run = base / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    return cfg, run


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run (and its config file)."""
    cfg, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return cfg, copy


def call(capsys, script, *args):
    """main(argv) of an entry script in-process; returns (exit code, stdout, stderr)."""
    main = {"train": train_script.main, "evaluate": evaluate_script.main}[script]
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # would stop pytest itself
        code = "KeyboardInterrupt escaped"
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(result, code, *needles):
    got, _, err = result
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("notice:")]
    assert got == code, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


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

    def read_only_open(path, flags, *a):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(rundir.os, "open", read_only_open)
    one_line(call(capsys, "train", "--config", trained[0], "--run-dir", tmp_path / "r"), 3,
             "Read-only file system", "writable --run-dir")
    monkeypatch.undo()

    def read_only_replace(src, dst):
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
