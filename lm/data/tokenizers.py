"""Reading your own text safely and tokenizing it: ``char``, ``word`` or ``sentencepiece``.

Every scheme works line by line and ends each line with ``<eos>`` (so a newline is a predicted
symbol, as in PTB). Lines are split on ``"\\n"`` only, after ``\\r\\n`` and ``\\r`` became ``\\n``.

* ``char``: every character of a line is a symbol, spaces included (unlike PTB's char files,
  which spell words with ``_`` between them); a text file ending in a newline has exactly one
  token per character.
* ``word``: a line's whitespace-separated words; blank lines give a lone ``<eos>``.
* ``sentencepiece``: a SentencePiece model trained on the training split (identity
  normalization, full character coverage, so ``decode(encode(line)) == line``); its
  ``<eos>`` piece is the line end.

Vocabularies of ``char``/``word`` are the training symbols by decreasing frequency (ties: first
appearance), capped at ``vocab_size`` with the rest mapped to ``<unk>``, which is always present.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

from lm.errors import UserError

EOS = "<eos>"
UNK = "<unk>"


def read_text(path: Path, what: str = "file") -> tuple[str, str]:
    """Decode a UTF-8 text file. Returns ``(text, sha256 of the bytes)``.

    Raises a one-line :class:`UserError` for a missing file, a binary file (NUL bytes) or
    invalid UTF-8 (naming the byte offset).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found: create it or point data.path at a directory with train.txt, "
                        "valid.txt and test.txt (or at one text file)")
    raw = path.read_bytes()
    if b"\x00" in raw[: 1 << 20]:
        raise UserError(f"{what} {path} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n"), hashlib.sha256(raw).hexdigest()


def split_lines(text: str) -> list[str]:
    """Lines without their ``\\n``; a final newline does not start another line."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def char_tokens(lines: Sequence[str]) -> list[str]:
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line)
        tokens.append(EOS)
    return tokens


def word_tokens(lines: Sequence[str]) -> list[str]:
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def build_vocab(tokens: Sequence[str], cap: int | None) -> list[str]:
    """Symbols by decreasing count (ties by first appearance), at most ``cap`` with ``<unk>``."""
    counts = Counter(tokens)
    first = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    ranked = sorted((t for t in counts if t != UNK), key=lambda t: (-counts[t], first[t]))
    if cap is not None:
        ranked = ranked[: cap - 1]
    return ranked + [UNK]


def encode_symbols(tokens: Sequence[str], vocab: Sequence[str]) -> list[int]:
    index = {s: i for i, s in enumerate(vocab)}
    unk = index[UNK]
    return [index.get(t, unk) for t in tokens]


class SentencePiece:
    """A trained SentencePiece model (``sentencepiece`` is an optional dependency).

    Args:
        model: the serialized model (what ``tokenizer.model`` in a run directory holds).
    """

    def __init__(self, model: bytes) -> None:
        spm = _import_sentencepiece()
        self.model = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.eos_id = self.sp.piece_to_id(EOS)
        self.unk_id = self.sp.unk_id()

    @classmethod
    def train(cls, lines: Sequence[str], vocab_size: int, source: str) -> "SentencePiece":
        """Train on the (non-empty) training lines; deterministic for a given text and size."""
        spm = _import_sentencepiece()
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter([line for line in lines if line.strip()]), model_writer=buf,
                vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
                # identity + kept whitespace: decoding gives back the text, so text BPC is fair
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                # SentencePiece strips its own unk piece from the text: name it so that a literal
                # "<unk>" (PTB has many) stays ordinary characters
                unk_id=0, unk_piece="<sp_unk>", eos_id=1, eos_piece=EOS, bos_id=-1, pad_id=-1,
                num_threads=1, minloglevel=2)  # one thread: the same model on every rank and rerun
        except RuntimeError as e:
            last = (str(e).strip().splitlines() or ["failed"])[-1]
            first = last.split("] ")[-1][:200]  # without the C++ source location
            raise UserError(f"SentencePiece training on {source} failed ({first}): lower data.vocab_size or "
                            "add training text") from None
        return cls(buf.getvalue())

    @property
    def vocab(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]

    def encode_lines(self, lines: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for pieces in self.sp.encode(list(lines)):
            ids.extend(pieces)
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text; ``<eos>`` becomes a newline."""
        lines, cur = [], []
        for i in ids:
            if i == self.eos_id:
                lines.append(self.sp.decode(cur))
                cur = []
            else:
                cur.append(int(i))
        return "\n".join([*lines, self.sp.decode(cur)])


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise UserError("data.tokenizer=sentencepiece needs the sentencepiece package: pip install -e "
                        ".[sentencepiece] (or pip install sentencepiece)") from None
    return sentencepiece


def detokenize(symbols: Sequence[str], scheme: str) -> str:
    """Join generated symbols into text.

    Args:
        symbols: vocabulary entries.
        scheme: 'ptb-char' (``_`` is the word boundary), 'char' (symbols are characters) or
            'word' (space-separated); ``<eos>`` is a newline in all three.
    """
    if scheme == "word":
        out, line = [], []
        for s in symbols:
            if s == EOS:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(s)
        return "".join(out) + " ".join(line)
    text = "".join("\n" if s == EOS else s for s in symbols)
    return text.replace("_", " ") if scheme == "ptb-char" else text
