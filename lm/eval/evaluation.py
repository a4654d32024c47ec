"""Evaluation over a whole split with the hidden state carried across windows."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lm.data.batching import batchify, bptt_windows
from lm.eval.metrics import summarize
from lm.nn.model import LanguageModel
from lm.nn.precision import Precision


@torch.no_grad()
def evaluate(model: LanguageModel, data: torch.Tensor, level: str, batch_size: int = 10, bptt: int = 100,
             precision: Precision | None = None) -> dict:
    """Mean loss and metric of ``model`` on ``data``.

    Args:
        data: ``(N,)`` token ids of the split (moved to the model's device here).
        level: 'char' (BPC) or 'word' (perplexity).
        batch_size: number of parallel streams; the stream length is ``N // batch_size``.
        bptt: window length; only affects speed since the state carries over.
        precision: the forward pass's policy (:mod:`lm.nn.precision`; None: float32). The loss is
            summed in float64 from float32 logits either way.
    Returns:
        ``{'loss', 'tokens', 'bpc' | 'ppl'}`` (see :mod:`lm.eval.metrics`).
    """
    was_training = model.training
    model.eval()
    device = model.decoder.weight.device
    source = batchify(data, batch_size).to(device)
    state = model.init_state(batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    for _, x, y in bptt_windows(source, bptt):
        with autocast():
            logits, state = model(x, state)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        tokens += y.numel()
    model.train(was_training)
    return summarize(total.item(), tokens, level)
