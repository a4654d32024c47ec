"""Recurrent dropout without memory loss (Semeniuta, Severyn, Barth 2016).

Perturbs: the cell update ``g_t = tanh(...)`` before it enters ``c_t`` (``cell_p``), so the
memory ``c`` itself is never dropped. Granularity: a new mask per example and per time step
(the paper's "per-step mask sampling"), ``(B, H)`` each step, scaled by 1/(1-p).
"""

from lm.nn.lstm import LSTMLayer
from lm.nn.noise import RecurrentNoise
from lm.regularizers.base import Regularizer


class Semeniuta(Regularizer):
    name = "semeniuta"
    summary = "Semeniuta et al. 2016: dropout on the cell update g_t, new mask every step"
    perturbs = "cell update g_t"
    granularity = "per example, per time step"
    paper = "Semeniuta et al. 2016 (Tables 2-3 'Semeniuta')"
    options = ("cell_p",)

    def layer_noise(self, layer: LSTMLayer, batch: int, steps: int) -> RecurrentNoise:
        noise = super().layer_noise(layer, batch, steps)
        noise.cell_p = self.cfg.cell_p
        return noise
