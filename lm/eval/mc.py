"""Monte-Carlo evaluation: the predictive average over K noise samples of the trained regularizer.

For each predicted token, p̄(x_t) = (1/K) Σ_k p_k(x_t), where p_k is the model's prediction under
the k-th draw of the regularizer's training noise; the loss is −log p̄, computed in log space as
``logsumexp_k log p_k − log K``. Each sample carries its own hidden state across the whole split.
Noise is drawn exactly as in training (the model in train mode, nothing updated): once per
window for per-window draws, every step for per-step masks, so the window length matters here,
unlike deterministic evaluation.

The K samples must be independent as the regularizer defines its noise
(:meth:`lm.regularizers.base.Regularizer.shares_noise_across_batch`):

* noise drawn per example (dropout masks, variational/semeniuta/zoneout masks, flipout signs):
  the B streams are replicated K times into one batch of K·B columns, column ``k·B + b`` is
  sample k of stream b, and one forward pass per window draws all K·B examples' noise;
* noise shared by the batch (weight_drop's mask, gauss's ΔŴ, embedding dropout): K separate
  forward passes per window, each with its own draw and its own hidden state.

With K = 1 both reduce to one stochastic pass over the split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.data.batching import batchify, bptt_windows
from lm.eval.metrics import summarize
from lm.nn.model import LanguageModel


def _token_logprob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(T, B)`` log-probabilities of the targets ``y`` under ``logits`` ``(T, B, V)``."""
    return -F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).double()


@torch.no_grad()
def mc_evaluate(model: LanguageModel, data: torch.Tensor, level: str, samples: int, batch_size: int = 10,
                bptt: int = 100) -> dict:
    """Score ``data`` with the K-sample predictive average.

    Args:
        data: ``(N,)`` token ids.
        samples: K >= 1.
        batch_size: B streams (as in :func:`lm.eval.evaluation.evaluate`, so the same tokens are scored).
        bptt: window length; the regularizer redraws its per-window noise every window.
    Returns:
        ``{'loss', 'tokens', 'bpc' | 'ppl', 'samples', 'draws'}``; ``draws`` is 'batched' (one pass of
        K·B streams) or 'separate' (K passes of B streams).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    was_training = model.training
    model.train()  # the regularizer's noise is on; no gradients, no optimizer: nothing is updated
    device = model.decoder.weight.device
    source = batchify(data, batch_size).to(device)
    batched = not model.regularizer.shares_noise_across_batch()
    log_k = math.log(samples)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        if batched:
            wide = source.repeat(1, samples)  # column k*B + b: sample k of stream b
            state = model.init_state(samples * batch_size)
            for _, x, y in bptt_windows(wide, bptt):
                logits, state = model(x, state)
                logp = _token_logprob(logits, y).view(y.size(0), samples, batch_size)
                total -= (torch.logsumexp(logp, dim=1) - log_k).sum()
                tokens += y.size(0) * batch_size
        else:
            states = [model.init_state(batch_size) for _ in range(samples)]
            for _, x, y in bptt_windows(source, bptt):
                logps = []
                for k in range(samples):
                    logits, states[k] = model(x, states[k])
                    logps.append(_token_logprob(logits, y))
                total -= (torch.logsumexp(torch.stack(logps), dim=0) - log_k).sum()
                tokens += y.numel()
    finally:
        model.train(was_training)
    return {**summarize(total.item(), tokens, level), "samples": samples,
            "draws": "batched" if batched else "separate"}
