"""The paired design of the flipout comparisons (docs/results.md, "Paired study"): for one seed, a
flipout arm and its shared counterpart (``wd_flipout`` / ``weight_drop``, ``gauss_flipout`` /
``gauss``) start from the same weights, see the same batches and BPTT lengths, and draw the same
embedding and dropout masks and the same base perturbation ΔŴ at every step: only the flipout signs
differ (lm.nn.rng keeps them apart from the default stream)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.config import load_config
from tests.textdata import tiny_config, write_corpus

STEPS = 5
DROPOUT = {"input_p": 0.4, "between_p": 0.3, "output_p": 0.4}
PAIRS = {  # shared arm, flipout arm, regularizer options, data/model of the level
    "word": ("weight_drop", "wd_flipout", {"weight_p": 0.5, "embed_p": 0.1, **DROPOUT},
             {"tokenizer": "word"}, {"input": "embedding", "emb_size": 12}),
    "char": ("gauss", "gauss_flipout", {"sigma": 1.0, **DROPOUT}, {"tokenizer": "char"}, {"input": "onehot"}),
}


def _record(trainer) -> dict:
    """Run STEPS training steps of epoch 0 as the trainer's loop does; record every random input."""
    reg, seen = trainer.model.regularizer, {"windows": [], "drop_rng": [], "drop_zero": [], "embed_rows": [],
                                            "delta_ratio": [], "rng_after": []}
    embedding_weight, drop, layer_noise = reg.embedding_weight, reg._drop, reg.layer_noise

    def embedding_hook(weight):
        out = embedding_weight(weight)
        seen["embed_rows"].append(out.eq(0).all(1))  # the rows dropped (no weight row is all zero)
        return out

    def drop_hook(x, p):
        seen["drop_rng"].append(torch.get_rng_state())  # the default stream the mask is drawn from
        out = drop(x, p)
        seen["drop_zero"].append(out.eq(0) & x.ne(0))
        return out

    def noise_hook(layer, batch, steps):
        plan = layer_noise(layer, batch, steps)
        delta = plan.flip_hh.delta if plan.flip_hh is not None else plan.weight_hh - layer.weight_hh
        seen["delta_ratio"].append((delta / layer.weight_hh).detach())  # ±1 (DropConnect) or ε (Gauss)
        return plan

    reg.embedding_weight, reg._drop, reg.layer_noise = embedding_hook, drop_hook, noise_hook
    t = trainer.cfg.train
    for row, x, y in trainer.dist.windows(trainer.train_data, t.bptt, 0, t.variable_bptt, t.seed, 0):
        seen["windows"].append((row, x.clone()))
        trainer.train_step(x, y)
        trainer.step += 1
        seen["rng_after"].append(torch.get_rng_state())
        if trainer.step == STEPS:
            break
    return seen


def _arm(tmp_path: Path, level: str, arm: int, seed: int) -> tuple[dict, dict]:
    """Build one arm's trainer (which seeds the process's default stream) and run it at once:
    its initial weights and :func:`_record`'s draws."""
    from lm.train.trainer import Trainer

    shared, flip, options, data, model = PAIRS[level]
    corpus = write_corpus(tmp_path / "corpus")
    cfg = tiny_config({"path": str(corpus), **data}, model={**model, "hidden_size": 10, "num_layers": 2},
                      optim={"name": "sgd", "lr": 5.0, "clip": 0.25},
                      train={"seed": seed, "bptt": 8, "variable_bptt": True, "batch_size": 4},
                      regularizer={"name": (shared, flip)[arm], **options})
    trainer = Trainer(load_config(base=cfg), tmp_path / f"run{arm}")
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    seen = _record(trainer)
    seen["after"] = [p.detach().clone() for p in trainer.model.parameters()]
    seen["train_data"] = trainer.train_data
    return initial, seen


@pytest.mark.parametrize("level", ["word", "char"])
def test_arms_share_every_stream_but_the_flipout_signs(tmp_path, one_thread, level):
    (init_a, ra), (init_b, rb) = _arm(tmp_path, level, 0, seed=3), _arm(tmp_path, level, 1, seed=3)
    # the same initial weights (the first step's parameters before its update) and training data
    assert init_a.keys() == init_b.keys() and all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert torch.equal(ra["train_data"], rb["train_data"])
    assert len(ra["windows"]) == STEPS and len({x.size(0) for _, x in ra["windows"]}) > 1  # variable lengths
    for (ia, xa), (ib, xb) in zip(ra["windows"], rb["windows"], strict=True):  # the same batches
        assert ia == ib and torch.equal(xa, xb)
    for key in ("drop_rng", "drop_zero", "embed_rows", "rng_after"):  # the masks, and the stream after each step
        assert len(ra[key]) == len(rb[key]) and all(torch.equal(u, v) for u, v in zip(ra[key], rb[key])), key
    assert len(ra["drop_zero"]) == 3 * STEPS and any(z.any() for z in ra["drop_zero"])  # masks were drawn
    if level == "word":
        assert len(ra["embed_rows"]) == STEPS and any(r.any() for r in ra["embed_rows"])
    # the same base perturbation at every step and layer (relative to each arm's current weights)
    assert len(ra["delta_ratio"]) == 2 * STEPS
    for u, v in zip(ra["delta_ratio"], rb["delta_ratio"], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    # ... and yet the arms differ: the flipout signs changed the updates
    assert any(not torch.equal(p, q) for p, q in zip(ra["after"], rb["after"], strict=True))


def test_another_seed_changes_the_shared_streams(tmp_path, one_thread):
    (init_a, ra), (init_c, rc) = _arm(tmp_path, "word", 1, seed=3), _arm(tmp_path, "word", 1, seed=4)
    assert not torch.equal(init_a["encoder.weight"], init_c["encoder.weight"])
    assert [x.size(0) for _, x in ra["windows"]] != [x.size(0) for _, x in rc["windows"]] or \
        not torch.equal(ra["embed_rows"][0], rc["embed_rows"][0])
    assert not torch.equal(ra["drop_zero"][0], rc["drop_zero"][0])
