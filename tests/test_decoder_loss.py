"""The decoder's fused cross-entropy (lm/nn/decoder_loss.py): the same loss and gradients as
``F.cross_entropy(decoder(h))``, with one (N, V) tensor kept for the backward instead of several."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm.config import ModelConfig, RegularizerConfig
from lm.nn import decoder_loss
from lm.nn.decoder_loss import decoder_cross_entropy
from lm.nn.model import LanguageModel


def _grads(loss_fn, params, dtype=None):
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn()
    (2.5 * loss).backward()  # an upstream gradient other than 1
    return [loss.detach()] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk", [1 << 22, 37])  # one chunk, and many ragged ones
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(monkeypatch, chunk):
    monkeypatch.setattr(decoder_loss, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in [(53, 7), (11, 7), (11,)])
    t = torch.randint(11, (53,), generator=g)
    ours = _grads(lambda: decoder_cross_entropy(h, w, b, t), [h, w, b])
    ref = _grads(lambda: F.cross_entropy(F.linear(h, w, b), t), [h, w, b])
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_matches_the_autocast_decoder_to_bf16_rounding():
    g = torch.Generator().manual_seed(1)
    h, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in [(64, 16), (40, 16), (40,)])
    t = torch.randint(40, (64,), generator=g)
    ours = _grads(lambda: decoder_cross_entropy(h, w, b, t), [h, w, b], torch.bfloat16)
    ref = _grads(lambda: F.cross_entropy(F.linear(h, w, b).float(), t), [h, w, b], torch.bfloat16)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)  # the same bf16 logits, float32 loss
    for a, r in zip(ours[1:], ref[1:]):  # both round the logits' gradient to bf16 (2^-8), at different points
        assert a.dtype == r.dtype == torch.float32
        assert (a - r).abs().max() <= 2 ** -6 * r.abs().max()


def _saved_elements(fn) -> list[int]:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_it_keeps_one_tokens_by_vocabulary_tensor_for_the_backward():
    n, e, v = 120, 8, 500
    h, w, b = torch.randn(n, e, requires_grad=True), torch.randn(v, e, requires_grad=True), torch.zeros(v, requires_grad=True)
    t = torch.randint(v, (n,))
    big = [s for s in _saved_elements(lambda: decoder_cross_entropy(h, w, b, t)) if s >= n * v]
    assert big == [n * v]
    reference = [s for s in _saved_elements(lambda: F.cross_entropy(F.linear(h, w, b), t)) if s >= n * v]
    assert len(reference) >= 1  # log_softmax's output; the backward then builds two more


def test_the_model_returns_the_loss_of_its_logits_given_targets():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(input="embedding", emb_size=12, hidden_size=12, num_layers=2, tie_weights=True),
                          RegularizerConfig(name="none"), vocab_size=30)
    x, y = torch.randint(30, (6, 3)), torch.randint(30, (6, 3))
    state = model.init_state(3)
    logits, _ = model(x, state)
    loss, _, (raw, dropped) = model(x, state, return_outputs=True, targets=y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()), rtol=1e-6, atol=1e-6)
    assert raw.shape == dropped.shape == (6, 3, 12)
    loss.backward()  # the tied matrix gets the decoder's and the embedding's gradients
    assert model.encoder.weight.grad is not None and model.decoder.bias.grad is not None


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="targets"):
        decoder_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), None, torch.zeros(3, dtype=torch.long))
