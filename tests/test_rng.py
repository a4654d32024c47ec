"""Keyed streams (lm.nn.rng): shared draws depend on (seed, step, layer) only; flipout signs on (seed, rank,
step, layer); other per-example draws on the process's own stream; variable BPTT lengths on (seed, epoch)."""

from __future__ import annotations

import torch

from lm.nn import fastrand

from lm.config import RegularizerConfig
from lm.nn.lstm import LSTMLayer
from lm.nn.rng import shared_generator, shared_noise, sign_generator
from lm.regularizers import build_regularizer
from lm.train.distributed import Single
from lm.train.streams import epoch_lengths, windows_of


def _layer() -> LSTMLayer:
    layer = LSTMLayer(6, 5)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(0.5)
    return layer


def test_shared_draws_depend_on_seed_step_and_layer_only():
    reg = build_regularizer(RegularizerConfig(name="gauss_flipout", sigma=1.0, perturb_ih=True)).train()
    layer = _layer()

    def draw(seed, step, stream_seed, rank=0):
        torch.manual_seed(stream_seed)  # the process's own stream: must not matter for ΔŴ
        with shared_noise(seed, step, rank):
            plan = reg.layer_noise(layer, 3, 4)
        return plan.flip_hh, plan.flip_ih

    hh, ih = draw(1, 7, stream_seed=0)
    hh2, ih2 = draw(1, 7, stream_seed=123)
    assert torch.equal(hh.delta, hh2.delta) and torch.equal(ih.delta, ih2.delta)
    # flipout signs: keyed on (seed, rank, step, layer), not on the process's stream either
    assert torch.equal(hh.sign_in, hh2.sign_in) and torch.equal(ih.sign_out, ih2.sign_out)
    other_rank = draw(1, 7, stream_seed=0, rank=1)[0]
    assert torch.equal(other_rank.delta, hh.delta) and not torch.equal(other_rank.sign_in, hh.sign_in)
    assert not torch.equal(hh.sign_in, ih.sign_in[:, :5])  # W_hh and W_ih: sign draws j = 0 and 1 differ
    assert not torch.equal(hh.sign_in, draw(1, 8, 0)[0].sign_in)  # another step
    assert not torch.equal(hh.delta, ih.delta[:, :5])  # W_hh and W_ih: draws k = 0 and 1 differ
    assert not torch.equal(hh.delta, draw(1, 8, 0)[0].delta)  # another step
    assert not torch.equal(hh.delta, draw(2, 7, 0)[0].delta)  # another seed


def test_shared_draws_leave_the_default_stream_alone():
    """Inside the context, ΔŴ and embedding dropout do not consume the process's stream, so the
    per-example draws are the same whatever the shared draws are."""
    reg = build_regularizer(RegularizerConfig(name="weight_drop", weight_p=0.5, embed_p=0.3)).train()
    layer = _layer()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with shared_noise(1, 0):
        reg.embedding_weight(torch.ones(50, 4))
        assert reg.layer_noise(layer, 3, 4).weight_hh is not layer.weight_hh  # a draw was made
    assert torch.equal(torch.rand(4), expected)


def test_embedding_dropout_is_a_shared_draw():
    reg = build_regularizer(RegularizerConfig(name="none", embed_p=0.5)).train()
    w = torch.ones(200, 3)
    masks = []
    for stream in (0, 1):
        torch.manual_seed(stream)
        with shared_noise(5, 2):
            masks.append(reg.embedding_weight(w))
    assert torch.equal(masks[0], masks[1])
    torch.manual_seed(0)
    outside = [reg.embedding_weight(w) for _ in range(2)]
    assert not torch.equal(*outside)  # outside a context: the default stream, a new mask per call


def test_flipout_signs_leave_the_default_stream_alone():
    """Inside the context the signs come from their own keyed stream: a flipout regularizer consumes
    the process's stream exactly as its shared counterpart does (the paired design)."""
    layer = _layer()
    states = []
    for name in ("weight_drop", "wd_flipout"):
        reg = build_regularizer(RegularizerConfig(name=name, weight_p=0.5, input_p=0.3)).train()
        torch.manual_seed(3)
        with shared_noise(1, 0):
            reg.drop_input(torch.ones(4, 3, 6))
            reg.layer_noise(layer, 3, 4)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)


