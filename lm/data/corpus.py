"""Tokenization, vocabulary and the on-disk cache of encoded splits.

Tokenization follows AWD-LSTM's ``data.py``: split each line on whitespace and append ``<eos>``.
Lines with no token are skipped, which drops the char files' trailing ``" "`` line, so PTB
counts are word 929,589 / 73,760 / 82,430 (vocab 10,000) and char 5,017,482 / 393,042 /
442,423 (vocab 50). The vocabulary is the training split's symbols in order of first
appearance, then ``<eos>`` if it has not appeared.
"""

from __future__ import annotations

import hashlib
import sys
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


def _digest(payload: dict) -> str:
    """SHA-256 over the vocabulary and the bytes of every encoded split."""
    h = hashlib.sha256("\n".join(payload["vocab"]).encode())
    for s in SPLITS:
        h.update(payload[s].contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_problem(payload) -> str | None:
    """Why a loaded cache cannot be used (None: it is intact): structure, lengths, checksum, id range."""
    if not isinstance(payload, dict) or not isinstance(payload.get("vocab"), list) or "check" not in payload:
        return "it has no checksum (written by an older version) or is not a cache"
    check = payload["check"]
    for s in SPLITS:
        t = payload.get(s)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32:
            return f"its {s} split is not a 1-D int32 array"
        if t.numel() != check["lengths"][s]:
            return f"its {s} split has {t.numel()} tokens, {check['lengths'][s]} expected"
    if _digest(payload) != check["sha256"]:
        return "checksum mismatch"
    for s in SPLITS:
        t = payload[s]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(payload["vocab"])):
            return f"its {s} split has token ids outside the {len(payload['vocab'])}-symbol vocabulary"
    return None


def load_cache(path: Path) -> dict | None:
    """A cached payload, or None when absent or damaged (a damaged cache is rebuilt, never fatal).

    Every cache holds the SHA-256 and the lengths of its encoded arrays (:func:`save_cache`); a
    file that does not match them is rebuilt with a one-line notice on stderr.
    """
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        problem = _cache_problem(payload)
    except Exception as e:
        problem = "unreadable (" + ((str(e).strip().splitlines() or [type(e).__name__])[0][:80]) + ")"
    if problem is None:
        return payload
    print(f"notice: data cache {path} is damaged ({problem}); rebuilding it", file=sys.stderr)
    return None


def save_cache(path: Path, payload: dict) -> None:
    """Best effort: a read-only data root just means no cache. Adds the checksum :func:`load_cache` checks."""
    payload = {**payload, "check": {"sha256": _digest(payload), "lengths": {s: payload[s].numel() for s in SPLITS}}}
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
