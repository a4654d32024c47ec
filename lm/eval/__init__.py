"""Evaluation: whole-split scoring, the metrics (loss, BPC, perplexity), text generation, run comparison.

May import ``lm.nn``, ``lm.regularizers``, ``lm.data`` and the top-level modules; never ``lm.train``,
``lm.cli`` or ``lm.analysis`` (checkpoint loading lives in ``lm.train.checkpoint`` and is used by the CLI).
"""
