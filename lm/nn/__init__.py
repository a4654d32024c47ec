"""The recurrence and the model: the one LSTM layer, its window kernel, matmul backends, fused C step
(``csrc/``, built by ``cext.py``) and torch step, flipout, the noise draws, the LM.

May import only the top-level modules, except ``model.py`` (the top of this package), which builds its
regularizer from ``lm.regularizers``; regularizers use the layer and noise plan below it. Never training,
evaluation or data code.
"""
