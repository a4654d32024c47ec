"""The fused C step of the window kernel (lm.nn.lstm_fused, lm/nn/csrc/lstm_step.c, lm.nn.cext).

Every noise combination on both steps (fused and torch) is already run against the reference
loop at a tiny size by tests/test_lstm_kernel.py (the 'packed' and 'packed-torch-step'
backends) and, in bf16, by tests/test_precision.py. Here: a size where the C code splits rows
across threads and each row into several chunks; NaN propagation; the fallback when the compiler
is missing or switched off; the build cache across processes; and that nothing CPU-only is
reachable from another device.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.nn import cext, lstm_fused, lstm_matmul
from lm.nn.lstm import reference_loop
from lm.nn.lstm_kernel import lstm_window
from lm.nn.noise import WindowDraws
from tests import test_lstm_kernel as tk

ROOT = Path(__file__).resolve().parents[1]
needs_fused = pytest.mark.skipif(lstm_fused.library() is None or not lstm_matmul.onednn_linear_available(),
                                 reason=f"fused step unavailable: {cext.status('lstm_step').describe()}")
# T steps, B rows (two threads), H = 300: a row is a 256-element chunk and a 44-element tail
T, B, H = 5, 40, 300


def _case(hidden, flip, cell, zone, dtype, seed=0):
    """tests/test_lstm_kernel.make_case at the size above, weights at LSTM initialisation scale
    (U(-1/√H, 1/√H)-like), where the recurrence is contractive and float32 errors stay ~1e-7."""
    sizes = (tk.T, tk.B, tk.H)
    tk.T, tk.B, tk.H = T, B, H
    try:
        inputs, draws = tk.make_case(hidden, flip, cell, zone, dtype=dtype, seed=seed)
    finally:
        tk.T, tk.B, tk.H = sizes
    with torch.no_grad():
        for x in inputs[3:]:
            x.mul_(H ** -0.5)
    return inputs, draws


def _to32(inputs, draws):
    leaves = [x.detach().float().requires_grad_() for x in inputs]
    f = lambda z: z.float() if isinstance(z, torch.Tensor) else z  # noqa: E731
    flip = None
    if draws.flip is not None:
        flip = type(draws.flip)(leaves[4], draws.flip.sign_in.float(), draws.flip.sign_out.float())
    return leaves, WindowDraws(f(draws.hidden_mask), flip, f(draws.cell_mask), f(draws.zoneout_c), f(draws.zoneout_h))


def _run(fn, inputs, draws):
    """tests/test_lstm_kernel.run with the random linear function drawn in float64 for every dtype."""
    out, (h, c) = fn(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, dtype=torch.float64, generator=gen)).sum() for t in (out, h, c))
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [out, h, c, *[torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]]


CASES = list(itertools.product([False, True], ["none", "per_window", "per_step"], [False, True],
                                ["off", "masks", "expectation"]))


@needs_fused
@pytest.mark.parametrize("hidden,flip,cell,zone", CASES,
                         ids=[f"mask={m}-flip={f}-cell={c}-zoneout={z}" for m, f, c, z in CASES])
def test_fused_step_is_as_accurate_as_the_torch_step(monkeypatch, hidden, flip, cell, zone):
    """Against the float64 reference loop, the fused float32 window errs no more than the torch-op
    float32 window does (both ~1e-7 relative at this scale), for outputs, state and every gradient.
    A wrong index, chunk boundary or thread split is an O(1) error."""
    torch.set_num_threads(2)
    inputs, draws = _case(hidden, flip, cell, zone, torch.float64)
    ref = _run(reference_loop, inputs, draws)
    errors = {}
    for mode in (None, False):
        monkeypatch.setattr(lstm_fused, "FUSED", mode)
        got = _run(lstm_window, *_to32(inputs, draws))
        errors[mode] = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, ref)]
    for name, fused, torch_step in zip(tk.NAMES, errors[None], errors[False]):
        assert fused <= max(4 * torch_step, 1e-6), f"{name}: fused {fused:.2e} vs torch step {torch_step:.2e}"


@needs_fused
def test_fused_step_runs_where_it_applies(monkeypatch):
    """On a CPU with the library built, float32 and bf16 windows take the fused step; fp16, float64
    and FUSED = False do not."""
    calls, forward = [], lstm_fused.window_forward
    monkeypatch.setattr(lstm_fused, "window_forward", lambda *a, **k: calls.append(a) or forward(*a, **k))
    w = torch.randn(8, 2)
    assert lstm_fused.usable(w, None) and lstm_fused.usable(w, torch.bfloat16) == lstm_matmul.onednn_linear_available(torch.bfloat16)
    assert not lstm_fused.usable(w, torch.float16) and not lstm_fused.usable(w.double(), None)
    inputs, draws = _case(True, "per_window", True, "masks", torch.float32)
    lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    assert len(calls) == 1
    monkeypatch.setattr(lstm_fused, "FUSED", False)
    assert not lstm_fused.usable(w, None)


@needs_fused
def test_nan_propagates_through_the_fused_step():
    """A NaN in the gate inputs must reach the outputs and gradients (no -ffast-math: the trainer's
    non-finite guard relies on it), and infinite pre-activations saturate instead of making NaN."""
    inputs, draws = _case(False, "per_window", False, "off", torch.float32)
    with torch.no_grad():
        inputs[0][2, 0, 0] = float("nan")
        inputs[0][1, 1, :H] = float("inf")   # input gate of example 1 at step 1
        inputs[0][1, 2, :H] = -float("inf")
    out, grads = _run(lstm_window, inputs, draws)[0], _run(lstm_window, inputs, draws)[3:]
    assert out[2:, 0].isnan().any() and not out[:2, 0].isnan().any()
    assert not out[:, 1:].isnan().any(), "±inf pre-activations must saturate the gates, not give NaN"
    assert grads[0].isnan().any()


def _fresh_python(code: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@needs_fused
def test_build_is_cached_across_processes(tmp_path):
    """The first process builds (and reports how long it took); a second one loads the cached build."""
    env = {**os.environ, "FLIPOUT_LM_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "from lm.nn import cext; s = cext.status('lstm_step'); print(s.ok, s.seconds > 0, s.describe())"
    first = _fresh_python(code, env)
    assert first.startswith("True True") and "built in" in first
    second = _fresh_python(code, env)
    assert second.startswith("True False") and "cached build" in second
    assert len(list(tmp_path.glob("lstm_step-*.so"))) == 1 and not list(tmp_path.glob("*.tmp*"))


def test_without_a_compiler_the_kernel_falls_back(monkeypatch):
    """No compiler (or FLIPOUT_LM_FUSED=0): the status says why, and the window runs the torch step
    with the same results as the fused one (to float rounding)."""
    inputs, draws = _case(True, "per_step", True, "masks", torch.float32)
    fused = _run(lstm_window, inputs, draws)
    for patch in ("compiler", "env"):
        monkeypatch.setattr(cext, "_LOADED", {})
        if patch == "compiler":
            monkeypatch.setattr(cext, "_compiler", lambda: None)
        else:
            monkeypatch.setenv("FLIPOUT_LM_FUSED", "0")
        status = cext.status("lstm_step")
        assert not status.ok and ("no C compiler" in status.reason or "FLIPOUT_LM_FUSED=0" in status.reason)
        assert lstm_fused.library() is None and not lstm_fused.usable(inputs[3], None)
        fallback = _run(lstm_window, inputs, draws)
        for name, a, b in zip(tk.NAMES, fallback, fused):  # normwise: float32 sums of T·B terms differ in order
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-5, f"{name}: {err:.2e}"
        monkeypatch.undo()
    monkeypatch.setattr(cext, "_LOADED", {})


def test_a_failed_build_falls_back(monkeypatch, tmp_path):
    """A compiler that fails leaves a reason, no half-written library, and the torch step."""
    monkeypatch.setattr(cext, "_LOADED", {})
    monkeypatch.setenv("FLIPOUT_LM_CACHE", str(tmp_path))
    monkeypatch.setattr(cext, "_compiler", lambda: "false")  # /bin/false: exits 1
    status = cext.status("lstm_step")
    assert not status.ok and "failed" in status.reason
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(cext, "_LOADED", {})


@pytest.mark.parametrize("inside", [False, True], ids=["xproj", "projects-x"])
@pytest.mark.parametrize("flip,zone", [("per_window", "masks"), ("none", "expectation")])
def test_no_cpu_only_code_is_reachable_from_another_device(monkeypatch, flip, zone, inside):
    """On the meta device (shapes only, as on CUDA: not 'cpu') the window runs forward and backward
    without touching the C library or oneDNN's CPU ops: CUDA takes the same torch step, also
    where the window projects its input itself (``weight_ih``)."""
    monkeypatch.setattr(lstm_fused, "library", lambda: pytest.fail("C library reached off the CPU"))
    monkeypatch.setattr(lstm_matmul, "Packed", lambda *a: pytest.fail("oneDNN packed op reached off the CPU"))
    inputs, draws = tk.make_case(True, flip, True, zone, dtype=torch.float32)
    meta = [x.detach().to("meta").requires_grad_() for x in inputs]
    to = lambda z: z.to("meta") if isinstance(z, torch.Tensor) else z  # noqa: E731
    flip_meta = None if draws.flip is None else type(draws.flip)(meta[4], to(draws.flip.sign_in), to(draws.flip.sign_out))
    draws = WindowDraws(to(draws.hidden_mask), flip_meta, to(draws.cell_mask), to(draws.zoneout_c), to(draws.zoneout_h))
    extra = {}
    if inside:  # x (T, B, 6) and its projection's weights instead of xproj
        meta[0] = torch.empty(tk.T, tk.B, 6, device="meta", requires_grad=True)
        extra = {"weight_ih": torch.empty(4 * tk.H, 6, device="meta", requires_grad=True),
                 "bias": torch.empty(4 * tk.H, device="meta", requires_grad=True)}
    out, (h, c) = lstm_window(meta[0], (meta[1], meta[2]), meta[3], draws, **extra)
    assert out.device.type == "meta" and out.shape == (tk.T, tk.B, tk.H)
    meta = meta[:4] + list(extra.values())
    grads = torch.autograd.grad((out.sum() + h.sum() + c.sum()), meta)
    assert all(g.device.type == "meta" and g.shape == x.shape for g, x in zip(grads, meta))


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 53), (4 * 70, 70), (1, 5)])
def test_tiled_transpose_matches_torch(dtype, shape):
    """The backward products' weights (W_hhᵀ, ΔŴᵀ): the C tiled transpose equals torch's, bit for
    bit, for shapes that are not multiples of its 32 x 32 tiles."""
    m = torch.randn(shape).to(dtype)
    assert torch.equal(lstm_fused.transposed(m), m.t().contiguous())
    assert torch.equal(lstm_fused.transposed(m.t()), m)  # a non-contiguous input


@needs_fused
@pytest.mark.parametrize("flip", ["none", "per_window"])
def test_second_backward_through_same_graph_is_refused_on_the_fused_step(flip):
    """The C code writes the saved factors through a raw pointer; the kernel still bumps their
    version, so retain_graph + a second backward fails loudly instead of reading reused buffers."""
    inputs, draws = _case(True, flip, False, "off", torch.float32)
    out, _ = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        out.sum().backward()


@needs_fused
def test_pooled_buffers_give_the_same_results_in_any_order():
    """Windows whose graphs overlap (two forwards, then their backwards in reverse order, as the
    layers of a model) and windows that reuse pooled buffers give, bit for bit, what each window
    gives on a fresh pool; the pool holds buffers only between windows."""
    cases = [_case(True, "per_window", True, "masks", torch.float32, seed=k) for k in (0, 1)]

    def window(inputs, draws):
        return lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)

    fresh = []
    for inputs, draws in cases:
        lstm_fused.clear_pool()
        out, (h, c) = window(inputs, draws)
        fresh.append([out, h, c, *torch.autograd.grad(out.sum() + c.sum(), inputs[:4])])
    lstm_fused.clear_pool()
    runs = [window(*case) for case in cases]  # both graphs alive: nothing released yet
    got = [None, None]
    for k in (1, 0):
        out, (h, c) = runs[k]
        got[k] = [out, h, c, *torch.autograd.grad(out.sum() + c.sum(), cases[k][0][:4])]
    assert lstm_fused.POOL.bytes() > 0
    again = window(*cases[0])  # now from pooled buffers
    got.append([again[0], *again[1], *torch.autograd.grad(again[0].sum() + again[1][1].sum(), cases[0][0][:4])])
    for a, b in zip(got[0] + got[1] + got[2], fresh[0] + fresh[1] + fresh[0]):
        assert torch.equal(a, b)
    lstm_fused.clear_pool()
    assert lstm_fused.POOL.bytes() == 0


@needs_fused
@pytest.mark.skipif(not lstm_matmul.onednn_linear_available(torch.bfloat16), reason="no oneDNN bf16 linear here")
@pytest.mark.parametrize("flip", ["none", "per_window"])
def test_bf16_input_projection_is_read_and_differentiated_without_casts(flip):
    """Under bf16 autocast the C step reads the bf16 input projection as it is, and hands back
    the bf16 copy of the gate gradients it writes anyway as that projection's gradient: no
    ``(T, B, 4H)`` cast in either direction, and the saved factors ``fac`` (bf16 here:
    tests/test_bf16_factors.py) go back to the pool.
    The gradient is within one bf16 ulp (normwise) of the torch step's, which keeps float32 factors
    and casts its float32 gate gradients: the bf16 factors add at most half an ulp to each."""
    from torch.profiler import ProfilerActivity, profile

    inputs, draws = _case(True, flip, False, "masks", torch.float32)
    xproj = inputs[0].detach().to(torch.bfloat16).requires_grad_()
    lstm_fused.clear_pool()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = lstm_window(xproj, (inputs[1], inputs[2]), inputs[3], draws)
        (d_x,) = torch.autograd.grad(out.sum() + c.sum(), [xproj])
    casts = [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")
             and any(list(s) == [T, B, 4 * H] for s in e.input_shapes)]
    assert casts == [], casts
    assert d_x.dtype == torch.bfloat16
    assert any(t.numel() == T * B * 4 * H and t.dtype == torch.bfloat16 and t.data_ptr() != d_x.data_ptr()
               for kept in lstm_fused.POOL.free.values() for t in kept)
    # the same window with the torch step, whose xproj is cast to float32 and its gradient back
    lstm_fused.FUSED = False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_out, (_, ref_c) = lstm_window(xproj, (inputs[1], inputs[2]), inputs[3], draws)
        (ref_dx,) = torch.autograd.grad(ref_out.sum() + ref_c.sum(), [xproj])
    finally:
        lstm_fused.FUSED = None
        lstm_fused.clear_pool()
    assert ref_dx.dtype == torch.bfloat16
    scale = ref_dx.float().abs().max()
    assert ((d_x.float() - ref_dx.float()).abs().max() / scale).item() < 2.0**-7  # one bf16 ulp


@pytest.mark.parametrize("step", ["fused", "torch"])
@pytest.mark.parametrize("flip", ["none", "per_window"])
def test_window_that_projects_its_input_matches_a_projection_outside(monkeypatch, step, flip):
    """``lstm_window(x, ..., weight_ih=W, bias=b)`` equals ``lstm_window(F.linear(x, W, b), ...)``:
    outputs, state and the gradients of ``x``, ``W``, ``b``, the state and ``W_hh``, on the C
    step and on the torch step. On the C step its ``(T, B, 4H)`` buffers (the projection and
    ``fac``) come from the pool: a second window reuses the first one's instead of new ones."""
    if step == "fused" and (lstm_fused.library() is None or not lstm_matmul.onednn_linear_available()):
        pytest.skip("fused step unavailable")
    monkeypatch.setattr(lstm_fused, "FUSED", None if step == "fused" else False)
    inputs, draws = _case(True, flip, True, "masks", torch.float32)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, 7, generator=gen).requires_grad_()
    w_ih = (torch.randn(4 * H, 7, generator=gen) / 7 ** 0.5).requires_grad_()
    bias = torch.randn(4 * H, generator=gen).requires_grad_()
    leaves = [x, w_ih, bias, *inputs[1:4]]

    def run(inside: bool):
        state = (inputs[1], inputs[2])
        if inside:
            out, (h, c) = lstm_window(x, state, inputs[3], draws, weight_ih=w_ih, bias=bias)
        else:
            out, (h, c) = lstm_window(torch.nn.functional.linear(x, w_ih, bias), state, inputs[3], draws)
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (out, h, c))
        return [out, h, c, *torch.autograd.grad(loss, leaves)]

    lstm_fused.clear_pool()
    ref, got = run(False), run(True)
    pooled = {t.data_ptr() for kept in lstm_fused.POOL.free.values() for t in kept if t.numel() == T * B * 4 * H}
    again = run(True)
    for a, b, c in zip(got, ref, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, c)
    if step == "fused":
        assert len(pooled) == 2  # the projection and fac
        assert pooled == {t.data_ptr() for kept in lstm_fused.POOL.free.values() for t in kept
                          if t.numel() == T * B * 4 * H}
    lstm_fused.clear_pool()


