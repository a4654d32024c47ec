"""Benchmark scripts (run as ``python bench/NAME.py``). A package so that the scripts share their
timing code: :mod:`bench._floor` (interleaved timing, the window kernel's matmul floor) and
:mod:`bench._profiler` (torch.profiler helpers). Nothing under ``lm/`` imports from here."""
