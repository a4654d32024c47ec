"""Naive dropout on the non-recurrent connections (Zaremba, Sutskever, Vinyals 2014).

Perturbs: the LSTM stack's input, the outputs between layers and the final output (``input_p``,
``between_p``, ``output_p``), never the recurrence. Granularity: a new mask for every element,
i.e. per example *and per time step*. Layout ``(T, B, F)``.
"""

from lm.regularizers.base import Regularizer


class Dropout(Regularizer):
    name = "dropout"
    summary = "Zaremba et al. 2014: dropout on non-recurrent connections, new mask every step"
    perturbs = "LSTM inputs, between-layer and final outputs"
    granularity = "per example, per time step"
    paper = "Zaremba et al. 2014 (Table 3 'Zaremba')"
    locked = False
