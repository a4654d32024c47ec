"""Where tensors live: the ``train.device`` / ``--device`` names resolved to a torch device."""

from __future__ import annotations

import torch

from lm.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` / ``cuda:N`` must exist on this machine.

    A CUDA device that is not there is a one-line :class:`UserError` (not torch's assertion).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is invalid: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available on this machine (no GPU or a "
                            "CPU-only PyTorch): use cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                            f"cuda:0 ... cuda:{count - 1}")
    return device
