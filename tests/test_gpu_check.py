"""scripts/gpu_check.sh: the dry run (the same steps on the CPU at tiny sizes) writes every file and
a summary; bad arguments get one line and exit code 2. (About 30 s of CPU time.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_writes_everything(ptb_dir, tmp_path):
    out = tmp_path / "gc"
    proc = _run("--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("env.json", "pytest_cuda.xml", "steps.json", "steps.md", "throughput.json", "throughput.md",
                 "train/metrics.jsonl", "summary.md", "train_curve.png"):
        assert (out / name).is_file(), name
    steps = json.loads((out / "steps.json").read_text())  # the new steps ran on the CPU (Triton: interpreted)
    assert {(r["kind"], r["step"]) for r in steps} == {
        ("nn_lstm", "cudnn"), *((k, s) for k in ("zoneout", "wd_flipout")
                                for s in ("torch", "triton", "triton_graph (capture off)"))}
    assert all(r["ms"] is not None and r["ms"] > 0 for r in steps), [r.get("error") for r in steps]
    records = json.loads((out / "throughput.json").read_text())
    assert {r["precision"] for r in records} == {"fp32", "bf16"}
    assert {r["name"] for r in records} == {"nn_lstm", "none", "zoneout", "wd_flipout", "gauss_flipout"}
    curve = [json.loads(line) for line in (out / "train/metrics.jsonl").read_text().splitlines()]
    assert len(curve) >= 2 and all("valid_bpc" in r for r in curve)
    summary = (out / "summary.md").read_text()
    assert "skipped (of" in summary  # the cuda tests ran (and skipped, without a GPU)
    assert "| char | bf16 | wd_flipout | window |" in summary and "train speed-up" in summary
    assert "| step | epoch |" in summary and "_missing" not in summary
    assert "| char | fp32 | wd_flipout | triton |" in summary


def test_bad_arguments_exit_2(tmp_path):
    proc = _run("--dry-run")
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr
    proc = _run("--out", str(tmp_path), "--bogus")
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
    (tmp_path / "old.txt").write_text("keep me")
    proc = _run("--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 2 and "not empty" in proc.stderr and (tmp_path / "old.txt").read_text() == "keep me"
