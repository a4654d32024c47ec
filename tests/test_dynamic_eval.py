"""Dynamic evaluation (lm/eval/dynamic.py, Krause et al. 2018): score each segment, then adapt."""

from __future__ import annotations

import json

import pytest
import torch

import evaluate as evaluate_script
import train as train_script
from lm.config import ModelConfig, RegularizerConfig
from lm.eval.dynamic import DynamicSettings, default_grid, dynamic_evaluate, gradient_stats
from lm.eval.evaluation import evaluate
from lm.nn.model import LanguageModel
from lm.train.checkpoint import load_model
from tests.tiny import write_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save


def random_model(reg: dict | None = None) -> tuple[LanguageModel, torch.Tensor]:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(emb_size=8, hidden_size=8, num_layers=2, tie_weights=True),
                          RegularizerConfig(**(reg or {})), 11).eval()
    return model, torch.randint(0, 11, (300,))


@pytest.mark.parametrize("rule", ["sgd", "rms"])
def test_zero_lr_equals_static_evaluation_exactly(rule):
    model, data = random_model({"name": "weight_drop", "weight_p": 0.5, "output_p": 0.3})  # noise must be off
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = gradient_stats(model, data, 5, batch_size=4) if rule == "rms" else None
    dyn = dynamic_evaluate(model, data, "word", DynamicSettings(rule, 0.0, 0.01, 5), batch_size=3, ms=ms)
    static = evaluate(model, data, "word", batch_size=3, bptt=5)
    assert dyn["loss"] == static["loss"] and dyn["tokens"] == static["tokens"]
    assert dyn["updates"] == -(-(300 // 3 - 1) // 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_adaptation_changes_the_score_and_the_weights_are_restored():
    model, data = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dyn = dynamic_evaluate(model, data, "word", DynamicSettings("sgd", 0.5, 0.0, 5), batch_size=3)
    assert dyn["loss"] != evaluate(model, data, "word", batch_size=3, bptt=5)["loss"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_each_segment_is_scored_before_the_update_on_it():
    """With one segment covering the whole stream nothing is scored after an update: = static."""
    model, data = random_model()
    dyn = dynamic_evaluate(model, data, "word", DynamicSettings("sgd", 10.0, 0.0, 1000), batch_size=3)
    assert dyn["updates"] == 1 and dyn["loss"] == evaluate(model, data, "word", batch_size=3, bptt=1000)["loss"]


def test_rms_rule_matches_krause_update_by_hand():
    """One update: W1 = W0 - lr g / (MS + eps) (+ decay * d * (W0 - W0) = 0), checked on the second segment's score."""
    model, data = random_model()
    ms = gradient_stats(model, data, 4, batch_size=2)
    assert all(m.shape == p.shape and (m >= 0).all() for m, p in zip(ms, model.parameters()))
    seg = data[:9]  # 1 stream: two segments of 4 targets
    s = DynamicSettings("rms", 1e-3, 0.02, 4, epsilon=1e-3)
    got = dynamic_evaluate(model, seg, "word", s, batch_size=1, ms=ms)
    x1, y1, x2, y2 = seg[:4, None], seg[1:5, None], seg[4:8, None], seg[5:9, None]
    state = model.init_state(1)
    logits, state = model(x1, state)
    loss1 = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y1.flatten())
    grads = torch.autograd.grad(loss1, list(model.parameters()))
    with torch.no_grad():
        for p, g, m in zip(model.parameters(), grads, ms):
            p -= 1e-3 * g / (m + 1e-3)
        logits2, _ = model(x2, [(h.detach(), c.detach()) for h, c in state])
        loss2 = torch.nn.functional.cross_entropy(logits2.flatten(0, 1), y2.flatten())
    assert got["loss"] == pytest.approx((loss1.item() + loss2.item()) / 2, rel=1e-5)


@pytest.mark.parametrize("rule", ["rms", "sgd"])
def test_three_updates_with_the_decay_term_match_the_rule_by_hand(rule):
    """Three segments of one stream (the default: Krause's protocol): the second and third are
    scored with weights that moved by the rule, including the decay towards W0, which is zero at
    the first update and not at the second: rms ``W ← W − η g / (MS + ε) + λ d ∘ (W0 − W)`` with
    ``d = min(MS / mean(MS), 1/λ)``; sgd ``W ← W − η g + λ (W0 − W)``."""
    model, data = random_model()
    lr, lam, eps = (0.05, 0.5, 1e-3) if rule == "rms" else (0.5, 0.3, 0.0)
    ms = gradient_stats(model, data, 4, batch_size=2) if rule == "rms" else None
    seg = data[:13]  # 3 segments of 4 targets
    got = dynamic_evaluate(model, seg, "word", DynamicSettings(rule, lr, lam, 4, epsilon=eps), ms=ms)
    no_decay = dynamic_evaluate(model, seg, "word", DynamicSettings(rule, lr, 0.0, 4, epsilon=eps), ms=ms)
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    if rule == "rms":
        mean_ms = sum(m.mean() for m in ms) / len(ms)
        rates = [(m / mean_ms).clamp(max=1 / lam) for m in ms]
        assert any(bool((r < 1 / lam).any()) for r in rates)  # the clip does not decide everything
    state, losses = model.init_state(1), []
    for k in range(3):
        x, y = seg[4 * k: 4 * k + 4, None], seg[4 * k + 1: 4 * k + 5, None]
        logits, state = model(x, state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        state = [(h.detach(), c.detach()) for h, c in state]
        with torch.no_grad():
            for i, (p, g, w) in enumerate(zip(params, grads, w0)):
                if rule == "rms":
                    p.copy_(p - lr * g / (ms[i] + eps) + lam * rates[i] * (w - p))
                else:
                    p.copy_(p - lr * g + lam * (w - p))
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    assert got["updates"] == 3 and got["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert abs(got["loss"] - no_decay["loss"]) > 1e-3 * got["loss"]  # the decay term mattered


def test_dynamic_evaluation_defaults_to_one_stream():
    """Krause's protocol: the split as one stream unless asked otherwise."""
    model, data = random_model()
    s = DynamicSettings("sgd", 0.0, 0.0, 5)
    assert dynamic_evaluate(model, data, "word", s)["tokens"] == data.numel() - 1


def test_default_grid_is_krauses_rescaled():
    lrs, decays = default_grid("rms", 10)
    assert lrs[2] == pytest.approx(1e-4) and decays[1] == pytest.approx(4e-3)
    assert default_grid("sgd", 5)[1] == [0.0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ptb_dir):
    """The tiny word model, briefly trained (2 epochs on 3000 tokens)."""
    tmp = tmp_path_factory.mktemp("dyn")
    run = tmp / "run"
    assert train_script.main(["--config", str(write_tiny(tmp)), "--run-dir", str(run)]) == 0
    return run


@pytest.mark.parametrize("rule,lr,decay", [("sgd", 0.5, 0.0), ("rms", 5e-5, 2e-3)])  # rms: Krause's defaults
def test_dynamic_evaluation_improves_validation_of_a_briefly_trained_model(trained_run, rule, lr, decay):
    from lm.config import load_config
    from lm.data.custom import load_data

    model, ck = load_model(trained_run / "best.pt", "cpu")
    corpus = load_data(load_config(base=ck["config"]), trained_run)
    valid = corpus.split("valid")[:3000]
    ms = gradient_stats(model, corpus.train, 5, batch_size=20) if rule == "rms" else None
    static = evaluate(model, valid, "word", batch_size=5, bptt=5)
    dyn = dynamic_evaluate(model, valid, "word", DynamicSettings(rule, lr, decay, 5), batch_size=5, ms=ms)
    assert dyn["ppl"] < 0.97 * static["ppl"], (dyn, static)


def test_cli_dynamic_eval_and_tuning(trained_run, capsys):
    base = [str(trained_run / "best.pt"), "--max-tokens", "300", "--json"]
    assert evaluate_script.main(base + ["--split", "valid", "--dynamic-eval", "--dynamic-rule", "sgd",
                                        "--dynamic-lr", "0", "--bptt", "5", "--dynamic-streams", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    # lr 0 with the static windows and streams: the static figure, up to float32 summation order (on AVX2
    # ATen sums in another order than on AVX-512: 7.4272338350 against 7.4272338867)
    assert out["dynamic"]["loss"] == pytest.approx(out["loss"], rel=4 * 2**-24)
    assert out["dynamic"]["streams"] == 5 and "not Krause's" in out["dynamic"]["protocol"]
    assert evaluate_script.main(base + ["--dynamic-eval", "--tune-on", "valid", "--tune-max-tokens", "200",
                                        "--dynamic-stat-batches", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    d = out["dynamic"]
    assert out["split"] == "test" and d["rule"] == "rms" and d["stats"]["data"] == "train"
    assert d["streams"] == 1 and d["protocol"].startswith("Krause") and d["tokens"] == 299  # one stream
    assert len(d["tuned_on"]["grid"]) == 24 and d["tuned_on"]["tokens"] == 200
    best = min(d["tuned_on"]["grid"], key=lambda g: g["loss"])
    assert (d["lr"], d["decay"]) == (best["lr"], best["decay"]) and d["ppl"] > 0
    assert evaluate_script.main(base + ["--dynamic-lr", "0.1"]) == 2
    assert "--dynamic-lr needs --dynamic-eval" in capsys.readouterr().err
    assert evaluate_script.main(base + ["--split", "valid", "--dynamic-eval", "--tune-on", "valid"]) == 2
    assert "use --split test" in capsys.readouterr().err