@needs_fused
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bias_and_flipout_gradients_need_no_window_wide_pass(precision):
    """The C backward sums the bias gradient and writes the window's ``dgates ∘ r`` for ``dΔŴ``
    as it forms the gate gradients: backward runs no ``sum``, ``mul`` or ``mul_`` over a
    ``(T, B, 4H)`` buffer (before: ``fac.sum(0)``, and ``fac.mul_(r)`` twice, or in bf16 a signed
    copy ``dg_low * r``), and the gradients still equal the torch step's."""
    from torch.profiler import ProfilerActivity, profile

    if precision == "bf16" and not lstm_matmul.onednn_linear_available(torch.bfloat16):
        pytest.skip("no oneDNN bf16 linear here")
    torch.set_num_threads(2)
    inputs, draws = _case(True, "per_window", False, "masks", torch.float32)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, 7, generator=gen)
    w_ih = (torch.randn(4 * H, 7, generator=gen) / 7 ** 0.5).requires_grad_()
    bias = torch.randn(4 * H, generator=gen).requires_grad_()
    leaves = [w_ih, bias, inputs[3], draws.flip.delta]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out, (h, c) = lstm_window(x, (inputs[1], inputs[2]), inputs[3], draws, weight_ih=w_ih, bias=bias)
        return torch.autograd.grad(out.sum() + c.sum(), leaves)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = run()
    wide = [e.name for e in prof.events() if e.name in ("aten::sum", "aten::mul", "aten::mul_")
            and any(list(s) in ([T, B, 4 * H], [T * B, 4 * H]) for s in e.input_shapes)]
    assert wide == [], wide
    lstm_fused.FUSED = False
    try:
        ref = run()
    finally:
        lstm_fused.FUSED = None
        lstm_fused.clear_pool()
    tol = 1e-5 if precision == "fp32" else 2.0 ** -6  # a few bf16 ulps: the products round differently
    for name, a, b in zip(["W_ih", "b", "W_hh", "ΔŴ"], got, ref):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("step", ["fused", "torch"])
