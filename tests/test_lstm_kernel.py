"""The window kernel (lm.nn.lstm_kernel.lstm_window) against the plain autograd loop (lm.nn.lstm.reference_loop).

Every combination of the recurrence's noise hooks: hidden mask, flipout on W_hh (signs per window
or per step), cell-update masks, zoneout masks (training) or expectations (evaluation). Outputs,
final state and gradients w.r.t. the input projection, initial state, W_hh and ΔŴ must agree.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lm.nn import lstm_fused, lstm_matmul
from lm.config import RegularizerConfig
from lm.nn.flipout import Flip, flipout_linear
from lm.nn.lstm import LSTMLayer, reference_loop
from lm.nn.lstm_kernel import lstm_window
from lm.nn.noise import RecurrentNoise, WindowDraws, draw_window
from lm.regularizers import build_regularizer

T, B, H = 6, 3, 5
ZONEOUT = {"off": (None, None), "masks": ("m", "m"), "c only": ("m", None), "h only": (None, "m"),
           "expectation": (0.3, 0.1)}
NAMES = ["out", "h_T", "c_T", "d xproj", "d h0", "d c0", "d W_hh", "d delta"]


def _mask(shape, p, dtype, gen, scale=True):
    keep = (torch.rand(shape, dtype=dtype, generator=gen) > p).to(dtype)
    return keep / (1 - p) if scale else keep


def make_case(hidden: bool, flip: str, cell: bool, zone: str, dtype=torch.float64, seed=0):
    """Leaf inputs (xproj, h0, c0, W_hh, ΔŴ) and the window's draws."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_()  # noqa: E731
    xproj, h0, c0 = rand(T, B, 4 * H), rand(B, H), rand(B, H)
    weight, delta = rand(4 * H, H), rand(4 * H, H)
    draws = WindowDraws()
    if hidden:
        draws.hidden_mask = _mask((B, H), 0.3, dtype, gen)
    if flip != "none":
        draws.flip = Flip.sample(delta, B, T if flip == "per_step" else None, generator=gen)
    if cell:
        draws.cell_mask = _mask((T, B, H), 0.3, dtype, gen)
    zc, zh = ZONEOUT[zone]
    draws.zoneout_c = _mask((T, B, H), 0.5, dtype, gen, scale=False) if zc == "m" else zc
    draws.zoneout_h = _mask((T, B, H), 0.5, dtype, gen, scale=False) if zh == "m" else zh
    return [xproj, h0, c0, weight, delta], draws


def run(fn, inputs, draws, seed=1):
    """Outputs, final state and the gradients of a random linear function of all three."""
    xproj, h0, c0, weight, _ = inputs
    out, (h, c) = fn(xproj, (h0, c0), weight, draws)
    gen = torch.Generator().manual_seed(seed)
    # drawn on the CPU and moved: the same weights on every device (the CUDA tests use this too)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=gen).to(t.device)).sum() for t in (out, h, c))
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return [out, h, c, *grads]


CASES = list(itertools.product([False, True], ["none", "per_window", "per_step"], [False, True], ZONEOUT))


@pytest.mark.parametrize("hidden,flip,cell,zone", CASES,
                         ids=[f"mask={m}-flip={f}-cell={c}-zoneout={z}" for m, f, c, z in CASES])
def test_kernel_matches_reference_float64(hidden, flip, cell, zone):
    inputs, draws = make_case(hidden, flip, cell, zone)
    fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
    for name, a, b in zip(NAMES, fast, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8, msg=lambda m: f"{name}: {m}")


needs_onednn = pytest.mark.skipif(not lstm_matmul.onednn_linear_available(),
                                  reason="oneDNN's prepacked linear is not available in this torch build")


@pytest.fixture(params=["packed", "packed-torch-step", "bmm"], ids=lambda b: f"backend={b}")
def backend(request, monkeypatch):
    """The per-step matmul backends (lm.nn.lstm_matmul). 'packed' (CPU's default) does each step's
    element-wise work in one C call (lm.nn.lstm_fused); 'packed-torch-step' in torch ops."""
    if request.param != "bmm" and not lstm_matmul.onednn_linear_available():
        pytest.skip("oneDNN's prepacked linear is not available in this torch build")
    monkeypatch.setattr(lstm_matmul, "PACKED", False if request.param == "bmm" else None)
    monkeypatch.setattr(lstm_fused, "FUSED", False if request.param == "packed-torch-step" else None)
    return request.param


@needs_onednn
def test_float32_on_cpu_uses_the_packed_backend():
    w = torch.randn(4 * H, H)
    assert lstm_matmul.GateMatmul(w, None, B).packed and lstm_matmul.HiddenGrad(w, w, None, B).packed
    assert not lstm_matmul.GateMatmul(w.double(), None, B).packed  # float64 (the exact tests) uses bmm


