"""Both CPU classes on either machine: the precision, benchmark and GPU-check tests once more in a
subprocess that stands in for an AVX2 CPU without bf16 units (AMD Zen 2/3, most laptops).

``ONEDNN_MAX_CPU_ISA=AVX2`` caps oneDNN (no bf16 LSTM, no bf16 linear), ``ATEN_CPU_CAPABILITY=avx2``
caps ATen's kernels, and ``FLIPOUT_LM_MARCH=x86-64-v3`` builds the C step for AVX2 (into a cache of
its own). On an AVX-512 machine this is what covers the AVX2 fallbacks in CI.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "FLIPOUT_LM_MARCH": "x86-64-v3"}
EMULATED_TESTS = ["tests/test_precision.py", "tests/test_bench.py", "tests/test_bench_training.py",
                  "tests/test_gpu_check.py"]

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the AVX2 emulation is for x86-64 CPUs")


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, **AVX2, "FLIPOUT_LM_CACHE": str(tmp_path / "cache")}
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_the_emulation_takes_effect(tmp_path):
    """Under the emulation the probes see an AVX2 CPU without bf16 units and without a bf16 LSTM:
    the emulation reproduces the failure class it stands in for."""
    code = ("import torch; from lm.nn import hardware as h; "
            "print(torch.backends.cpu.get_cpu_capability(), h.bf16_units(), h.fused_lstm(torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "False", "False"]


def test_precision_bench_and_gpu_check_pass_under_avx2(tmp_path):
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        pytest.skip("this suite already runs under the AVX2 emulation")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EMULATED_TESTS],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
