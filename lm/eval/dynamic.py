"""Dynamic evaluation (Krause, Kahembwe, Murray, Renals 2018, *Dynamic Evaluation of Neural
Sequence Models*, ICML; arXiv 1709.07432).

The evaluation stream is cut into segments of ``segment`` tokens (per stream). Each segment is
first *scored* with the current weights (that score is the reported loss), then the weights are
updated on that segment's mean loss, so every token is predicted by weights that have seen only
the tokens before it. The hidden state carries across segments (detached). The model runs in
eval mode: no regularizer noise (as Krause's ``model.eval()``).

Update rules, with ``W0`` the trained weights, ``g`` the gradient of the segment's mean loss:

* ``sgd``: ``W ← W − η g + λ (W0 − W)`` (plain SGD; λ = 0 by default, i.e. no decay);
* ``rms`` (Krause's RMS-normalised rule with a global decay prior, Eq. 8-9 of the paper and
  ``dynamiceval.py``): ``W ← W − η g / (MS + ε) + λ · d ∘ (W0 − W)``, where ``MS`` is the
  root-mean-square of the gradient on the *training data* (:func:`gradient_stats`, as Krause's
  ``gradstat``: segments of ``segment`` tokens, ``stat_batch`` streams, eval mode) and the decay
  rates ``d = MS / mean_over_tensors(mean(MS))`` are clipped at ``1/λ`` so that a decay step never
  overshoots ``W0``.

With ``η = 0`` both rules leave the weights unchanged and the result is static evaluation
with windows of ``segment`` tokens, exactly.

Parameters that receive no gradient in eval mode (the ρ of ``bbb`` and ``bbb_flipout``: the
posterior's spread, unused by the mean-weight prediction) are left as they are, and the rms
rule's mean of ``MS`` is taken over the parameters that do.

**Streams.** Krause's protocol scores the split as **one** stream (``batch_size=1``, the default
of ``evaluate.py --dynamic-eval``): every token is then predicted by weights that have seen only
the tokens before it in corpus order. With ``B > 1`` streams each update averages the segments of
B distant parts of the split, so a token is predicted by weights that have also seen tokens from
later in the split (from the other streams): faster, but not Krause's protocol; ``evaluate.py``
records the number of streams and says so in its JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.data.batching import batchify, bptt_windows
from lm.eval.metrics import summarize
from lm.nn.model import LanguageModel, detach_state

RULES = ("sgd", "rms")
# Krause's defaults and grid for segments of 5 tokens (dynamiceval.py); rescaled by segment / 5.
KRAUSE_LR, KRAUSE_DECAY, KRAUSE_EPSILON = 5e-5, 2e-3, 2e-5
KRAUSE_LR_GRID = (3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4)
KRAUSE_DECAY_GRID = (1e-3, 2e-3, 3e-3, 5e-3)
SGD_LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # chosen: no published grid for the plain SGD rule


@dataclass
class DynamicSettings:
    """One dynamic-evaluation configuration.

    Attributes:
        rule: 'sgd' or 'rms'.
        lr: η.
        decay: λ, the decay rate towards the trained weights.
        segment: tokens per stream between updates (Krause: 5).
        epsilon: ε of the RMS rule.
    """

    rule: str = "rms"
    lr: float = KRAUSE_LR
    decay: float = KRAUSE_DECAY
    segment: int = 5
    epsilon: float = KRAUSE_EPSILON

    def as_dict(self) -> dict:
        return {"rule": self.rule, "lr": self.lr, "decay": self.decay, "segment": self.segment,
                "epsilon": self.epsilon}


def gradient_stats(model: LanguageModel, train: torch.Tensor, segment: int, batch_size: int = 100,
                   max_batches: int = 0) -> list[torch.Tensor]:
    """Krause's ``gradstat``: per parameter, ``sqrt(mean over segments of g²)`` on the training data.

    Args:
        train: ``(N,)`` training token ids.
        segment: segment length (the same as in evaluation).
        batch_size: streams of the training data (Krause: 100).
        max_batches: at most this many segments (0 = the whole split, Krause's default).
    Returns:
        one tensor per ``model.parameters()`` entry, same shapes (zeros for a parameter that
        receives no gradient in eval mode).
    """
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    sq = [torch.zeros_like(p) for p in params]
    source = batchify(train, batch_size).to(params[0].device)
    state = model.init_state(batch_size)
    count = 0
    for _, x, y in bptt_windows(source, segment):
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # bbb's ρ: unused in eval mode
        for s, g in zip(sq, grads):
            if g is not None:
                s.addcmul_(g, g)
        state = detach_state(state)
        count += 1
        if max_batches and count >= max_batches:
            break
    model.train(was_training)
    return [torch.sqrt(s / count) for s in sq]


def dynamic_evaluate(model: LanguageModel, data: torch.Tensor, level: str, settings: DynamicSettings,
                     batch_size: int = 1, ms: list[torch.Tensor] | None = None) -> dict:
    """Score ``data`` while adapting the weights segment by segment; the weights are restored after.

    Args:
        data: ``(N,)`` token ids of the split.
        settings: rule, η, λ, segment length, ε.
        batch_size: B streams; 1 is Krause's protocol (see the module docstring).
        ms: :func:`gradient_stats` (required by the 'rms' rule).
    Returns:
        ``{'loss', 'tokens', 'bpc' | 'ppl', 'updates'}``.
    """
    if settings.rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {settings.rule!r}")
    if settings.rule == "rms" and ms is None:
        raise ValueError("the rms rule needs gradient statistics (ms)")
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    originals = [p.detach().clone() for p in params]
    lr, lam = settings.lr, settings.decay
    if settings.rule == "rms":
        assert ms is not None
        used = [m for m in ms if bool(m.any())] or ms  # tensors without a gradient do not count
        mean_ms = sum(m.mean() for m in used) / len(used)
        rates = [(m / mean_ms).clamp(max=1 / lam) if lam > 0 else torch.zeros_like(m) for m in ms]
        scales = [1.0 / (m + settings.epsilon) for m in ms]
    source = batchify(data, batch_size).to(params[0].device)
    state = model.init_state(batch_size)
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    tokens = updates = 0
    try:
        for _, x, y in bptt_windows(source, settings.segment):
            with torch.enable_grad():
                logits, state = model(x, state)
                per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
                total += per_token.detach().double()  # scored before the update on this segment
                tokens += y.numel()
                grads = torch.autograd.grad(per_token / y.numel(), params, allow_unused=True)
            with torch.no_grad():
                for i, (p, g, w0) in enumerate(zip(params, grads, originals)):
                    if g is None:  # no gradient in eval mode (bbb's ρ): never moves from W0
                        continue
                    if settings.rule == "sgd":
                        step = g.mul(-lr)
                        if lam:
                            step.add_(w0 - p, alpha=lam)
                    else:
                        step = g.mul(scales[i]).mul_(-lr).add_(rates[i] * (w0 - p), alpha=lam)
                    p.add_(step)
            state = detach_state(state)
            updates += 1
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, originals):
                p.copy_(w0)
        model.train(was_training)
    return {**summarize(total.item(), tokens, level), "updates": updates}


def tune(model: LanguageModel, valid: torch.Tensor, level: str, base: DynamicSettings, lrs, decays,
         batch_size: int = 1, ms: list[torch.Tensor] | None = None) -> tuple[DynamicSettings, list[dict]]:
    """Grid search of (η, λ) on ``valid``; returns the best settings and every grid point's result."""
    best, grid = None, []
    for lam in decays:
        for lr in lrs:
            s = DynamicSettings(base.rule, lr, lam, base.segment, base.epsilon)
            r = dynamic_evaluate(model, valid, level, s, batch_size, ms)
            grid.append({"lr": lr, "decay": lam, "loss": r["loss"]})
            if best is None or r["loss"] < best[1]:
                best = (s, r["loss"])
    assert best is not None
    return best[0], grid


def default_grid(rule: str, segment: int) -> tuple[list[float], list[float]]:
    """Krause's grid for the rms rule, rescaled by ``segment / 5`` as in ``dynamiceval.py``; for sgd a
    chosen lr grid without decay."""
    if rule == "rms":
        f = segment / 5.0
        return [x * f for x in KRAUSE_LR_GRID], [x * f for x in KRAUSE_DECAY_GRID]
    return list(SGD_LR_GRID), [0.0]