def test_backward_takes_the_output_gradient_without_a_window_copy(monkeypatch, step):
    """The window returns its output ``(T, B, H)`` and final ``h`` as tensors of their own (the
    output a view of the kernel's ``(T+1, B, H)`` buffer), so autograd hands their gradients to the
    kernel as they are: no ``(T+1, B, H)`` gradient is zero-filled, copied into or added up (slicing
    ``hall[1:]`` and ``hall[-1]`` outside did each, about 3 ms per char window)."""
    from torch.profiler import ProfilerActivity, profile

    if step == "fused" and (lstm_fused.library() is None or not lstm_matmul.onednn_linear_available()):
        pytest.skip("fused step unavailable")
    monkeypatch.setattr(lstm_fused, "FUSED", None if step == "fused" else False)
    inputs, draws = _case(True, "none", False, "masks", torch.float32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out, (h, c) = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
        torch.autograd.grad(out.sum() + h.sum() + c.sum(), inputs[:4])
    whole = [e.name for e in prof.events() if any(list(s) == [T + 1, B, H] for s in e.input_shapes)
             and e.name in ("aten::fill_", "aten::zero_", "aten::copy_", "aten::add", "aten::add_")]
    assert whole == [], whole
    assert out.shape == (T, B, H) and h.shape == (B, H)
    lstm_fused.clear_pool()
