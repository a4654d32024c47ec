"""The fused C step under bf16: its saved backward factors in bf16, and the one-pass bf16 transpose
of the backward products' weights (lm.nn.lstm_fused, lm/nn/csrc/lstm_step.c).

The factors' effect on the window's outputs and gradients is bounded by tests/test_precision.py
(every regularizer, against float32, with the tolerance that counts their rounding); here: what is
stored and when.
"""

from __future__ import annotations

import pytest
import torch

from lm.nn import lstm_fused, lstm_matmul
from tests.test_lstm_fused import _case

BF16 = torch.bfloat16
needs_bf16 = pytest.mark.skipif(lstm_fused.library() is None or not lstm_matmul.onednn_linear_available(BF16),
                                reason="no fused step with oneDNN bf16 products here")


def _forward(module, inputs, draws, xproj, bias):
    flip = draws.flip
    delta, s, r = (None, None, None) if flip is None else (flip.delta, flip.sign_in, flip.sign_out)
    with torch.no_grad():
        return module.window_forward(xproj, inputs[1], inputs[2], inputs[3], delta, s, r, draws.hidden_mask,
                                     draws.cell_mask, draws.zoneout_c, draws.zoneout_h, BF16, True, bias)


@needs_bf16
@pytest.mark.parametrize("flip,zone,projected", [("none", "masks", True), ("per_window", "masks", False),
                                                 ("per_step", "expectation", True)])
def test_saved_factors_are_the_float32_factors_rounded_once(flip, zone, projected):
    """With a bf16 input projection (or one the window makes itself) the C step stores ``fac`` and
    ``aux`` in bf16, and each element is exactly the float32 factor it stores for the same
    numbers given as a float32 projection, rounded to bf16 (the same products, the same float32
    arithmetic: only the store differs). The rest of the window (hidden states) is unchanged."""
    inputs, draws = _case(True, flip, True, zone, torch.float32)
    bias = torch.randn(inputs[0].shape[-1], generator=torch.Generator().manual_seed(3)) if projected else None
    xproj = inputs[0].detach().to(BF16)
    wide = xproj.float() if bias is None else xproj.float() + bias  # the sum the C step forms first
    lstm_fused.clear_pool()
    try:
        hall, _, fac, aux, _, _ = _forward(lstm_fused, inputs, draws, xproj, bias)
        ref_hall, _, ref_fac, ref_aux, _, _ = _forward(lstm_fused, inputs, draws, wide, None)
        assert torch.equal(hall, ref_hall)
        for got, ref in ((fac, ref_fac), (aux, ref_aux)):
            assert got.dtype == BF16 and ref.dtype == torch.float32 and got.shape == ref.shape
            assert torch.equal(got, ref.to(BF16))
    finally:
        lstm_fused.clear_pool()


@needs_bf16
def test_a_float32_projection_keeps_float32_factors():
    """A float32 input projection from outside gets the float32 gate gradients back, which backward
    writes into ``fac`` in place: its factors stay float32."""
    inputs, draws = _case(True, "per_window", False, "masks", torch.float32)
    _, _, fac, aux, _, _ = _forward(lstm_fused, inputs, draws, inputs[0].detach(), None)
    assert fac.dtype == torch.float32 and aux.dtype == torch.float32
    lstm_fused.clear_pool()


@needs_bf16
def test_backward_refuses_to_keep_gradients_in_bf16_factors():
    """The float32 gate gradients cannot be written into bf16 factors: asking for them is an error,
    not a silent rounding."""
    inputs, draws = _case(False, "none", False, "off", torch.float32)
    _, _, fac, aux, _, _ = _forward(lstm_fused, inputs, draws, inputs[0].detach().to(BF16), None)
    d = torch.zeros(fac.shape[0], fac.shape[1], fac.shape[2] // 4)
    with pytest.raises(ValueError, match="keep must be False"):
        lstm_fused.window_backward(d, d[0], d[0], fac, aux, inputs[3].detach(), None, None, None, None, None,
                                   None, BF16, keep=True)
    lstm_fused.clear_pool()


@needs_bf16
@pytest.mark.parametrize("shape", [(37, 53), (4 * 70, 70), (1, 5)])
def test_transpose_to_bf16_is_a_cast_and_a_transpose(shape):
    """The backward products' bf16 weights in one pass equal ``m.to(bf16).t()`` bit for bit:
    round-to-nearest-even ties, subnormals and infinities included; a NaN stays a NaN."""
    m = torch.randn(shape)
    flat = m.view(-1)
    special = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 1e-40, float("inf"), -float("inf"),
                            float("nan"), 3.3895e38])[: flat.numel()]
    flat[: special.numel()] = special
    got, want = lstm_fused.transposed(m, BF16), m.to(BF16).t().contiguous()
    assert got.dtype == BF16 and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    plain = torch.randn(shape)
    assert torch.equal(lstm_fused.transposed(plain.t(), BF16), plain.to(BF16))  # a non-contiguous input