def test_without_onednn_the_kernel_falls_back_to_bmm(monkeypatch):
    """A torch without oneDNN (or with it switched off) must take the bmm backend, not fail."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    lstm_matmul.onednn_linear_available.cache_clear()
    try:
        w = torch.randn(4 * H, H)
        assert not lstm_matmul.use_packed(w) and not lstm_matmul.GateMatmul(w, w, B).packed
        inputs, draws = make_case(True, "per_window", False, "masks", dtype=torch.float32)
        fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
        for name, a, b in zip(NAMES, fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    finally:
        lstm_matmul.onednn_linear_available.cache_clear()


@pytest.mark.parametrize("hidden,flip,cell,zone", CASES,
                         ids=[f"mask={m}-flip={f}-cell={c}-zoneout={z}" for m, f, c, z in CASES])
def test_kernel_matches_reference_float32(backend, hidden, flip, cell, zone):
    inputs, draws = make_case(hidden, flip, cell, zone, dtype=torch.float32)
    fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
    for name, a, b in zip(NAMES, fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("parts", [1, 4])
@pytest.mark.parametrize("hidden,flip,cell,zone", [(True, "per_window", True, "masks"),
                                                   (False, "none", False, "off"),
                                                   (True, "none", True, "expectation"),
                                                   (False, "per_step", False, "h only")])
def test_every_matmul_split_matches_reference(monkeypatch, parts, hidden, flip, cell, zone):
    """The per-step matmuls split into 1 or 4 blocks (CPU default: 2, covered above)."""
    monkeypatch.setattr(lstm_matmul, "GEMM_PARTS", parts)
    inputs, draws = make_case(hidden, flip, cell, zone)
    fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
    for name, a, b in zip(NAMES, fast, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_thread_setting_is_restored():
    """The kernel must leave the caller's torch thread setting as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs, draws = make_case(True, "per_window", False, "masks")
        out, (_, c) = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
        assert torch.get_num_threads() == 2
        (out.sum() + c.sum()).backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("zone", ["off", "masks", "expectation"])
def test_no_grad_path_matches_reference(zone):
    """Evaluation (no graph) runs the forward without saving anything for backward."""
    inputs, draws = make_case(True, "per_window", True, zone)
    with torch.no_grad():
        out, (h, c) = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
        r_out, (r_h, r_c) = reference_loop(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_state_without_grad_and_frozen_weight():
    """Detached state (truncated BPTT) and a weight that needs no gradient are fine."""
    inputs, draws = make_case(True, "per_window", False, "masks")
    xproj, h0, c0, weight, delta = inputs
    state = (h0.detach(), c0.detach())
    out, (_, c) = lstm_window(xproj, state, weight.detach(), draws)
    d_x, d_delta = torch.autograd.grad(out.sum() + c.sum(), (xproj, delta))
    r_out, (_, r_c) = reference_loop(xproj, state, weight.detach(), draws)
    r_dx, r_dd = torch.autograd.grad(r_out.sum() + r_c.sum(), (xproj, delta))
    torch.testing.assert_close(d_x, r_dx, rtol=0, atol=1e-8)
    torch.testing.assert_close(d_delta, r_dd, rtol=0, atol=1e-8)


def test_second_backward_through_same_graph_is_refused():
    """Backward reuses its saved buffers in place: retain_graph + a second backward must fail loudly."""
    inputs, draws = make_case(True, "none", False, "off")
    out, _ = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        out.sum().backward()


@pytest.mark.parametrize("flip", ["per_window", "per_step"])
def test_gradients_match_finite_differences(flip):
    """Directional derivatives by central differences, every hook on (one backward per graph)."""
    inputs, draws = make_case(True, flip, True, "masks", seed=3)
    inputs = [x.detach() for x in inputs]
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(s, dtype=torch.float64, generator=gen) for s in ((T, B, H), (B, H), (B, H))]

    def loss(xs):
        xproj, h0, c0, weight, delta = xs
        d = WindowDraws(draws.hidden_mask, Flip(delta, draws.flip.sign_in, draws.flip.sign_out),
                        draws.cell_mask, draws.zoneout_c, draws.zoneout_h)
        out, (h, c) = lstm_window(xproj, (h0, c0), weight, d)
        return sum((t * w).sum() for t, w in zip((out, h, c), weights))

    leaves = [x.clone().requires_grad_() for x in inputs]
    grads = torch.autograd.grad(loss(leaves), leaves)
    eps = 1e-6
    for i, (x, g) in enumerate(zip(inputs, grads)):
        v = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        with torch.no_grad():
            plus = loss([y + eps * v if j == i else y for j, y in enumerate(inputs)])
            minus = loss([y - eps * v if j == i else y for j, y in enumerate(inputs)])
        numeric = (plus - minus) / (2 * eps)
        torch.testing.assert_close((g * v).sum(), numeric, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{NAMES[3 + i]}: {m}")


REGULARIZERS = [
    RegularizerConfig(name="variational", hidden_p=0.25),
    RegularizerConfig(name="semeniuta", cell_p=0.25),
    RegularizerConfig(name="zoneout", zoneout_c=0.5, zoneout_h=0.05),
    RegularizerConfig(name="wd_flipout", weight_p=0.5, perturb_ih=True),
    RegularizerConfig(name="gauss_flipout", sigma=1.0, resample_per_step=True),
]


@pytest.mark.parametrize("cfg", REGULARIZERS, ids=lambda c: c.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_reference(cfg, training):
    """LSTMLayer under a real regularizer's plan equals the reference loop fed the same draws."""
    torch.manual_seed(0)
    layer = LSTMLayer(4, H).double()
    reg = build_regularizer(cfg).train(training)
    x = torch.randn(T, B, 4, dtype=torch.float64)
    state = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))

    def plan() -> RecurrentNoise:  # the same draws twice: each graph is differentiated once
        torch.manual_seed(1)
        return reg.layer_noise(layer, B, T)

    noise = plan()
    torch.manual_seed(2)
    out, (h, c) = layer(x, state, noise)
    (g_fast,) = torch.autograd.grad(out.sum() + c.sum(), layer.weight_hh)

    noise = plan()
    torch.manual_seed(2)
    xproj = flipout_linear(x, noise.weight_ih, noise.flip_ih, layer.rnn.bias_ih_l0 + layer.rnn.bias_hh_l0)
    draws = draw_window(noise, state[0], T)
    r_out, (r_h, r_c) = reference_loop(xproj, state, noise.weight_hh, draws)
    (g_ref,) = torch.autograd.grad(r_out.sum() + r_c.sum(), layer.weight_hh)
    for a, b in ((out, r_out), (h, r_h), (c, r_c), (g_fast, g_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
