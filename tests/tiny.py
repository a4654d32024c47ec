"""A tiny real-PTB config for fast end-to-end tests."""

from pathlib import Path

import yaml

TINY = {
    "data": {"level": "word", "train_tokens": 3000},
    "model": {"emb_size": 16, "hidden_size": 16, "num_layers": 1},
    "optim": {"name": "sgd", "lr": 5.0, "clip": 0.25},
    "train": {"batch_size": 4, "bptt": 10, "max_epochs": 2, "seed": 7},
    "eval": {"batch_size": 5, "bptt": 50, "max_tokens": 2000},
}


def write_tiny(directory: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
