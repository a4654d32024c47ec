"""The C step's own σ and tanh (fexp, ftanh in lm/nn/csrc/lstm_step.c) against torch and the exact values.

The step computes them inline (no libm call) so that gcc vectorises them at the loop's full
width; they must be as accurate as torch's own float32 kernels, to about an ulp, and keep IEEE's
special values: ±inf saturates, NaN stays NaN, the sign of zero survives, and σ's tail reaches
the subnormals as torch's does.
"""

from __future__ import annotations

import platform
import re
import shlex
import subprocess

import pytest
import torch

from lm.nn import cext, lstm_fused

needs_lib = pytest.mark.skipif(lstm_fused.library() is None, reason=f"no C step: {cext.status('lstm_step').describe()}")


def _act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = torch.empty_like(x), torch.empty_like(x)
    lstm_fused.library().lstm_activations(x.data_ptr(), s.data_ptr(), t.data_ptr(), x.numel())
    return s, t


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in float32 ulps at the exact value (elements whose value is a normal float)."""
    r = exact.float().abs()
    ulp = (torch.nextafter(r, torch.tensor(float("inf"))) - r).double()
    keep = exact.abs() > 1e-37
    return ((got.double() - exact).abs() / ulp)[keep]


@needs_lib
def test_sigmoid_and_tanh_are_as_accurate_as_torchs():
    """Over 3M arguments from 1e-2 to 100 in scale (every branch and the range reduction's
    boundaries), the largest error against the float64 value is within 1 ulp of torch's own
    largest error, and the mean error within 0.05 ulp of torch's."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(400_000, generator=g) * s for s in (0.01, 0.3, 1, 3, 10, 30)]
                  + [torch.linspace(-100, 100, 600_001)])
    sig, th = _act(x)
    xd = x.double()
    for name, got, theirs, exact in (("sigmoid", sig, torch.sigmoid(x), torch.sigmoid(xd)),
                                     ("tanh", th, torch.tanh(x), torch.tanh(xd))):
        ours, torchs = _ulps(got, exact), _ulps(theirs, exact)
        assert ours.max() <= torchs.max() + 1.0, f"{name}: max {ours.max():.2f} ulp, torch {torchs.max():.2f}"
        assert ours.mean() <= torchs.mean() + 0.05, f"{name}: mean {ours.mean():.3f} ulp, torch {torchs.mean():.3f}"


@needs_lib
def test_special_values_as_torch():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 88.7, -88.7, 89.5, -87.0, -104.5,
                      -200.0, 200.0, 1e-30, -1e-30, 0.625, -0.625])
    sig, th = _act(x)
    for got, want in ((sig, torch.sigmoid(x)), (th, torch.tanh(x))):
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        torch.testing.assert_close(got[ok], want[ok], rtol=3e-7, atol=0)  # the subnormal tail too
        assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))  # tanh(-0) = -0
    assert sig[0] == 1 and sig[1] == 0 and th[0] == 1 and th[1] == -1


def _gcc() -> str | None:
    cc = cext._compiler()
    return cc if cc and "gcc" in cext._version_line(cc).lower() else None


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or _gcc() is None,
                    reason="gcc on x86 (its -fopt-info report)")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v4"], ids=["avx2", "avx512"])
def test_activation_loops_vectorise_on_avx2_and_avx512(tmp_path, march):
    """gcc vectorises the forward step's loops with σ, tanh and zoneout's lerp for AVX2 as for
    AVX-512, with the build flags of lm.nn.cext. (Without -fno-trapping-math an AVX2 build kept
    them scalar, since AVX2 vectors have no masks to compute both sides of a select safely, and
    its forward step ran 3x slower.)"""
    src = cext.CSRC / "lstm_step.c"
    lines = src.read_text().splitlines()
    loops = set()
    for i, line in enumerate(lines):
        if "sigm(gi[k])" in line or "ftanh(cc)" in line:
            j = i
            while "LOOP" not in lines[j]:
                j -= 1
            loops.add(j + 1)
    assert len(loops) == 3
    flags = [f for f in cext.flags(True) if not f.startswith("-march=")]
    done = subprocess.run([*shlex.split(_gcc()), *flags, f"-march={march}", "-fopt-info-vec-optimized",
                           "-o", str(tmp_path / "step.so"), str(src), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    vectorised = {int(n) for n in re.findall(r"lstm_step\.c:(\d+):\d+: optimized: loop vectorized", done.stderr)}
    assert loops <= vectorised, f"scalar loops at lines {sorted(loops - vectorised)} for -march={march}"
