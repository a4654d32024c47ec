"""Bad input never shows a traceback: one line naming the problem and the fix, exit code 2,
and nothing already written is lost. Also --help and --list-regularizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate as evaluate_script
import train as train_script
from tests.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[1]


def subprocess_run(script: str, *args: str) -> subprocess.CompletedProcess:
    """A real process: proves no traceback reaches the terminal."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def run(capsys, monkeypatch):
    """Call an entry script's main(argv) in-process (fast); returns a CompletedProcess-like result."""
    def call(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        main = {"train.py": train_script.main, "evaluate.py": evaluate_script.main}[script]
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own --help / usage errors
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_every_key_with_default():
    out = subprocess_run("train.py", "--help")
    assert out.returncode == 0
    from dataclasses import fields

    from lm.config import SECTIONS
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"--{section}.{f.name} (default: {f.default!r})" in out.stdout


def test_list_regularizers(run):
    out = run("train.py", "--list-regularizers")
    assert out.returncode == 0
    from lm.regularizers import REGISTRY
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == list(REGISTRY)


@pytest.mark.parametrize("args, needles", [
    (["--optim.lrr", "0.1"], ["optim.lrr", "valid keys in optim"]),
    (["--bogus.key", "1"], ["bogus", "valid sections"]),
    (["--optim.lr", "abc"], ["optim.lr"]),
    (["--train.batch_size", "1.5"], ["train.batch_size"]),
    (["--optim.lr", "-1"], ["optim.lr", "positive"]),
    (["--regularizer.name", "nope"], ["regularizer.name", "wd_flipout"]),
    (["--regularizer.name", "wd_flipout", "--regularizer.weight_p", "0.3"], ["weight_p", "symmetric"]),
    (["--regularizer.name", "weight_drop", "--regularizer.zoneout_c", "0.2"], ["zoneout_c", "not used"]),
    (["--regularizer.weight_p", "1.5"], ["weight_p", "[0, 1)"]),
    (["--data.level", "byte"], ["data.level", "char, word"]),
    (["--optim.lr"], ["has no value"]),
    (["stray"], ["unrecognised argument"]),
])
def test_bad_config_values(run, tmp_path, args, needles):
    one_line_error(run("train.py", "--config", "quickstart", "--run-dir", str(tmp_path / "r"), *args), *needles)
    assert not (tmp_path / "r").exists()


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  hiden_size: 10\n")
    one_line_error(subprocess_run("train.py", "--config", str(cfg)), "model.hiden_size")


def test_yaml_syntax_error(run, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: [unclosed\n")
    one_line_error(run("train.py", "--config", str(cfg)), "fix the YAML syntax")


def test_missing_config_file(run):
    one_line_error(run("train.py", "--config", "no_such_config.yaml"), "not found")


def test_missing_data(run, tmp_path):
    one_line_error(run("train.py", "--config", "quickstart", "--run-dir", str(tmp_path / "r"),
                       env={"PTB_DIR": str(tmp_path), "FLIPOUT_LM_DATA": str(tmp_path / "d")}), "PTB_DIR")


def test_existing_run_dir_is_not_overwritten(run, ptb_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keep = run_dir / "notes.txt"
    keep.write_text("precious")
    one_line_error(run("train.py", "--config", "quickstart", "--run-dir", str(run_dir)),
                   "not a flipout-lm run directory", "another --run-dir")
    assert keep.read_text() == "precious"


def test_force_replaces_run_dir(ptb_dir, tmp_path):
    """--force replaces a run directory (one of a foreign folder is refused: tests/test_faults.py)."""
    cfg = write_tiny(tmp_path, train={"max_steps": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {seed: 3}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 99}\n')
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run_dir), "--force"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and (run_dir / "results.json").exists()


def test_resume_without_run(run, tmp_path):
    one_line_error(run("train.py", "--run-dir", str(tmp_path / "none"), "--resume"), "cannot resume")


def test_evaluate_missing_checkpoint(run, tmp_path):
    one_line_error(run("evaluate.py", str(tmp_path / "nope.pt")), "not found")


def test_evaluate_corrupt_checkpoint(run, tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    one_line_error(run("evaluate.py", str(bad)), "corrupt")


def test_evaluate_truncated_checkpoint(run, ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path, train={"max_steps": 2})
    assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    data = (tmp_path / "run" / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    one_line_error(run("evaluate.py", str(tmp_path / "cut.pt")), "corrupt")


def test_evaluate_foreign_checkpoint(run, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    one_line_error(run("evaluate.py", str(tmp_path / "foreign.pt")), "not a flipout-lm checkpoint")


def test_evaluate_bad_batch_size(run, ptb_dir, tmp_path):
    cfg = write_tiny(tmp_path, train={"max_steps": 2})
    assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    one_line_error(run("evaluate.py", str(tmp_path / "run" / "best.pt"), "--batch-size", "0"), "--batch-size")
