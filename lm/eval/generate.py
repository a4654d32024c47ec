"""Sampling text from a trained model (``python evaluate.py generate``, :mod:`lm.cli.generate`).

The model reads ``<eos>`` (a line start), then the ``--prime`` text, then samples ``--tokens``
symbols one at a time from ``softmax(logits / T)`` (``T = 0``: always the most likely one),
carrying its hidden state. Symbols are joined back into text the way the corpus was cut:

* PTB char (``data.level: char``): ``_`` is the word boundary, so it prints as a space;
* your own corpus, char: symbols are the characters themselves;
* word level: words separated by spaces;
* SentencePiece: the run directory's ``tokenizer.model`` decodes the pieces;

and ``<eos>`` prints as a newline in all of them. A prime symbol outside the vocabulary is an
error that names it (the vocabulary is the checkpoint's ``ck["vocab"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lm.config import Config, load_config
from lm.data.custom import TOKENIZER_FILE, tokenizer_name
from lm.data.tokenizers import EOS, SentencePiece, detokenize
from lm.errors import UserError
from lm.nn.model import LanguageModel


class Codec:
    """Prime text -> token ids and ids -> text for one checkpoint.

    Args:
        cfg: the checkpoint's config (PTB or own corpus, and its tokenizer).
        vocab: ``ck["vocab"]``.
        run_dir: where ``tokenizer.model`` lies (SentencePiece only).
    """

    def __init__(self, cfg: Config, vocab: Sequence[str], run_dir: Path) -> None:
        self.vocab = list(vocab)
        self.index = {s: i for i, s in enumerate(self.vocab)}
        if EOS not in self.index:
            raise UserError(f"the checkpoint's vocabulary has no {EOS}: it was not written by train.py")
        self.eos = self.index[EOS]
        custom = cfg.data.path is not None
        self.scheme = tokenizer_name(cfg.data) if custom else ("ptb-char" if cfg.data.level == "char" else "word")
        self.sp = None
        if self.scheme == "sentencepiece":
            path = Path(run_dir) / TOKENIZER_FILE
            if not path.is_file():
                raise UserError(f"{path} not found: a SentencePiece run keeps its tokenizer next to the checkpoint; "
                                "copy tokenizer.model from the run directory too")
            self.sp = SentencePiece(path.read_bytes())
            if self.sp.vocab != self.vocab:
                raise UserError(f"{path} does not match the checkpoint's vocabulary: use the run's own tokenizer.model")

    def _symbols(self, text: str) -> list[str]:
        lines = text.split("\n")
        out: list[str] = []
        for i, line in enumerate(lines):
            if self.scheme == "word":
                out.extend(line.split())
            elif self.scheme == "ptb-char":
                out.extend("_".join(line.split()))  # PTB char spells words with '_' between them
            else:
                out.extend(line)
            if i + 1 < len(lines):
                out.append(EOS)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of the prime text; unknown symbols raise a :class:`UserError` naming them."""
        if self.sp is not None:
            ids = self.sp.encode_lines(text.split("\n"))[:-1]  # no line end after the last line
            unknown = sorted({c for c in text if c != "\n" and self.sp.unk_id in self.sp.encode_lines([c])})
        else:
            symbols = self._symbols(text)
            unknown = list(dict.fromkeys(s for s in symbols if s not in self.index))
            ids = [self.index[s] for s in symbols if s in self.index]
        if unknown:
            shown = ", ".join(map(repr, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
            raise UserError(f"--prime has {len(unknown)} symbol(s) not in the model's {len(self.vocab)}-symbol "
                            f"vocabulary: {shown}; remove or replace them")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.sp is not None:
            return self.sp.decode(ids)
        return detokenize([self.vocab[i] for i in ids], self.scheme)


@torch.no_grad()
def sample(model: LanguageModel, context: Sequence[int], tokens: int, temperature: float,
           generator: torch.Generator) -> list[int]:
    """Feed ``context`` (non-empty ids), then draw ``tokens`` ids.

    Args:
        temperature: divides the logits; 0 picks the argmax.
        generator: on the model's device.
    Returns:
        The sampled ids (not including the context).
    """
    model.eval()
    device = model.decoder.weight.device
    state = model.init_state(1)
    logits, state = model(torch.tensor(list(context), device=device).view(-1, 1), state)  # (T, 1, V)
    out: list[int] = []
    for _ in range(tokens):
        last = logits[-1, 0].double()
        if temperature == 0:
            tok = int(last.argmax())
        else:
            tok = int(torch.multinomial(torch.softmax(last / temperature, 0), 1, generator=generator))
        out.append(tok)
        logits, state = model(torch.tensor([[tok]], device=device), state)
    return out
