"""Tiny synthetic UTF-8 corpora and configs for the own-corpus, generate, compare, sweep and DDP tests."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
         "every morning people walk past small shops selling fresh bread café naïve").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` lines of 3-9 words drawn from a small vocabulary (two non-ASCII words included)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def write_corpus(directory: Path, lines: tuple[int, int, int] = (300, 40, 40)) -> Path:
    """A data.path directory with train.txt, valid.txt, test.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(zip(("train", "valid", "test"), lines)):
        (directory / f"{split}.txt").write_text("\n".join(sentences(n, seed=i)) + "\n", encoding="utf-8")
    return directory


def tiny_config(data: dict, **sections) -> dict:
    """A seconds-long config dict on data section ``data``."""
    cfg = {
        "data": data,
        "model": {"emb_size": 16, "hidden_size": 24, "num_layers": 1},
        "optim": {"name": "adam", "lr": 0.01, "clip": 1.0},
        "train": {"batch_size": 4, "bptt": 20, "max_epochs": 1, "max_steps": 12, "eval_every_steps": 6,
                  "progress": False, "threads": 1, "seed": 1},
        "eval": {"batch_size": 2, "bptt": 50},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
