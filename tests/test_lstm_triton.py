"""The Triton step (lm.nn.lstm_triton) against the plain autograd loop, under Triton's interpreter.

``FLIPOUT_LM_STEP=triton`` with ``TRITON_INTERPRET=1`` runs the very kernels a GPU runs on CPU
tensors (through numpy): every noise combination of tests/test_lstm_kernel.py in float32, outputs
and every gradient; a hidden size that is not a power of two (5) and a batch that does not fill
a block (3 rows of 4), and the same with blocks smaller than the shape (several partial blocks
each way); the window's own input projection (the bias and its gradient sums); evaluation
without a graph; and short trainings that end at the same validation loss as the default step.
Without triton these tests skip, except under CI (``CI=true``), where that is a failure.
bf16/fp16 rounding is checked on a GPU only (tests marked ``cuda``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from lm.errors import UserError
from lm.nn import steps
from lm.nn.flipout import flipout_linear
from lm.nn.lstm import reference_loop
from lm.nn.lstm_kernel import lstm_window
from test_lstm_kernel import CASES, NAMES, B, H, T, make_case, run

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _need_triton() -> None:
    if not HAVE_TRITON:
        if os.environ.get("CI"):
            pytest.fail("triton is not installed under CI: .ci/run installs it (pip install triton==3.9.0)")
        pytest.skip("triton not installed (pip install triton==3.9.0)")


def _use_interpreter(monkeypatch):
    """The Triton step on CPU tensors: ``FLIPOUT_LM_STEP=triton``, ``TRITON_INTERPRET=1``."""
    _need_triton()
    # triton imported first, before the interpreter is switched on (torch may import it early):
    # the kernels must not rely on tl's library functions being interpreted
    import triton  # noqa: F401
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(steps.ENV, "triton")
    _load_kernels(interpreted=True)
    from lm.nn import lstm_triton
    return lstm_triton


def _load_kernels(interpreted: bool) -> None:
    """Triton decides at decoration whether a kernel is interpreted: re-execute the kernels'
    module when this process loaded them the other way (lm.nn.lstm_triton reads them through it)."""
    kernels = sys.modules.get("lm.nn.triton_kernels")
    if kernels is not None and (type(kernels.forward_step).__name__ == "InterpretedFunction") != interpreted:
        importlib.reload(kernels)


@pytest.fixture
def interpreter(monkeypatch):
    return _use_interpreter(monkeypatch)


def _launches(monkeypatch, module) -> dict:
    """Count the Triton step's windows, so that no test passes on another step."""
    count = {"forward": 0, "backward": 0}
    for name in count:
        real = getattr(module, f"window_{name}")

        def wrapped(*args, _real=real, _name=name, **kw):
            count[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(module, f"window_{name}", wrapped)
    return count


def _close(fast, ref, tol=1e-5):
    for name, a, b in zip(NAMES, fast, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("hidden,flip,cell,zone", CASES,
                         ids=[f"mask={m}-flip={f}-cell={c}-zoneout={z}" for m, f, c, z in CASES])
def test_triton_step_matches_reference_float32(interpreter, monkeypatch, hidden, flip, cell, zone):
    count = _launches(monkeypatch, interpreter)
    inputs, draws = make_case(hidden, flip, cell, zone, dtype=torch.float32)
    fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
    assert count == {"forward": 1, "backward": 1}
    _close(fast, ref)


@pytest.mark.parametrize("hidden,flip,cell,zone", [(True, "per_step", True, "masks"), (False, "none", False, "off"),
                                                   (True, "per_window", False, "expectation")])
def test_partial_blocks_both_ways(interpreter, monkeypatch, hidden, flip, cell, zone):
    """Blocks of 2 rows x 4 units over B=3, H=5: two partial blocks each way."""
    monkeypatch.setattr(interpreter, "BLOCK_B", 2)
    monkeypatch.setattr(interpreter, "BLOCK_H", 4)
    assert interpreter.blocks(B, H)[2] == (2, 2)
    inputs, draws = make_case(hidden, flip, cell, zone, dtype=torch.float32, seed=5)
    _close(run(lstm_window, inputs, draws), run(reference_loop, inputs, draws))


@pytest.mark.parametrize("block_b", [4, 2])
def test_window_projection_and_bias_gradient(interpreter, monkeypatch, block_b):
    """With ``weight_ih`` the window projects its input and the kernel adds the bias; the bias
    gradient from the kernel's per-row sums (one row block or two)."""
    monkeypatch.setattr(interpreter, "BLOCK_B", block_b)
    inputs, draws = make_case(True, "per_window", True, "masks", dtype=torch.float32, seed=2)
    _, h0, c0, w, _ = inputs
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, 7, generator=gen).requires_grad_()
    w_ih = torch.randn(4 * H, 7, generator=gen).requires_grad_()
    bias = torch.randn(4 * H, generator=gen).requires_grad_()
    leaves = (x, w_ih, bias, h0, c0, w, inputs[4])

    def grads(fn):
        out, (h, c) = fn()
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h.sum() - 2 * c.sum()
        return [out, *torch.autograd.grad(loss, leaves)]
    fast = grads(lambda: lstm_window(x, (h0, c0), w, draws, weight_ih=w_ih, bias=bias))
    ref = grads(lambda: reference_loop(flipout_linear(x, w_ih, None, bias), (h0, c0), w, draws))
    for name, a, b in zip(["out", "d x", "d W_ih", "d b", "d h0", "d c0", "d W_hh", "d delta"], fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("zone", ["off", "masks", "expectation"])
def test_no_grad_path_matches_reference(interpreter, zone):
    inputs, draws = make_case(True, "per_step", True, zone, dtype=torch.float32)
    with torch.no_grad():
        out, (h, c) = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
        r_out, (r_h, r_c) = reference_loop(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_second_backward_through_same_graph_is_refused(interpreter):
    inputs, draws = make_case(True, "none", False, "off", dtype=torch.float32)
    out, _ = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        out.sum().backward()


def test_switch_errors_name_the_fix(monkeypatch):
    w = torch.zeros(4 * H, H)
    monkeypatch.setenv(steps.ENV, "cuda-graphs")
    with pytest.raises(UserError, match="not a step: use one of auto, torch, triton"):
        steps.choose(w, None)
    monkeypatch.setenv(steps.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="TRITON_INTERPRET=1" if HAVE_TRITON else "pip install triton"):
        steps.choose(w, None)
    assert steps.choose(w.double(), None) == "torch"  # float64 (the exact tests) keeps the torch step
    monkeypatch.setenv(steps.ENV, "torch")
    assert steps.choose(w, None) == "torch"


# -- a short training with the switch ends where it ends without it ---------------------------

WINDOW_REGULARIZERS = {
    "variational": {"hidden_p": 0.25},
    "semeniuta": {"cell_p": 0.25},
    "zoneout": {"zoneout_c": 0.5, "zoneout_h": 0.05},
    "wd_flipout": {"weight_p": 0.5},
    "gauss_flipout": {"sigma": 0.5, "resample_per_step": True},
    "bbb_flipout": {},
}


def _train(tmp_path, name: str, options: dict) -> tuple[float, dict]:
    import train as train_script
    from tests.tiny import write_tiny

    tmp_path.mkdir()
    cfg = write_tiny(tmp_path, regularizer={"name": name, **options}, model={"hidden_size": 6, "emb_size": 6},
                     data={"level": "word", "train_tokens": 400},
                     train={"max_steps": 2, "eval_every_steps": 2, "bptt": 4, "batch_size": 3, "progress": False},
                     eval={"batch_size": 10, "bptt": 5, "max_tokens": 50})  # the interpreter is slow: few steps
    run_dir = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run_dir)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    return records[-1]["valid_loss"], weights


@pytest.mark.parametrize("name", list(WINDOW_REGULARIZERS))
def test_training_with_the_switch_ends_at_the_same_loss(ptb_dir, tmp_path, monkeypatch, name):
    _need_triton()
    monkeypatch.delenv(steps.ENV, raising=False)
    default = _train(tmp_path / "default", name, WINDOW_REGULARIZERS[name])
    lstm_triton = _use_interpreter(monkeypatch)
    count = _launches(monkeypatch, lstm_triton)
    switched = _train(tmp_path / "triton", name, WINDOW_REGULARIZERS[name])
    assert count["forward"] >= 2 and count["backward"] == 2, count  # two training windows ran on it
    # float32 rounding of two updates at lr 5 (measured: <= 3e-8 in every weight, the same loss)
    assert switched[0] == pytest.approx(default[0], abs=1e-5)
    for key, value in default[1].items():
        if value.is_floating_point():
            torch.testing.assert_close(switched[1][key], value, rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


# -- on a GPU: the compiled kernels (scripts/gpu_check.sh runs these with -m cuda) -------------

@pytest.fixture
def gpu_triton(monkeypatch):
    """The compiled Triton step on CUDA tensors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (scripts/gpu_check.sh)")
    _need_triton()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(steps.ENV, "triton")
    _load_kernels(interpreted=False)
    from lm.nn import lstm_triton
    return lstm_triton


CUDA_CASES = [(True, "per_window", True, "masks"), (False, "per_step", False, "expectation"),
              (False, "none", False, "off"), (True, "none", False, "h only")]


@pytest.mark.cuda
@pytest.mark.parametrize("hidden,flip,cell,zone", CUDA_CASES)
def test_compiled_step_matches_reference_on_cuda_float32(gpu_triton, monkeypatch, hidden, flip, cell, zone):
    from test_cuda import _to_cuda
    from lm.nn.precision import set_tf32

    set_tf32(False)
    count = _launches(monkeypatch, gpu_triton)
    inputs, draws = _to_cuda(*make_case(hidden, flip, cell, zone, dtype=torch.float32))
    fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
    assert count == {"forward": 1, "backward": 1} and fast[0].is_cuda
    _close(fast, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hidden,flip,cell,zone", CUDA_CASES)
def test_compiled_step_low_precision_agrees_with_torch_step(gpu_triton, monkeypatch, dtype, hidden, flip, cell, zone):
    """Under autocast both steps round the same operands (the products' left operands and weights
    to ``dtype``, float32 accumulation); they differ only where float32 ordering flips a rounding."""
    from test_cuda import _to_cuda

    inputs, draws = _to_cuda(*make_case(hidden, flip, cell, zone, dtype=torch.float32, seed=4))
    with torch.autocast("cuda", dtype=dtype):
        fast = run(lstm_window, inputs, draws)
        monkeypatch.setenv(steps.ENV, "torch")
        ref = run(lstm_window, inputs, draws)
    exact = run(reference_loop, inputs, draws)
    for name, a, b, e in zip(NAMES, fast, ref, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name} vs torch step: {m}")
        torch.testing.assert_close(a, e, rtol=5e-2, atol=5e-2, msg=lambda m: f"{name} vs float32: {m}")


@pytest.mark.cuda
def test_compiled_step_several_blocks_on_cuda(gpu_triton):
    """A char-like shape: 37 rows and 200 units over 4 x 128 blocks (partial in both directions)."""
    gen = torch.Generator().manual_seed(0)
    batch, hid, steps_ = 37, 200, 9
    xproj = torch.randn(steps_, batch, 4 * hid, generator=gen).cuda().requires_grad_()
    h0, c0 = (torch.randn(batch, hid, generator=gen).cuda().requires_grad_() for _ in range(2))
    w = (0.1 * torch.randn(4 * hid, hid, generator=gen)).cuda().requires_grad_()
    from lm.nn.noise import WindowDraws
    from lm.nn.precision import set_tf32

    set_tf32(False)
    draws = WindowDraws(zoneout_c=(torch.rand(steps_, batch, hid, generator=gen) < 0.3).float().cuda())
    fast = run(lstm_window, [xproj, h0, c0, w, w], draws)
    ref = run(reference_loop, [xproj, h0, c0, w, w], draws)
    _close(fast, ref, tol=1e-4)
