"""Your own corpus: a directory of UTF-8 text, or one file cut into train/valid/test.

Set ``data.path`` to a directory holding ``train.txt``, ``valid.txt`` and ``test.txt``, or to one
text file that is cut at line boundaries by ``data.split_fractions`` (default 0.9/0.05/0.05:
the first 90% of its lines train, the next 5% validate, the last 5% test). ``data.tokenizer``
(default: ``data.level``) picks ``char``, ``word`` or ``sentencepiece`` (:mod:`lm.data.tokenizers`).

**Text BPC.** Per-token losses of different tokenizations are not comparable, so every run on
such a corpus also reports bits per character of the original text::

    text_bpc = mean loss (nats/token) * tokens in the split / (ln 2 * characters in the split)

i.e. the split's total nats over its characters, with the mean loss over the predicted tokens
standing in for the few tokens evaluation cannot score (the first of each stream, the
``N mod B`` tail). For ``char`` on a file ending in a newline, tokens == characters and
``text_bpc == bpc``.

Encoded splits are cached in ``<data root>/cache`` keyed by the files' SHA-256 and the
tokenization settings, like :mod:`lm.data.corpus`. A SentencePiece model is trained once per
training text and vocabulary size (also cached), written to ``<run dir>/tokenizer.model`` and
read back from there when resuming, evaluating or generating.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm.config import Config, DataConfig
from lm.data.corpus import Corpus, load_cache, load_corpus, save_cache
from lm.data.ptb import SPLITS, data_root
from lm.data.tokenizers import (SentencePiece, build_vocab, char_tokens, encode_symbols, read_text, split_lines,
                                word_tokens)
from lm.errors import UserError
from lm.files import atomic_write

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
TOKENIZER_FILE = "tokenizer.model"
CACHE_VERSION = 1


@dataclass
class TextCorpus(Corpus):
    """A :class:`Corpus` read from ``data.path``.

    Attributes (besides the base ones; ``level`` is the tokenizer name):
        source: ``data.path`` as configured.
        chars: characters of each split's original text (the text BPC denominator).
        split_tokens: tokens of each full split (before ``data.train_tokens``).
        sp_model: the serialized SentencePiece model, or None.
    """

    source: str = ""
    chars: dict[str, int] = field(default_factory=dict)
    split_tokens: dict[str, int] = field(default_factory=dict)
    sp_model: bytes | None = None


def tokenizer_name(data: DataConfig) -> str:
    return data.tokenizer or data.level


def load_data(cfg: Config, run_dir: str | Path | None = None) -> Corpus:
    """The corpus a config names: PTB when ``data.path`` is null, else :func:`load_text_corpus`.

    Args:
        cfg: the whole config (batch sizes are checked against the split sizes).
        run_dir: a run directory whose ``tokenizer.model`` is reused (SentencePiece).
    """
    d = cfg.data
    if d.path is None:
        return load_corpus(d.level, d.ptb_dir, d.train_tokens)
    corpus = load_text_corpus(d, run_dir)
    for split, key, batch in (("train", "train.batch_size", cfg.train.batch_size),
                              ("valid", "eval.batch_size", cfg.eval.batch_size),
                              ("test", "eval.batch_size", cfg.eval.batch_size)):
        n = corpus.split(split).numel()
        if n < 2 * batch:  # batchify needs at least two rows
            raise UserError(f"{split} split of {d.path} has only {n} tokens, too few for {key}={batch} "
                            f"(needs {2 * batch}): add text or lower {key}")
    return corpus


def _read_splits(d: DataConfig) -> tuple[dict[str, str], list[str]]:
    """The three split texts and the digests that key the cache."""
    root = Path(d.path).expanduser()  # type: ignore[arg-type]
    if root.is_dir():
        if d.split_fractions is not None:
            raise UserError(f"data.split_fractions applies to one file, but data.path {root} is a directory: "
                            "remove data.split_fractions or point data.path at a file")
        missing = [f"{s}.txt" for s in SPLITS if not (root / f"{s}.txt").is_file()]
        if missing:
            raise UserError(f"data.path {root} has no {', '.join(missing)}: put train.txt, valid.txt and test.txt "
                            "there, or point data.path at one text file (cut by data.split_fractions)")
        read = {s: read_text(root / f"{s}.txt", f"{s} split") for s in SPLITS}
        texts = {s: text for s, (text, _) in read.items()}
        digests = [digest for _, digest in read.values()]
    else:
        text, digest = read_text(root, "data.path")
        fractions = d.split_fractions or DEFAULT_FRACTIONS
        pieces = text.split("\n")
        lines = [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
        a = round(fractions[0] * len(lines))
        b = round((fractions[0] + fractions[1]) * len(lines))
        texts = {"train": "".join(lines[:a]), "valid": "".join(lines[a:b]), "test": "".join(lines[b:])}
        digests = [digest, repr(list(fractions))]
    for split, text in texts.items():
        if not text.strip():
            where = f"{root}/{split}.txt" if root.is_dir() else f"split {split} of {root} ({len(lines)} lines)"
            raise UserError(f"{where} is empty: add text to it"
                            + ("" if root.is_dir() else " or change data.split_fractions"))
    return texts, digests


def _sentencepiece(d: DataConfig, train_text: str, train_digest: str, run_dir: Path | None) -> SentencePiece:
    """The run's model if it has one, else the cached model for this text and size, else train one."""
    if run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file():
        return SentencePiece((Path(run_dir) / TOKENIZER_FILE).read_bytes())
    key = hashlib.sha256(f"{train_digest}:{d.vocab_size}:v{CACHE_VERSION}".encode()).hexdigest()[:16]
    cached = data_root() / "cache" / f"spm-{key}.model"
    if cached.is_file():
        return SentencePiece(cached.read_bytes())
    sp = SentencePiece.train(split_lines(train_text), d.vocab_size, f"{d.path} (train split)")  # type: ignore[arg-type]
    try:  # best effort, as for encoded splits
        atomic_write(cached, lambda tmp: tmp.write_bytes(sp.model))
    except OSError:
        pass
    return sp


