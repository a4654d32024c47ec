"""The window's step masks as exact bytes (lm.nn.noise, lm.nn.fastrand, lm/nn/csrc/lstm_step.c).

Cell dropout and zoneout masks are drawn as ``uint8`` 0/1 (a quarter of float32's memory and
traffic); the C step reads them as they are and applies the cell mask's ``1 / (1 - p)`` as it
reads it, and every other reader (reference loop, torch and Triton steps) takes float values.
The bytes must be the draw the float masks were (same generator, same comparison) and must give
the float masks' results bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from lm.nn import fastrand, lstm_fused, lstm_matmul
from lm.nn import noise as noise_module
from lm.nn.lstm import reference_loop
from lm.nn.lstm_kernel import lstm_window
from lm.nn.noise import RecurrentNoise, WindowDraws, dense, draw_window
from tests.test_lstm_fused import _case, _run, needs_fused

P_CELL = 0.3


@pytest.mark.parametrize("fast", [None, False], ids=["philox", "torch"])
@pytest.mark.parametrize("n", [7, 4096 + 5])
def test_byte_draw_is_the_two_valued_draw(monkeypatch, fast, n):
    """``bernoulli_bytes`` is ``two_valued(..., p, 1, 0)``'s draw (the same uniforms and comparison,
    on Philox and on torch's generator), stored as 0/1 bytes, a unit cut short included."""
    monkeypatch.setattr(fastrand, "FAST", fast)
    like = torch.empty(0)
    for seed in range(3):
        got = fastrand.bernoulli_bytes((n,), like, 0.3, torch.Generator().manual_seed(seed))
        want = fastrand.two_valued((n,), like, 0.3, 1.0, 0.0, torch.Generator().manual_seed(seed))
        assert got.dtype == torch.uint8 and torch.equal(got, want.to(torch.uint8))


def test_draw_window_gives_byte_masks_at_their_rates():
    """Training draws: byte masks, the cell scale ``1 / (1 - p)``, and each mask's rate within 5
    standard errors of its probability (T·B·H = 60,000 draws each)."""
    steps, batch, hid = 10, 60, 100
    w = torch.zeros(4 * hid, hid)
    noise = RecurrentNoise(w, w, cell_p=P_CELL, zoneout_c=0.5, zoneout_h=0.1, training=True)
    torch.manual_seed(0)
    draws = draw_window(noise, torch.zeros(batch, hid), steps)
    assert draws.cell_scale == 1 / (1 - P_CELL)
    n = steps * batch * hid
    for mask, p in ((draws.cell_mask, 1 - P_CELL), (draws.zoneout_c, 0.5), (draws.zoneout_h, 0.1)):
        assert mask.dtype == torch.uint8 and mask.shape == (steps, batch, hid)
        assert set(mask.unique().tolist()) <= {0, 1}
        assert abs(mask.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


def _bytes(draws: WindowDraws) -> tuple[WindowDraws, WindowDraws]:
    """Byte masks in place of a case's float masks, and the float values they stand for."""
    to_bytes = lambda m: (m != 0).to(torch.uint8) if isinstance(m, torch.Tensor) else m  # noqa: E731
    b = WindowDraws(draws.hidden_mask, draws.flip, to_bytes(draws.cell_mask), to_bytes(draws.zoneout_c),
                    to_bytes(draws.zoneout_h), 1 / (1 - P_CELL))
    return b, b.dense(torch.float32)


@needs_fused
@pytest.mark.parametrize("flip", ["none", "per_step"])
@pytest.mark.parametrize("low", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_c_step_reads_byte_masks_as_their_float_values(flip, low):
    """The C step on byte masks gives exactly what it gives on their float values (outputs, state,
    every gradient), in float32 and bf16: the byte and the scale become the same float32 number."""
    if low is not None and not lstm_matmul.onednn_linear_available(low):
        pytest.skip("no oneDNN bf16 products here")
    inputs, draws = _case(True, flip, True, "masks", torch.float32)
    byte_draws, float_draws = _bytes(draws)
    assert byte_draws.cell_mask.dtype == torch.uint8 and float_draws.cell_mask.dtype == torch.float32
    got = {}
    for name, d in (("bytes", byte_draws), ("floats", float_draws)):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            got[name] = _run(lstm_window, leaves, d)
    for a, b in zip(got["bytes"], got["floats"]):
        assert torch.equal(a, b)


@needs_fused
def test_byte_masks_agree_across_steps(monkeypatch):
    """The torch step (which reads the float values) and the C step (which reads the bytes) agree
    to float32 rounding on the same byte draws (1e-5 of each tensor's largest element; a misread
    mask is an O(1) error)."""
    inputs, draws = _case(True, "per_window", True, "masks", torch.float32)
    byte_draws, _ = _bytes(draws)
    got = {}
    for mode in (None, False):
        monkeypatch.setattr(lstm_fused, "FUSED", mode)
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        got[mode] = _run(lstm_window, leaves, byte_draws)
    for a, b in zip(got[None], got[False]):  # relative to the tensor's largest element, as sums differ in order
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_reference_loop_reads_byte_masks():
    inputs, draws = _case(False, "none", True, "masks", torch.float64)
    byte_draws, _ = _bytes(draws)
    with torch.no_grad():
        a = reference_loop(inputs[0], (inputs[1], inputs[2]), inputs[3], byte_draws)
        b = reference_loop(inputs[0], (inputs[1], inputs[2]), inputs[3], byte_draws.dense(torch.float64))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][1], b[1][1])


def test_dense_values():
    m = torch.tensor([0, 1, 1], dtype=torch.uint8)
    assert torch.equal(dense(m, 1 / 0.7), torch.tensor([0.0, 1.0, 1.0]) * torch.tensor(1 / 0.7))
    assert torch.equal(dense(m), torch.tensor([0.0, 1.0, 1.0])) and dense(0.3) == 0.3 and dense(None) is None


def test_float_masks_switch_draws_the_same_masks(monkeypatch):
    """With ``BYTE_MASKS`` off the same draws come as float values (the cell mask scaled): what the
    benchmark's on/off comparison relies on."""
    w = torch.zeros(4 * 8, 8)
    noise = RecurrentNoise(w, w, cell_p=P_CELL, zoneout_c=0.5, zoneout_h=0.1, training=True)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(noise_module, "BYTE_MASKS", on)
        torch.manual_seed(1)
        got[on] = draw_window(noise, torch.zeros(5, 8), 3)
    assert got[False].cell_mask.dtype == torch.float32 and got[False].cell_scale == 1.0
    dense_bytes = got[True].dense(torch.float32)
    for name in ("cell_mask", "zoneout_c", "zoneout_h"):
        assert torch.equal(getattr(dense_bytes, name), getattr(got[False], name))
