"""Metrics on known values: nats per predicted token, BPC and perplexity."""

import math

import pytest
import torch

from lm.eval.evaluation import evaluate
from lm.eval.metrics import from_nats, metric_name, summarize


def test_known_values():
    assert from_nats(math.log(2), "char") == pytest.approx(1.0)
    assert from_nats(math.log(100), "word") == pytest.approx(100.0)
    s = summarize(total_nats=10 * math.log(50), tokens=10, level="char")
    assert s == {"loss": pytest.approx(math.log(50)), "tokens": 10, "bpc": pytest.approx(math.log2(50))}
    assert metric_name("word") == "ppl"


def test_uniform_model_scores_log_vocab():
    """A model whose logits are all zero scores exactly ln V nats on any data, counted per target."""
    from lm.config import ModelConfig, RegularizerConfig
    from lm.nn.model import LanguageModel

    model = LanguageModel(ModelConfig(emb_size=8, hidden_size=8, num_layers=1), RegularizerConfig(), 37)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    data = torch.randint(0, 37, (1003,))
    out = evaluate(model, data, "word", batch_size=4, bptt=7)
    assert out["tokens"] == (1003 // 4 - 1) * 4  # N//B rows, first row never predicted
    assert out["loss"] == pytest.approx(math.log(37), rel=1e-6)
    assert out["ppl"] == pytest.approx(37, rel=1e-5)
