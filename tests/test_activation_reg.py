"""AR and TAR (Merity et al. 2017, Sec. 4.6): the terms, the model's outputs they read, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train as train_script
from lm.config import ModelConfig, RegularizerConfig, load_config
from lm.errors import UserError
from lm.nn.model import LanguageModel
from lm.train.activation_reg import ActivationRegularizer, activation_terms
from tests.tiny import write_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save


def test_terms_match_hand_computed_example():
    # T=3, B=1, H=2; 'dropped' is raw with masks [1,0], [0,1], [1,1] scaled by 1/(1-0.5) = 2
    raw = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]], [[2.0, 2.0]]])
    dropped = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[4.0, 4.0]]])
    ar, tar = activation_terms(raw, dropped, ar=2.0, tar=1.0)
    # AR: 2 * (4 + 0 + 0 + 0 + 16 + 16) / 6 = 12; TAR: diffs [2,-2], [-1,2] -> 1 * (4 + 4 + 1 + 4) / 4 = 3.25
    assert ar.item() == pytest.approx(12.0) and tar.item() == pytest.approx(3.25)
    zero_ar, zero_tar = activation_terms(raw, dropped, 0.0, 0.0)
    assert zero_ar.item() == 0.0 and zero_tar.item() == 0.0


def test_bookkeeping_means_over_the_interval():
    reg = ActivationRegularizer(1.0, 0.0)
    x = torch.ones(2, 1, 1)
    reg.penalty(x, x)
    reg.penalty(x, 3 * x)
    assert reg.flush() == {"train_ar": pytest.approx(5.0), "train_tar": 0.0}
    assert ActivationRegularizer(0.0, 0.0).flush() == {}


def test_model_returns_last_layer_raw_and_dropped_outputs():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(emb_size=6, hidden_size=5, num_layers=2),
                          RegularizerConfig(output_p=0.5, between_p=0.3), 11).train()
    seen = {}
    model.layers[-1].register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    tokens = torch.randint(0, 11, (4, 3))
    assert len(model(tokens, model.init_state(3))) == 2  # default return unchanged
    logits, state, (raw, dropped) = model(tokens, model.init_state(3), return_outputs=True)
    assert torch.equal(raw, seen["out"]) and raw.shape == (4, 3, 5)
    assert torch.equal(logits, model.decoder(dropped))
    kept = dropped != 0
    assert torch.allclose(dropped[kept], 2 * raw[kept]) and (~kept).any()


def test_negative_weights_are_rejected():
    with pytest.raises(UserError, match="regularizer.tar"):
        RegularizerConfig(tar=-1.0)


def test_training_gradient_includes_ar_and_tar(ptb_dir, tmp_path):
    """One SGD step (no clip, no noise) moves the weights by lr * grad(CE + AR + TAR), computed by hand."""
    from lm.train.trainer import Trainer

    path = write_tiny(tmp_path, regularizer={"ar": 2.0, "tar": 1.0}, optim={"clip": 0.0, "lr": 1.0})
    trainer = Trainer(load_config(path), tmp_path / "run")
    model = trainer.model
    x, y = trainer.train_data[:10], trainer.train_data[1:11]
    logits, _, (raw, dropped) = model(x, model.init_state(x.size(1)), return_outputs=True)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    total = ce + 2.0 * dropped.pow(2).mean() + (raw[1:] - raw[:-1]).pow(2).mean()
    grads = torch.autograd.grad(total, list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    loss = trainer.train_step(x, y)
    assert loss == pytest.approx(ce.item(), rel=1e-6)  # the reported loss is the cross-entropy alone
    for p0, g, p1 in zip(before, grads, model.parameters()):
        torch.testing.assert_close(p1.detach(), p0 - g, rtol=1e-5, atol=1e-6)


def test_terms_are_logged_in_metrics(ptb_dir, tmp_path):
    path = write_tiny(tmp_path, regularizer={"name": "variational", "output_p": 0.3, "ar": 2.0, "tar": 1.0},
                      train={"max_epochs": 1})
    run = tmp_path / "run"
    assert train_script.main(["--config", str(path), "--run-dir", str(run)]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_ar"] > 0 and record["train_tar"] > 0
    plain = tmp_path / "plain"
    assert train_script.main(["--config", str(path), "--run-dir", str(plain), "--regularizer.ar", "0",
                              "--regularizer.tar", "0"]) == 0
    assert "train_ar" not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
