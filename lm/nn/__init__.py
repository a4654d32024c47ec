"""The recurrence and the model: the one LSTM layer, its window kernel and matmul backends, flipout, the LM.

May import only the top-level modules, except ``model.py`` (the top of this package), which builds its
regularizer from ``lm.regularizers``; regularizers use the layer and noise plan below it. Never training,
evaluation or data code.
"""
