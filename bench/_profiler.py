"""torch.profiler helpers shared by ``bench/throughput.py`` (peak memory of a step) and
``bench/profile_step.py`` (where a step's time goes)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from typing import Callable

import torch

from lm.nn import lstm_fused

from bench._floor import sync


@contextlib.contextmanager
def profiler_quiet():
    """The profiler's C++ side prints start/stop lines on file descriptor 2; drop those, keep the rest."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no real stderr (e.g. captured): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            noise = (b"USDT:", b"STAGE:", b"Memory block of unknown size")
            for line in tmp.read().splitlines():
                if not any(n in line for n in noise):
                    sys.stderr.write(line.decode(errors="replace") + "\n")


def peak_step_memory(fn: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory (MiB) allocated during ``fn`` above the level at its start: on CUDA
    ``max_memory_allocated`` minus the level at the start; on CPU the running sum of allocated
    minus freed bytes of ``torch.profiler``'s memory events, maximised over the call (NaN when
    the private profiler API it reads has moved). The fused step's buffer pool
    (:mod:`lm.nn.lstm_fused`) is emptied first, so the buffers it would reuse are counted."""
    lstm_fused.clear_pool()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    try:
        with profiler_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except (AttributeError, RuntimeError):  # private profiler API moved: report no number
        return math.nan
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak / 2**20
