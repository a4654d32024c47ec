"""Tokenization, vocabulary and the on-disk cache of encoded splits.

Tokenization follows AWD-LSTM's ``data.py``: split each line on whitespace and append ``<eos>``.
Lines with no token are skipped, which drops the char files' trailing ``" "`` line, so PTB
counts are word 929,589 / 73,760 / 82,430 (vocab 10,000) and char 5,017,482 / 393,042 /
442,423 (vocab 50). The vocabulary is the training split's symbols in order of first
appearance, then ``<eos>`` if it has not appeared.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.data.ptb import SPLITS, data_root, find_ptb
from lm.errors import UserError
from lm.files import atomic_write

EOS = "<eos>"
CACHE_VERSION = 1


@dataclass
class Corpus:
    """Encoded splits and their vocabulary.

    Attributes:
        level: 'char' or 'word' (char level reports BPC, word level perplexity).
        vocab: id -> symbol.
        train, valid, test: ``(N,)`` int64 token ids.
    """

    level: str
    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def tokenize(path: Path) -> list[str]:
    """All tokens of a file, ``<eos>`` after every non-empty line."""
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words:
                tokens.extend(words)
                tokens.append(EOS)
    return tokens


def build_vocab(tokens: list[str]) -> list[str]:
    vocab = list(dict.fromkeys(tokens))
    if EOS not in vocab:
        vocab.append(EOS)
    return vocab


def encode(tokens: list[str], index: dict[str, int], path: Path) -> torch.Tensor:
    try:
        return torch.tensor([index[t] for t in tokens], dtype=torch.int64)
    except KeyError as e:
        raise UserError(f"{path} has symbol {e.args[0]!r} that is not in the training vocabulary") from None


def _cache_path(level: str, digests: dict[str, str]) -> Path:
    key = hashlib.sha256("".join(digests[s] for s in SPLITS).encode()).hexdigest()[:16]
    return data_root() / "cache" / f"ptb-{level}-{key}-v{CACHE_VERSION}.pt"


def load_cache(path: Path) -> dict | None:
    """A cached payload, or None when absent or damaged (a damaged cache is rebuilt, never fatal)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return None


def save_cache(path: Path, payload: dict) -> None:
    """Best effort: a read-only data root just means no cache."""
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except OSError:
        pass


def load_corpus(level: str, ptb_dir: str | None = None, train_tokens: int | None = None) -> Corpus:
    """Load PTB at ``level``, from the cache when the files' checksums match.

    Args:
        level: 'char' or 'word'.
        ptb_dir: optional PTB directory (see :func:`lm.data.ptb.find_ptb`).
        train_tokens: keep only the first N training tokens (reduced-data studies).
    """
    paths, digests = find_ptb(level, ptb_dir)
    cache = _cache_path(level, digests)
    payload = load_cache(cache)
    if payload is None:
        toks = {s: tokenize(paths[s]) for s in SPLITS}
        vocab = build_vocab(toks["train"])
        index = {w: i for i, w in enumerate(vocab)}
        payload = {"vocab": vocab, **{s: encode(toks[s], index, paths[s]).to(torch.int32) for s in SPLITS}}
        save_cache(cache, payload)
    splits = {s: payload[s].long() for s in SPLITS}
    if train_tokens is not None:
        splits["train"] = splits["train"][:train_tokens]
    return Corpus(level=level, vocab=list(payload["vocab"]), **splits)
