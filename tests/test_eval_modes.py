"""Every evaluation mode on a tiny model of every regularizer: deterministic, Monte-Carlo
(``--mc-samples``), dynamic evaluation with both rules (with gradient statistics, and with a
decay towards the trained weights), and generation. Each must run, give finite figures, and leave
the weights as they were."""

from __future__ import annotations

import math

import pytest
import torch

from lm.config import ModelConfig, RegularizerConfig
from lm.eval.dynamic import DynamicSettings, dynamic_evaluate, gradient_stats
from lm.eval.evaluation import evaluate
from lm.eval.generate import sample
from lm.eval.mc import mc_evaluate
from lm.nn.model import LanguageModel
from lm.regularizers import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save

RATES = {
    "none": {},
    "dropout": dict(embed_p=0.1, input_p=0.2, between_p=0.2, output_p=0.2),
    "variational": dict(hidden_p=0.25, output_p=0.2),
    "semeniuta": dict(cell_p=0.25),
    "zoneout": dict(zoneout_c=0.25, zoneout_h=0.05),
    "weight_drop": dict(weight_p=0.5),
    "wd_flipout": dict(weight_p=0.5),
    "gauss": dict(sigma=0.5),
    "gauss_flipout": dict(sigma=0.5),
    "bbb": dict(init_sigma=0.05, prior_sigma=0.1),
    "bbb_flipout": dict(init_sigma=0.05, prior_sigma=0.1),
}
V = 11


def test_every_regularizer_is_covered():
    assert set(RATES) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(RATES))
def test_every_evaluation_mode_runs(name):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(emb_size=8, hidden_size=8, num_layers=2, tie_weights=True),
                          RegularizerConfig(name=name, **RATES[name]), V).eval()
    data = torch.randint(0, V, (120,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    static = evaluate(model, data, "word", batch_size=2, bptt=10)
    mc = mc_evaluate(model, data, "word", 2, batch_size=2, bptt=10)
    ms = gradient_stats(model, data, 5, batch_size=2)
    rms = dynamic_evaluate(model, data, "word", DynamicSettings("rms", 1e-3, 0.01, 5), ms=ms)
    sgd = dynamic_evaluate(model, data, "word", DynamicSettings("sgd", 0.5, 0.01, 5), batch_size=2)
    ids = sample(model, [1, 2, 3], 6, 1.0, torch.Generator().manual_seed(0))
    for r in (static, mc, rms, sgd):
        assert math.isfinite(r["loss"]) and r["loss"] > 0
    assert rms["updates"] > 1 and rms["loss"] != static["loss"]
    assert len(ids) == 6 and all(0 <= i < V for i in ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
