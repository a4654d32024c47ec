"""Helpers of the fault battery's tests (tests/test_faults.py, tests/test_faults_runtime.py): run an
entry script in-process and check its one-line error. The trained run they break is the
``trained`` / ``run_copy`` fixture pair of tests/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import evaluate as evaluate_script
import train as train_script

ROOT = Path(__file__).resolve().parents[1]


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