def test_no_context_means_default_stream():
    assert shared_generator("cpu") is None and sign_generator("cpu") is None
    reg = build_regularizer(RegularizerConfig(name="gauss", sigma=1.0)).train()
    w = torch.ones(4, 3)
    torch.manual_seed(9)
    a = reg.base_perturbation(w)
    torch.manual_seed(9)
    assert torch.equal(a, fastrand.normal((4, 3), w))  # exactly a draw from the default stream
    torch.manual_seed(10)
    assert not torch.equal(a, reg.base_perturbation(w))


def test_epoch_lengths_keyed_and_cover_the_epoch():
    a = epoch_lengths(1001, 70, seed=1, epoch=0)
    assert a == epoch_lengths(1001, 70, seed=1, epoch=0)
    assert a != epoch_lengths(1001, 70, seed=1, epoch=1) and a != epoch_lengths(1001, 70, seed=2, epoch=0)
    assert sum(a) == 1000 and all(n >= 5 for n in a[:-1])
    source = torch.arange(1001)[:, None]
    full = list(windows_of(source, a, 0))
    assert [row for row, _, _ in full][1:] == torch.tensor(a).cumsum(0)[:-1].tolist()
    middle = full[3][0]
    assert [row for row, _, _ in windows_of(source, a, middle)] == [row for row, _, _ in full[3:]]
    (row, x, y), *_ = windows_of(source, a, middle + 2)  # a start inside a window: a shortened one
    assert row == middle + 2 and x.size(0) == a[3] - 2 and torch.equal(y[:, 0], x[:, 0] + 1)


def test_single_process_variable_windows_do_not_touch_the_default_stream():
    source = torch.arange(501)[:, None]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lengths = [x.size(0) for _, x, _ in Single().windows(source, 35, 0, True, seed=4, epoch=2)]
    assert lengths == epoch_lengths(501, 35, 4, 2)
    assert torch.equal(torch.rand(3), expected)


def test_keys_that_differ_only_in_high_bits_give_different_draws(monkeypatch):
    """torch's CPU generator keeps only 32 bits of a seed: the keyed streams must not. Shared draws
    (Philox and, with it off, torch's generator) and keyed generators with keys ``k`` and
    ``k ^ 2**40`` differ; the same key gives the same draw."""
    import lm.nn.rng as rng

    k = 0x1234_5678_9ABC_DEF
    key = {"value": k}
    monkeypatch.setattr(rng, "key_seed", lambda *parts: key["value"])
    like = torch.empty(0)

    def shared(value, fast):
        key["value"] = value
        monkeypatch.setattr(fastrand, "FAST", fast)
        with shared_noise(1, 1):
            return (fastrand.normal((256,), like, shared_generator("cpu")),
                    torch.empty(256).bernoulli_(0.5, generator=shared_generator("cpu")))

    for fast in (None, False):
        a, b, c = shared(k, fast), shared(k ^ 2**40, fast), shared(k, fast)
        assert all(torch.equal(x, z) for x, z in zip(a, c))
        assert not any(torch.equal(x, y) for x, y in zip(a, b)), f"FAST={fast}"
    key["value"] = k
    g1 = torch.rand(64, generator=rng.keyed_generator("bptt", 1, 0))
    key["value"] = k ^ 2**40
    assert not torch.equal(g1, torch.rand(64, generator=rng.keyed_generator("bptt", 1, 0)))


def test_fold32_uses_every_bit():
    base = fastrand.fold32(12345)
    assert all(fastrand.fold32(12345 ^ (1 << b)) != base for b in range(63))
    assert all(0 <= fastrand.fold32(x) < 2**32 for x in (0, 1, 2**63 - 1))


def test_fallback_two_valued_draw_resolves_p_in_bfloat16(monkeypatch):
    """torch's fallback draws the uniform in float32 also for a bf16 ``like``: P(below) = p to
    within sampling error (a bf16 uniform has steps of 2^-8: P(u < 0.1) would be 26/256 = 0.1016)."""
    monkeypatch.setattr(fastrand, "FAST", False)
    n, p = 4_000_000, 0.1
    m = fastrand.two_valued((n,), torch.empty(0, dtype=torch.bfloat16), p, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bfloat16
    freq = m.float().mean().item()
    assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5  # 4 standard errors: 6e-4


def test_epoch_lengths_with_a_cap_are_the_same_draws_cut():
    free, capped = epoch_lengths(20001, 70, seed=1, epoch=0), epoch_lengths(20001, 70, seed=1, epoch=0, longest=72)
    assert max(capped) == 72 and sum(capped) == 20000
    k = next(i for i, n in enumerate(free) if n > 72)  # the first cut: everything before it agrees
    assert capped[:k] == free[:k] and capped[k] == 72
