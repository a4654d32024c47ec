"""Mixed precision (lm.nn.precision): the numerical policy, the window kernel in bf16, the oneDNN probe.

Tolerance of the bf16-vs-float32 comparisons (``bf16_tolerance``). bfloat16 keeps 8 significant
bits: rounding a number to it changes it by a relative error of at most ``u = 2^-8``. In mixed
precision every matmul rounds its two operands to bf16 (and, on a CPU, its float32-accumulated
result once more), so each term ``a_k b_k`` of a length-``K`` product carries a relative error
of at most ``3u``. On the fused C step the saved backward factors are stored in bf16 too
(lm.nn.lstm_fused), one more rounding of every gate gradient (and of ``σ(f)`` in the carried
``dc``) before it enters a product: ``4u`` per term. Everything else runs in float32 (errors
~2^-24, negligible). The errors of
the ``K`` terms are independent and of either sign, so the product's error grows like
``sqrt(K)`` rather than ``K`` (the probabilistic rounding-error bound of Higham & Mary, SIAM J.
Sci. Comput. 2019: ``|error| <= lambda sqrt(K) u sum_k |a_k b_k|`` with probability at least
``1 - 2 exp(-lambda^2 / 2)``). Normwise, with ``lambda = 2`` and the four roundings: ``max |bf16 -
fp32| <= 2 * 4 * sqrt(K) * u * max |fp32|``, where ``K`` is the longest reduction in the window
(``4H`` for ``dgates W_hh``, ``T * B`` for the weight gradients, ``in`` and ``H`` for the
forward products). The weights are at LSTM initialisation scale, where the recurrence is
contractive and step errors do not compound. For the sizes below (K = 160) that allows 101u
(0.40); a real mistake (a missing term, a mask in the wrong place) is an O(1) relative error,
256u.
"""

from __future__ import annotations

import math

import pytest
import torch

from lm.config import RegularizerConfig as R
from lm.nn import hardware, lstm_fused, lstm_matmul
from lm.nn.lstm import LSTMLayer
from lm.nn.precision import Precision, autocast_dtype, set_tf32, tf32_flags
from lm.regularizers import build_regularizer

T, B, IN, H = 20, 8, 16, 32
U_BF16 = 2.0**-8

REGULARIZERS = {  # the layer-level view: dropout's input/output masks act outside the layer (model.py)
    "none": R(name="none"),
    "dropout": R(name="dropout", input_p=0.25, output_p=0.25),
    "variational": R(name="variational", hidden_p=0.25),
    "semeniuta": R(name="semeniuta", cell_p=0.25),
    "zoneout": R(name="zoneout", zoneout_c=0.5, zoneout_h=0.05),
    "weight_drop": R(name="weight_drop", weight_p=0.5),
    "gauss": R(name="gauss", sigma=1.0),
    "wd_flipout": R(name="wd_flipout", weight_p=0.5, perturb_ih=True),
    "gauss_flipout": R(name="gauss_flipout", sigma=1.0),
    "gauss_flipout_per_step": R(name="gauss_flipout", sigma=1.0, resample_per_step=True),
}
NAMES = ["out", "h_T", "c_T", "d x", "d h0", "d c0", "d W_ih", "d W_hh", "d b_ih", "d b_hh"]


def bf16_tolerance() -> float:
    """Normwise relative tolerance of a bf16 window against float32 (see the module docstring)."""
    k = max(IN, H, 4 * H, T * B)
    return 2 * 4 * math.sqrt(k) * U_BF16


def _run(reg, layer, x, state, dtype, device="cpu"):
    """Outputs, final state and gradients of a random linear function of them, under ``dtype`` autocast."""
    torch.manual_seed(1)
    noise = reg.layer_noise(layer, B, T)
    torch.manual_seed(2)
    xs, h0, c0 = (t.clone().requires_grad_() for t in (x, *state))
    with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out, (h, c) = layer(xs, (h0, c0), noise)
    gen = torch.Generator(device=device).manual_seed(3)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen, device=device)).sum() for t in (out, h, c))
    grads = torch.autograd.grad(loss, [xs, h0, c0, *layer.parameters()])
    return [out, h, c, *grads]


def compare_bf16(name: str, device: str = "cpu") -> list[float]:
    """Run one regularizer's layer in float32 and in bf16; check dtypes and the tolerance; return the errors."""
    torch.manual_seed(0)
    layer = LSTMLayer(IN, H).to(device)
    reg = build_regularizer(REGULARIZERS[name]).train(True)
    x = torch.randn(T, B, IN, device=device)
    state = (0.5 * torch.randn(B, H, device=device), 0.5 * torch.randn(B, H, device=device))
    ref = _run(reg, layer, x, state, None, device)
    low = _run(reg, layer, x, state, torch.bfloat16, device)
    for label, t in zip(NAMES[1:], low[1:]):  # the carried state and every gradient stay float32
        assert t.dtype == torch.float32, f"{name}: {label} is {t.dtype}"
    errors = []
    for label, a, b in zip(NAMES, low, ref):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        tol = bf16_tolerance()
        assert err <= tol, f"{name}: {label} differs by {err / U_BF16:.1f}u > {tol / U_BF16:.0f}u"
        errors.append(err)
    noise = reg.layer_noise(layer, B, T)
    fallback = device == "cpu" and not (hardware.fused_lstm if noise.fused else hardware.onednn_linear)(torch.bfloat16)
    if fallback and (noise.fused or noise.flip_ih is None):
        # no oneDNN bf16 LSTM (fused) or linear (window kernel) on this CPU: float32, bit for bit
        assert max(errors) == 0, f"{name}: the float32 fallback differs from float32"
    else:  # (a flipout input projection outside the window kernel stays in bf16 under the fallback)
        assert max(errors) > 0, f"{name}: bf16 gave float32's numbers bit for bit: the matmuls did not run in bf16"
    return errors


