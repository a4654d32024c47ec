"""Analysis: statistics (t-tests, fits, paired tests and power), plots, the gradient-variance estimator,
the study report and the paired study's section.

May import ``lm.eval``, ``lm.nn``, ``lm.regularizers``, ``lm.data`` and the top-level modules; never
``lm.train`` or ``lm.cli``.
"""
