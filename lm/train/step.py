"""One guarded optimizer update: the gradient norm, the non-finite checks, the step.

Kept apart from the loop (lm/train/trainer.py) because it carries the policy that protects a long
run: a step whose loss or gradient norm is not finite raises :class:`Diverged` *before* the
weights change (a finite loss can still have inf/NaN gradients), except under fp16, where the
gradient scaler skips an overflowed step by design. The loss and the gradient norm reach the host
in one transfer: the step's only host synchronisation.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


class Diverged(Exception):
    """The training loss or the gradient norm became NaN or infinite."""


def guarded_update(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, clip: float, mean: Callable[[float], float], step: int) -> float:
    """Update from the gradients in ``.grad`` (the caller ran backward: eagerly or in a CUDA graph,
    lm/train/graphs.py), unless the step diverged. Returns the mean ``loss``.

    Args:
        loss: the data loss that is reported and checked.
        scaler: fp16's gradient scaler (a pass-through when disabled).
        clip: global-norm clipping threshold (0 = off; the norm is checked either way).
        mean: averages a float over the ranks (identity in one process), so all ranks see a divergence.
        step: the number of the step, for the message.
    """
    scaler.unscale_(optimizer)  # the true gradients for the norm and clipping (no-op unless fp16)
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:  # the global norm before clipping; DDP has already averaged the gradients
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    value, norm_value = torch.stack([loss.detach().float(), norm.to(loss.device, torch.float32)]).tolist()
    value = mean(value)
    if not math.isfinite(value):
        raise Diverged(f"non-finite training loss ({value}) at step {step}")
    if not math.isfinite(norm_value) and not scaler.is_enabled():
        raise Diverged(f"non-finite gradient norm ({norm_value}) at step {step}")
    scaler.step(optimizer)  # fp16: skips a step whose gradients overflowed
    scaler.update()
    return value