@pytest.fixture(params=["packed", "packed-torch-step", "bmm"], ids=lambda b: f"backend={b}")
def backend(request, monkeypatch):
    """The per-step matmul backends (lm.nn.lstm_matmul). 'packed' (CPU's default) does each step's
    element-wise work in one C call (lm.nn.lstm_fused); 'packed-torch-step' in torch ops."""
    if request.param != "bmm" and not lstm_matmul.onednn_linear_available(torch.bfloat16):
        pytest.skip("oneDNN's prepacked linear has no bf16 here")
    monkeypatch.setattr(lstm_matmul, "PACKED", False if request.param == "bmm" else None)
    monkeypatch.setattr(lstm_fused, "FUSED", False if request.param == "packed-torch-step" else None)
    return request.param


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_bf16_layer_agrees_with_float32(backend, name):
    """Every regularizer (window kernel or fused path), both matmul backends: outputs and gradients
    within the bf16 tolerance of float32, state and gradients float32."""
    compare_bf16(name)


def test_bf16_kernel_uses_the_chosen_backend(monkeypatch):
    """The bf16 window takes the packed backend where oneDNN has bf16, and bmm when it is switched off."""
    w = torch.randn(4 * H, H)
    expected = lstm_matmul.onednn_linear_available(torch.bfloat16)
    assert lstm_matmul.GateMatmul(w, w, B, torch.bfloat16).packed == expected
    monkeypatch.setattr(lstm_matmul, "PACKED", False)
    assert not lstm_matmul.GateMatmul(w, w, B, torch.bfloat16).packed


def test_onednn_probe_is_not_poisoned_by_autocast():
    """Probed first inside autocast, the answer must equal the one probed outside (it used to be
    False for the rest of the process: the reference product ran in bf16)."""
    lstm_matmul.onednn_linear_available.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = {d: lstm_matmul.onednn_linear_available(d) for d in (torch.float32, torch.bfloat16)}
        lstm_matmul.onednn_linear_available.cache_clear()
        outside = {d: lstm_matmul.onednn_linear_available(d) for d in (torch.float32, torch.bfloat16)}
        assert inside == outside
        if torch.backends.mkldnn.is_available():
            assert outside[torch.float32], "oneDNN is present but its float32 linear was probed unusable"
        assert not lstm_matmul.onednn_linear_available(torch.float64)  # per dtype: float64 has no packed path
    finally:
        lstm_matmul.onednn_linear_available.cache_clear()


def test_tf32_flags_are_set_explicitly():
    """The policy sets cuBLAS and cuDNN alike, off by default (PyTorch's own cuDNN default is on)."""
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN
        Precision("fp32", "cpu")
        assert tf32_flags() == {"matmul": False, "cudnn": False, "float32_matmul_precision": "highest"}
        p = Precision("bf16", "cpu", tf32=True)
        assert tf32_flags() == {"matmul": True, "cudnn": True, "float32_matmul_precision": "high"}
        assert p.describe()["tf32"]["cudnn"] is True and p.describe()["precision"] == "bf16"
    finally:
        set_tf32(False)


def test_policy_autocast_and_scaler():
    assert autocast_dtype("cpu") is None
    with Precision("bf16", "cpu").autocast():
        assert autocast_dtype("cpu") is torch.bfloat16
    with Precision("fp32", "cpu").autocast():
        assert autocast_dtype("cpu") is None
    assert Precision("fp16", "cpu").scaler().is_enabled()
    assert not Precision("bf16", "cpu").scaler().is_enabled()
    desc = Precision("fp32", "cpu").describe()
    assert desc["torch"] == torch.__version__ and desc["device"] == "cpu" and desc["device_name"]


@pytest.mark.parametrize("available", [True, False], ids=["oneDNN-has-it", "oneDNN-lacks-it"])
@pytest.mark.parametrize("name,probe", [("none", "fused_lstm"), ("zoneout", "onednn_linear")],
                         ids=["fused-layer", "window-kernel"])
