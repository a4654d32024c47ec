"""Zoneout (Krueger et al. 2016).

Perturbs: the state update; each unit of ``c_t`` (prob. ``zoneout_c``) and ``h_t`` (prob.
``zoneout_h``) keeps its previous value. Granularity: a new Bernoulli mask per example and per
time step, ``(B, H)``. Evaluation uses the expectation ``z·old + (1-z)·new``, so unlike the
other regularizers eval mode is not the plain LSTM unless both rates are 0.
"""

from lm.nn.lstm import LSTMLayer
from lm.nn.noise import RecurrentNoise
from lm.regularizers.base import Regularizer


class Zoneout(Regularizer):
    name = "zoneout"
    summary = "Krueger et al. 2016: units keep their previous c/h, new mask every step"
    perturbs = "c_t and h_t updates"
    granularity = "per example, per time step (eval: expectation)"
    paper = "Krueger et al. 2016 (Tables 2-3 'Zoneout')"
    options = ("zoneout_c", "zoneout_h")

    def layer_noise(self, layer: LSTMLayer, batch: int, steps: int) -> RecurrentNoise:
        noise = super().layer_noise(layer, batch, steps)
        noise.zoneout_c, noise.zoneout_h = self.cfg.zoneout_c, self.cfg.zoneout_h
        return noise
