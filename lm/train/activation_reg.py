"""Activation regularization (AR) and temporal activation regularization (TAR).

Merity, Keskar, Socher 2017, *Regularizing and Optimizing LSTM Language Models*, Sec. 4.6:

* AR  = α · mean(m ∘ h_t)²: the squared *dropped* output of the last LSTM layer, which keeps
  activations small;
* TAR = β · mean(h_t − h_{t−1})²: the squared change between consecutive *raw* (undropped)
  outputs of the last layer, which slows the hidden state down.

Both means run over every element of ``(T, B, H)`` (TAR over ``(T−1, B, H)``), as AWD-LSTM's
``pow(2).mean()``; the penalty is added to the training loss only, never to the reported loss.
"""

from __future__ import annotations

import torch


def activation_terms(raw: torch.Tensor, dropped: torch.Tensor, ar: float,
                     tar: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α·mean(dropped²), β·mean((raw[1:] − raw[:−1])²))`` as differentiable scalars.

    Args:
        raw: ``(T, B, H)`` last-layer outputs before output dropout.
        dropped: ``(T, B, H)`` the same after output dropout.
        ar, tar: α and β; a zero weight gives an exact zero (no graph).
    """
    zero = raw.new_zeros(())
    a = ar * dropped.pow(2).mean() if ar else zero
    t = tar * (raw[1:] - raw[:-1]).pow(2).mean() if tar and raw.size(0) > 1 else zero
    return a, t


class ActivationRegularizer:
    """The trainer's AR/TAR bookkeeping: the penalty of each step and its mean per logging interval."""

    def __init__(self, ar: float, tar: float) -> None:
        self.ar, self.tar = ar, tar
        self._sums: torch.Tensor | None = None  # (AR, TAR) summed on the device: no host sync per step
        self._count = 0

    @property
    def active(self) -> bool:
        return bool(self.ar or self.tar)

    def penalty(self, raw: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """AR + TAR of one training window, recorded for :meth:`flush`."""
        a, t = activation_terms(raw, dropped, self.ar, self.tar)
        terms = torch.stack([a, t]).detach().double()
        self._sums = terms if self._sums is None else self._sums + terms
        self._count += 1
        return a + t

    def flush(self) -> dict:
        """``{'train_ar', 'train_tar'}``: means over the steps since the last call ({} when off)."""
        if not self.active:
            return {}
        ar, tar = self._sums.tolist() if self._sums is not None else (0.0, 0.0)
        n = max(self._count, 1)
        self._sums, self._count = None, 0
        return {"train_ar": ar / n, "train_tar": tar / n}
