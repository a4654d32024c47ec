"""Model shapes, gradients, parameter counts, initialisation, tying."""

import pytest
import torch

from lm.config import ModelConfig, RegularizerConfig
from lm.errors import UserError
from lm.nn.model import LanguageModel, count_parameters, detach_state


def tiny(**kw):
    cfg = dict(emb_size=12, hidden_size=12, num_layers=2)
    cfg.update(kw)
    return LanguageModel(ModelConfig(**cfg), RegularizerConfig(), 23)


def test_shapes_and_state():
    model = tiny()
    x = torch.randint(0, 23, (7, 3))
    logits, state = model(x, model.init_state(3))
    assert logits.shape == (7, 3, 23)
    assert len(state) == 2 and all(h.shape == (3, 12) and c.shape == (3, 12) for h, c in state)


def test_every_parameter_gets_a_gradient():
    model = tiny()
    logits, _ = model(torch.randint(0, 23, (5, 2)), model.init_state(2))
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_carries_across_windows():
    """Running 10 steps at once equals 5 + 5 with the state carried (truncated BPTT is exact forward)."""
    model = tiny().eval()
    x = torch.randint(0, 23, (10, 2))
    full, _ = model(x, model.init_state(2))
    a, s = model(x[:5], model.init_state(2))
    b, _ = model(x[5:], detach_state(s))
    assert torch.allclose(full, torch.cat([a, b]), atol=1e-6)


def test_paper_parameter_counts():
    char = LanguageModel(ModelConfig(input="onehot", hidden_size=1000, num_layers=1, init="orthogonal"),
                         RegularizerConfig(), 50)
    assert count_parameters(char) == 4_258_050
    word = LanguageModel(ModelConfig(emb_size=650, hidden_size=650, num_layers=2), RegularizerConfig(), 10_000)
    assert count_parameters(word) == 19_780_400


def test_onehot_input_is_a_column_lookup():
    model = LanguageModel(ModelConfig(input="onehot", hidden_size=6, num_layers=1), RegularizerConfig(), 9)
    assert model.layers[0].weight_ih.shape == (24, 9)


def test_orthogonal_init_blocks():
    model = LanguageModel(ModelConfig(input="onehot", hidden_size=16, num_layers=1, init="orthogonal"),
                          RegularizerConfig(), 10)
    for block in model.layers[0].weight_hh.detach().chunk(4, 0):
        assert torch.allclose(block @ block.t(), torch.eye(16), atol=1e-5)
    assert model.layers[0].rnn.bias_hh_l0.abs().sum() == 0


def test_uniform_init_range():
    model = tiny(init_range=0.05)
    assert model.encoder.weight.abs().max() <= 0.05
    assert model.decoder.bias.abs().sum() == 0


def test_tied_weights_share_storage():
    model = tiny(tie_weights=True)
    assert model.decoder.weight is model.encoder.weight
    assert count_parameters(model) == count_parameters(tiny()) - 23 * 12


def test_tie_with_one_layer_needs_equal_sizes():
    with pytest.raises(UserError, match="emb_size == model.hidden_size"):
        ModelConfig(emb_size=10, hidden_size=12, num_layers=1, tie_weights=True)


def test_tied_last_layer_has_embedding_size():
    """AWD-LSTM: with tied weights the last layer has emb_size units, the others hidden_size."""
    cfg = ModelConfig(emb_size=4, hidden_size=7, num_layers=3, tie_weights=True)
    assert cfg.layer_sizes == [7, 7, 4]
    assert ModelConfig(emb_size=4, hidden_size=7, num_layers=3).layer_sizes == [7, 7, 7]
    model = LanguageModel(cfg, RegularizerConfig(), 9)
    assert [(l.input_size, l.hidden_size) for l in model.layers] == [(4, 7), (7, 7), (7, 4)]
    assert model.decoder.weight is model.encoder.weight
    # 9*4 embedding (tied) + 9 decoder bias + per layer 4H(in + H) + 8H
    expected = 9 * 4 + 9 + sum(4 * h * (i + h) + 8 * h for i, h in ((4, 7), (7, 7), (7, 4)))
    assert count_parameters(model) == expected
    state = model.init_state(2)
    assert [h.shape[1] for h, _ in state] == [7, 7, 4]
    logits, state = model(torch.randint(0, 9, (5, 2)), state)
    assert logits.shape == (5, 2, 9) and [c.shape[1] for _, c in state] == [7, 7, 4]


def test_onehot_rejects_embedding_dropout():
    with pytest.raises(UserError, match="embed_p needs model.input=embedding"):
        LanguageModel(ModelConfig(input="onehot", hidden_size=4, num_layers=1),
                      RegularizerConfig(name="dropout", embed_p=0.1), 5)
