"""Monte-Carlo evaluation (lm/eval/mc.py): the predictive average over the regularizer's noise."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate as evaluate_script
import train as train_script
from lm.config import ModelConfig, RegularizerConfig
from lm.data.batching import batchify, bptt_windows
from lm.eval.evaluation import evaluate
from lm.eval.mc import mc_evaluate
from lm.nn.model import LanguageModel
from lm.regularizers import build_regularizer
from tests.tiny import write_tiny

V, B, BPTT = 13, 3, 7
NOISY = {
    "variational": dict(name="variational", hidden_p=0.3, output_p=0.2),
    "wd_flipout": dict(name="wd_flipout", weight_p=0.5),
    "weight_drop": dict(name="weight_drop", weight_p=0.5),
    "gauss": dict(name="gauss", sigma=0.5),
    "dropout_embed": dict(name="dropout", embed_p=0.2, input_p=0.2),
    "zoneout": dict(name="zoneout", zoneout_c=0.3, zoneout_h=0.2),
}
SHARED = {"weight_drop", "gauss", "dropout_embed"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save


def model_and_data(reg: dict, seed: int = 0) -> tuple[LanguageModel, torch.Tensor]:
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(emb_size=8, hidden_size=8, num_layers=2, init_range=1.0), RegularizerConfig(**reg), V).eval()
    return model, torch.randint(0, V, (200,))


def stochastic_pass_logps(model: LanguageModel, source: torch.Tensor) -> torch.Tensor:
    """One pass in train mode with the hidden state carried: the ``(N/B - 1, B)`` target log-probs."""
    model.train()
    state, out = model.init_state(source.size(1)), []
    with torch.no_grad():
        for _, x, y in bptt_windows(source, BPTT):
            logits, state = model(x, state)
            out.append(-F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).double())
    model.eval()
    return torch.cat(out)


@pytest.mark.parametrize("name", sorted(NOISY))
def test_granularity_decides_batched_or_separate_draws(name):
    assert build_regularizer(RegularizerConfig(**NOISY[name])).shares_noise_across_batch() == (name in SHARED)


def test_without_noise_mc_equals_deterministic():
    model, data = model_and_data(dict(name="none"))
    det = evaluate(model, data, "word", B, BPTT)
    for k in (1, 4):
        mc = mc_evaluate(model, data, "word", k, B, BPTT)
        assert mc["tokens"] == det["tokens"] and mc["loss"] == pytest.approx(det["loss"], rel=1e-6)
    assert not model.training


@pytest.mark.parametrize("name", sorted(NOISY))
def test_one_sample_equals_one_stochastic_pass(name):
    model, data = model_and_data(NOISY[name])
    torch.manual_seed(5)
    mc = mc_evaluate(model, data, "word", 1, B, BPTT)
    torch.manual_seed(5)
    logps = stochastic_pass_logps(model, batchify(data, B))
    assert mc["loss"] == pytest.approx(-logps.mean().item(), rel=1e-9)
    assert mc["draws"] == ("separate" if name in SHARED else "batched")
    det = evaluate(model, data, "word", B, BPTT)
    assert abs(mc["loss"] - det["loss"]) > 1e-5  # the noise was on (a near-uniform random model: small effect)


@pytest.mark.parametrize("name", ["wd_flipout", "weight_drop"])
def test_k_samples_are_the_log_mean_exp_of_independent_passes(name):
    """K = 3 equals logsumexp − log K over the passes drawn as the regularizer defines them:
    flipout: one pass over 3 copies of each stream; weight_drop: 3 passes, one draw each per window."""
    model, data = model_and_data(NOISY[name])
    source, k = batchify(data, B), 3
    torch.manual_seed(9)
    mc = mc_evaluate(model, data, "word", k, B, BPTT)
    torch.manual_seed(9)
    if name == "wd_flipout":
        logps = stochastic_pass_logps(model, source.repeat(1, k)).view(-1, k, B).transpose(0, 1)
    else:  # per window, sample 0, 1, 2 in turn, each with its own state
        model.train()
        states, rows = [model.init_state(B) for _ in range(k)], []
        with torch.no_grad():
            for _, x, y in bptt_windows(source, BPTT):
                step = []
                for j in range(k):
                    logits, states[j] = model(x, states[j])
                    step.append(-F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                                .view_as(y).double())
                rows.append(torch.stack(step))
        logps = torch.cat(rows, dim=1)
    expected = -(torch.logsumexp(logps, 0) - math.log(k)).mean().item()
    assert mc["loss"] == pytest.approx(expected, rel=1e-9)
    # the samples differ, so the average beats the mean single-sample loss strictly (Jensen)
    assert mc["loss"] < -logps.mean().item() - 1e-4


def test_cli_adds_mc_and_keeps_deterministic_figures(ptb_dir, tmp_path, capsys):
    cfg = write_tiny(tmp_path, regularizer={"name": "variational", "hidden_p": 0.2, "output_p": 0.2},
                     train={"max_epochs": 1})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    args = [str(run / "best.pt"), "--split", "valid", "--max-tokens", "500", "--json"]
    assert evaluate_script.main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert evaluate_script.main(args + ["--mc-samples", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in plain} == plain
    assert out["mc"]["samples"] == 3 and out["mc"]["draws"] == "batched" and out["mc"]["tokens"] == plain["tokens"]
    assert out["mc"]["ppl"] == pytest.approx(math.exp(out["mc"]["loss"]))
    assert evaluate_script.main(args + ["--mc-samples", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["mc"] == out["mc"]  # seeded: reproducible
    assert evaluate_script.main(args[:-1] + ["--mc-samples", "2"]) == 0
    assert "MC (2 samples, batched)" in capsys.readouterr().out
    assert evaluate_script.main(args + ["--mc-samples", "-1"]) == 2
    assert "--mc-samples -1 is invalid" in capsys.readouterr().err
