"""bench/throughput.py runs end to end on tiny sizes and writes the documented JSON records."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "size", "device", "train_tokens_per_s", "eval_tokens_per_s", "ratio_vs_nn_lstm", "peak_mem_mb"}


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tiny_run_writes_json(throughput, tmp_path, capsys):
    out = tmp_path / "t.json"
    names = ["none", "variational", "zoneout", "wd_flipout"]
    code = throughput.main(["--tiny", "--threads", "1", "--rounds", "1", "--only", ",".join(names),
                            "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert {(r["size"], r["name"]) for r in records} == {(s, n) for s in ("char", "word")
                                                         for n in ["nn_lstm", *names]}
    for r in records:
        assert KEYS <= set(r), r
        assert r["device"] == "cpu"
        assert r["train_tokens_per_s"] > 0 and r["eval_tokens_per_s"] > 0 and r["ratio_vs_nn_lstm"] > 0
        assert r["peak_mem_mb"] > 0 or math.isnan(r["peak_mem_mb"])
    kernels = {r["name"]: r["kernel"] for r in records}
    assert kernels["none"] == "fused" and kernels["variational"] == "window"
    table = capsys.readouterr().out
    assert "| char | fp32 | wd_flipout | window |" in table


def test_precisions_compared_in_one_run(throughput, tmp_path, capsys):
    """--precision fp32,bf16: every record says its precision; the bf16-over-fp32 table is printed."""
    out = tmp_path / "p.json"
    code = throughput.main(["--tiny", "--threads", "1", "--rounds", "1", "--sizes", "char",
                            "--only", "none,wd_flipout", "--precision", "fp32,bf16", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert sorted((r["precision"], r["name"]) for r in records) == sorted(
        (p, n) for p in ("fp32", "bf16") for n in ("nn_lstm", "none", "wd_flipout"))
    text = capsys.readouterr().out
    assert "| char | bf16 | wd_flipout | window |" in text
    assert "low precision against fp32" in text and "| char | bf16 | nn_lstm |" in text


def test_unknown_names_are_rejected(throughput):
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--precision", "fp8"])
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--precision", "fp16"])  # CPU: no fp16 nn.LSTM to compare with
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--only", "no_such_regularizer"])
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--sizes", "byte"])


@pytest.fixture(scope="module")
def flipout_gemm():
    spec = importlib.util.spec_from_file_location("bench_flipout_gemm", ROOT / "bench" / "flipout_gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flipout_gemm_probe_prints_a_row_per_size(flipout_gemm, capsys):
    module = flipout_gemm
    assert module.main(["--sizes", "8", "16", "--batch", "2", "--threads", "1", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [8, 16]
    assert all(float(r[2]) >= 0 and float(r[3]) >= 0 and float(r[4]) > 0 for r in rows)  # ms round to 0 at tiny H


def test_flipout_gemm_window_floor_prints_both_ratios(flipout_gemm, capsys):
    module = flipout_gemm
    assert module.main(["--window", "--sizes", "8", "--batch", "2", "--steps", "3", "--input", "5",
                        "--threads", "1", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    backends = ["bmm"] + (["packed"] if module.lstm_matmul.onednn_linear_available() else [])
    assert [r[1] for r in rows] == backends and all(int(r[0]) == 8 for r in rows)
    assert all(float(v) > 0 for r in rows for v in r[5:7])  # the two floors: nn.LSTM time over matmul-only time
