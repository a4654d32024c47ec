"""The recurrence and the model: the one LSTM layer, its window kernel, matmul backends, fused C step
(``csrc/``, built by ``cext.py``) and torch step, flipout, the noise draws, the drop-in
``RegularizedLSTM`` (the stack of layers with its regularizer) and the LM built on it.

May import only the top-level modules, except ``regularizer_args.py``, ``regularized.py`` and ``model.py``
(the top of this package), which build their regularizer from ``lm.regularizers``; regularizers use the layer and noise
plan below them. Never training, evaluation or data code.

``lm.nn.RegularizedLSTM`` and ``lm.nn.convert`` are loaded on first use: importing them here eagerly
would make ``import lm.regularizers`` (which needs ``lm.nn.lstm``) import itself through this file.
"""

__all__ = ["RegularizedLSTM", "convert"]


def __getattr__(name: str):
    if name in __all__:
        from lm.nn import regularized

        return getattr(regularized, name)
    raise AttributeError(f"module 'lm.nn' has no attribute {name!r}")
