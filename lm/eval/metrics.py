"""Loss bookkeeping and the reported metrics, defined once.

Loss is the mean negative log-likelihood in nats per *predicted* token: the sum of the
per-token cross-entropies divided by the number of targets (every window of ``L`` rows and ``B``
streams predicts ``L * B`` tokens; the first token of each stream is never predicted and the
``N mod B`` tail dropped by batchify is not counted). Char level reports bits per character,
``bpc = nats / ln 2``; word level reports perplexity, ``ppl = exp(nats)``.
"""

from __future__ import annotations

import math

from lm.data.corpus import Corpus
from lm.data.custom import TextCorpus

LN2 = math.log(2.0)


def metric_name(level: str) -> str:
    """'bpc' for char level, 'ppl' for word level (and other token levels)."""
    return "bpc" if level == "char" else "ppl"


def from_nats(loss: float, level: str) -> float:
    """Convert a mean loss in nats to the level's metric."""
    if level == "char":
        return loss / LN2
    return math.exp(loss) if loss < 700 else math.inf


def summarize(total_nats: float, tokens: int, level: str) -> dict:
    """``{'loss', 'tokens', 'bpc' | 'ppl'}`` from a summed loss and the number of predicted tokens."""
    loss = total_nats / tokens
    return {"loss": loss, "tokens": tokens, metric_name(level): from_nats(loss, level)}


def add_text_bpc(result: dict, corpus: Corpus, split: str) -> dict:
    """``result`` of :func:`lm.eval.evaluation.evaluate` plus ``text_bpc`` and ``chars`` for a text corpus.

    PTB results are returned unchanged (so PTB metrics files stay as they were).
    """
    if not isinstance(corpus, TextCorpus):
        return result
    bits = result["loss"] * corpus.split_tokens[split] / LN2
    return {**result, "text_bpc": bits / corpus.chars[split], "chars": corpus.chars[split]}
