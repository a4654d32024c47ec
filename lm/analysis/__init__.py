"""Analysis: statistics (t-tests, fits), plots, the gradient-variance estimator, the study report.

May import ``lm.eval``, ``lm.nn``, ``lm.regularizers``, ``lm.data`` and the top-level modules; never
``lm.train`` or ``lm.cli``.
"""
