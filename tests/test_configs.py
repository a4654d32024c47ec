"""Every shipped config: loads, builds the paper-size model with the right parameter count,
runs two training steps; and the CLI trains + evaluates each one for a couple of steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluate as evaluate_script
import train as train_script
from lm.config import CONFIG_DIR, load_config
from lm.nn.model import count_parameters

PAPER = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.stem != "quickstart" and "_awd_" not in p.stem)
AWD = sorted(p.name for p in CONFIG_DIR.glob("*_awd_*.yaml"))


def lstm_params(n_in: int, n: int) -> int:
    """One LSTM layer: W_ih (4H x in), W_hh (4H x H) and two biases of 4H."""
    return 4 * n * (n_in + n) + 8 * n


# AWD-LSTM with tied weights: the last layer has emb_size units; the tied embedding counts once.
AWD_PARAMS = {
    # word: 10k x 400 embedding, layers 400->1150->1150->400, decoder bias 10k (Merity et al. 2017: 24M)
    "word": 10_000 * 400 + lstm_params(400, 1150) + lstm_params(1150, 1150) + lstm_params(1150, 400) + 10_000,
    # char: 50 x 200 embedding, layers 200->1000->1000->200, decoder bias 50 (Merity et al. 2018: 13.8M)
    "char": 50 * 200 + lstm_params(200, 1000) + lstm_params(1000, 1000) + lstm_params(1000, 200) + 50,
}
LEVELS = ("char", "word")
NAMES = ("unregularized", "dropout", "semeniuta", "zoneout", "variational", "weight_drop", "wd_flipout", "gauss",
         "flipout")


def test_one_config_per_level_and_regularizer():
    assert PAPER == sorted(f"{lvl}_{n}.yaml" for lvl in LEVELS for n in NAMES)


@pytest.mark.parametrize("name", PAPER)
def test_config_header_names_paper_row(name):
    first = (CONFIG_DIR / name).read_text().splitlines()[0]
    assert first.startswith("# Wen et al. 2018") and ("Table" in first)


@pytest.mark.parametrize("name", PAPER)
def test_config_builds_paper_model_and_trains_two_steps(ptb_dir, name):
    from lm.train.trainer import Trainer

    cfg = load_config(name)
    trainer = Trainer(cfg, Path("unused"))
    expected = 4_258_050 if cfg.data.level == "char" else 19_780_400
    assert count_parameters(trainer.model) == expected
    before = [p.detach().clone() for p in trainer.model.parameters()]
    source = trainer.train_data
    for i in range(2):
        x, y = source[i * 10: i * 10 + 10], source[i * 10 + 1: i * 10 + 11]
        loss = trainer.train_step(x, y)
        assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("name", PAPER)
def test_cli_smoke_every_config(ptb_dir, tmp_path, name, capsys):
    run = tmp_path / "run"
    small = ["--train.max_steps", "2", "--train.bptt", "10", "--eval.max_tokens", "400", "--eval.bptt", "20",
             "--data.train_tokens", "20000"]
    assert train_script.main(["--config", name, "--run-dir", str(run), *small]) == 0
    results = json.loads((run / "results.json").read_text())
    metric = "bpc" if name.startswith("char") else "ppl"
    assert results["steps"] == 2 and metric in results["valid"] and metric in results["test"]
    capsys.readouterr()
    assert evaluate_script.main([str(run / "best.pt"), "--split", "valid", "--json", "--max-tokens", "400"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "valid" and metric in out and out["tokens"] > 0


def test_awd_configs_exist_with_sourced_headers():
    assert AWD == sorted(f"{lvl}_awd_{n}.yaml" for lvl in LEVELS for n in ("wd", "wd_flipout"))
    for name in AWD:
        lines = (CONFIG_DIR / name).read_text().splitlines()
        assert lines[0].startswith("# AWD-LSTM (Merity") and any(line.startswith("# Sources:") for line in lines[:4])


def test_awd_parameter_counts_are_the_published_sizes():
    assert round(AWD_PARAMS["word"] / 1e6) == 24 and round(AWD_PARAMS["char"] / 1e5) == 138


@pytest.mark.parametrize("name", AWD)
def test_awd_config_builds_its_model_and_trains_two_steps(ptb_dir, name):
    from lm.train.trainer import Trainer

    cfg = load_config(name)
    trainer = Trainer(cfg, Path("unused"))
    assert count_parameters(trainer.model) == AWD_PARAMS[cfg.data.level]
    flipout = name.endswith("wd_flipout.yaml")
    assert cfg.regularizer.name == ("wd_flipout" if flipout else "weight_drop") and cfg.regularizer.weight_p == 0.5
    assert trainer.act_reg.active == (cfg.data.level == "word")  # AWD's char command sets --alpha 0 --beta 0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    source = trainer.train_data
    for i in range(2):
        x, y = source[i * 10: i * 10 + 10], source[i * 10 + 1: i * 10 + 11]
        assert torch.isfinite(torch.tensor(trainer.train_step(x, y)))
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()) if a.dim() == 2)


def test_quickstart_is_small_char_model():
    cfg = load_config("quickstart.yaml")
    assert cfg.data.level == "char" and cfg.model.hidden_size <= 512
