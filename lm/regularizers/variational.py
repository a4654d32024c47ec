"""Variational LSTM dropout (Gal & Ghahramani 2016).

Perturbs: the recurrent hidden state ``h_{t-1}`` inside the recurrence (``hidden_p``), plus the
shared locked dropout on inputs/outputs/between layers and embedding dropout. Granularity: one
mask per example held over the time steps of a window (a window is one forward call); the
recurrent mask is ``(B, H)``, the others ``(1, B, F)``. With ``hidden_p = 0`` it runs on the
fused LSTM kernel; with ``hidden_p > 0`` it needs the explicit loop.
"""

import torch

from lm.nn.lstm import LSTMLayer
from lm.nn.noise import RecurrentNoise
from lm.nn.tape import drawn
from lm.regularizers.base import Regularizer


class Variational(Regularizer):
    name = "variational"
    summary = "Gal & Ghahramani 2016: per-window masks on inputs, outputs and recurrent h"
    perturbs = "h_{t-1} in the recurrence, LSTM inputs/outputs, embeddings"
    granularity = "per example, held over the window"
    paper = "Gal & Ghahramani 2016 (Tables 2-3 'Gal')"
    options = ("hidden_p",)

    def layer_noise(self, layer: LSTMLayer, batch: int, steps: int) -> RecurrentNoise:
        noise = super().layer_noise(layer, batch, steps)
        p = self.cfg.hidden_p
        if self.training and p > 0:
            w = layer.weight_hh
            shape = (batch, layer.hidden_size)
            keep = drawn(lambda: torch.empty(shape, dtype=w.dtype, device=w.device).bernoulli_(1 - p), shape)
            noise.hidden_mask = keep / (1 - p)
        return noise