def test_layers_fall_back_to_float32_without_onednn_bf16(available, name, probe):
    """With the probe forced either way: where oneDNN has no bf16 LSTM (fused layer) or no bf16
    linear (window kernel) the layer runs in float32 (float32's numbers, bit for bit); where it has
    one, in bf16 (different numbers)."""
    if available and not getattr(hardware, probe)(torch.bfloat16):
        pytest.skip(f"oneDNN has no bf16 {probe} on this CPU")
    torch.manual_seed(0)
    layer = LSTMLayer(IN, H)
    reg = build_regularizer(REGULARIZERS[name]).train(True)
    x, state = torch.randn(T, B, IN), (torch.zeros(B, H), torch.zeros(B, H))
    torch.manual_seed(1)
    ref, _ = layer(x, state, reg.layer_noise(layer, B, T))
    torch.manual_seed(1)
    with hardware.force(**{f"{probe}_bfloat16": available}), torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = layer(x, state, reg.layer_noise(layer, B, T))
    assert h.dtype == c.dtype == torch.float32
    assert torch.equal(out.float(), ref) != available


def test_lstm_probe_is_immune_to_the_context_of_its_first_call():
    """Probed first inside inference mode under float16 autocast, the bf16 answer equals the one
    probed in a plain context (a probe that inherited the context would answer for the wrong dtype)."""
    hardware._fused_lstm_probe.cache_clear()
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
            inside = [hardware.fused_lstm(d) for d in (torch.bfloat16, torch.float16)]
        hardware._fused_lstm_probe.cache_clear()
        assert inside == [hardware.fused_lstm(d) for d in (torch.bfloat16, torch.float16)]
    finally:
        hardware._fused_lstm_probe.cache_clear()


@pytest.mark.parametrize("units", [True, False])
def test_the_plan_says_what_runs_in_which_dtype(units):
    """The start-up summary's precision line and its notices follow the probes, forced either way."""
    with hardware.force(fused_lstm_bfloat16=units, onednn_linear_bfloat16=units, bf16_units=units, isa="AVX2"):
        plan, notices = Precision("bf16", "cpu").plan()
        desc = Precision("bf16", "cpu").describe()
    assert plan.startswith("bf16: ") and "matmuls in bf16" in plan and "state, loss and optimizer in float32" in plan
    assert ("fused layers (oneDNN LSTM) in bf16" in plan) == units and ("fused layers in float32" in plan) != units
    assert any("no bf16 units" in n for n in notices) != units
    assert any("has no bf16 LSTM on this CPU (AVX2)" in n for n in notices) != units
    assert ("window kernels in float32" in plan) != units and any("no bf16 matmul" in n for n in notices) != units
    assert desc["machine"]["isa"] == "AVX2" and desc["machine"]["bf16_units"] == units and desc["plan"] == plan
    assert Precision("fp32", "cpu").plan() == ("fp32: everything in float32", [])


def test_fp16_on_cpu_runs_the_fused_layer():
    """oneDNN has no fp16 CPU LSTM: under fp16 autocast the fused layer runs in float32 instead of failing."""
    layer = LSTMLayer(IN, H)
    reg = build_regularizer(R(name="none")).train(True)
    state = (torch.zeros(B, H), torch.zeros(B, H))
    with torch.autocast("cpu", dtype=torch.float16):
        out, (h, c) = layer(torch.randn(T, B, IN), state, reg.layer_noise(layer, B, T))
    assert h.dtype == c.dtype == torch.float32 and torch.isfinite(out).all()


# -- training and evaluation ------------------------------------------------------------------


def test_precision_key_is_validated():
    from lm.config import load_config
    from lm.errors import UserError

    assert load_config(overrides=["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(UserError, match="train.precision='fp8' is invalid: expected one of fp32, bf16, fp16"):
        load_config(overrides=["train.precision=fp8"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_and_evaluation_in_low_precision(ptb_dir, tmp_path, capsys, precision):
    """A window-kernel run trains, writes its precision into results.json, keeps float32 weights
    (and, in fp16, the gradient scaler's state in last.pt); evaluate.py --precision scores it."""
    import json

    import evaluate as evaluate_script
    import train as train_script
    from lm.train.checkpoint import load_checkpoint
    from tests.tiny import write_tiny

    cfg = write_tiny(tmp_path, train={"max_steps": 3, "precision": precision},
                     regularizer={"name": "wd_flipout", "weight_p": 0.5})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["precision"]["precision"] == precision and results["precision"]["torch"] == torch.__version__
    assert results["precision"]["tf32"]["matmul"] is False and results["precision"]["device_name"]
    assert math.isfinite(results["valid"]["loss"])
    ck = load_checkpoint(run / "last.pt")
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
    assert all(t.dtype == torch.float32 for layer in ck["hidden"] for t in layer)
    assert ("scaler" in ck) == (precision == "fp16")
    capsys.readouterr()
    for p in ("fp32", "bf16"):
        assert evaluate_script.main([str(run / "best.pt"), "--split", "valid", "--json", "--precision", p,
                                     "--max-tokens", "2000"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["precision"]["precision"] == p
        # the same weights scored in fp32 and bf16 differ by bf16 rounding only (loss ~ 6.9 nats: < 1%)
        assert abs(out["loss"] - results["valid"]["loss"]) < 0.01 * results["valid"]["loss"]
