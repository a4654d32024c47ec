"""Training: the trainer loop, optimizer and schedules, checkpoints, multi-process training, TensorBoard.

May import ``lm.eval`` (validation), ``lm.nn``, ``lm.regularizers``, ``lm.data`` and the top-level
modules; never ``lm.cli`` or ``lm.analysis``.
"""