def load_text_corpus(d: DataConfig, run_dir: str | Path | None = None) -> TextCorpus:
    """Read, check, tokenize and encode ``data.path`` (from the cache when nothing changed)."""
    texts, digests = _read_splits(d)
    tok = tokenizer_name(d)
    sp = None
    if tok == "sentencepiece":
        sp = _sentencepiece(d, texts["train"], digests[0], Path(run_dir) if run_dir else None)
        digests = digests + [hashlib.sha256(sp.model).hexdigest()]
    key_src = json.dumps({"v": CACHE_VERSION, "tok": tok, "cap": d.vocab_size, "files": digests})
    cache = data_root() / "cache" / f"text-{tok}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.pt"
    payload = load_cache(cache)
    if payload is None:
        lines = {s: split_lines(texts[s]) for s in SPLITS}
        if sp is not None:
            vocab, ids = sp.vocab, {s: sp.encode_lines(lines[s]) for s in SPLITS}
        else:
            tokenize = char_tokens if tok == "char" else word_tokens
            tokens = {s: tokenize(lines[s]) for s in SPLITS}
            vocab = build_vocab(tokens["train"], d.vocab_size)
            ids = {s: encode_symbols(tokens[s], vocab) for s in SPLITS}
        payload = {"vocab": vocab, **{s: torch.tensor(ids[s], dtype=torch.int32) for s in SPLITS}}
        save_cache(cache, payload)
    splits = {s: payload[s].long() for s in SPLITS}
    split_tokens = {s: splits[s].numel() for s in SPLITS}
    if d.train_tokens is not None:
        splits["train"] = splits["train"][: d.train_tokens]
    return TextCorpus(level=tok, vocab=list(payload["vocab"]), **splits, source=str(d.path),
                      chars={s: len(texts[s]) for s in SPLITS}, split_tokens=split_tokens,
                      sp_model=sp.model if sp is not None else None)


def save_tokenizer(corpus: Corpus, run_dir: Path) -> None:
    """Write the SentencePiece model next to the checkpoints (evaluation and generation read it)."""
    if isinstance(corpus, TextCorpus) and corpus.sp_model is not None:
        atomic_write(Path(run_dir) / TOKENIZER_FILE, lambda tmp: tmp.write_bytes(corpus.sp_model))
