"""glibc's malloc for long CPU trainings: large blocks straight from the system and back.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block below its *mmap threshold* from
its heap, and raises that threshold (up to 32 MiB) each time a larger mmapped block is freed, so
after the first window every window-long tensor of a model like AWD's (9 to 31 MiB at a window of
70) lives in the heap. With variable BPTT those tensors change size from window to window; the
heap then holds free blocks of every size between them, resident and unused, and the process's
peak resident set creeps up over a run (``bench/memory.py`` on ``word_awd_wd_flipout.yaml``: 145
MiB between the 7th and the 180th window, at lengths below the longest, docs/shared_machines.md).

A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising it) sends
every block of that size and more to ``mmap``, which hands it back to the system when freed, so
the resident set follows the tensors alive. The cost is the page faults of those blocks' first
touch in every window (measured in docs/shared_machines.md). Smaller blocks (a step's ``(B, 4H)``
products, 1.5 MiB for AWD) stay in the heap, which reuses them at the same size.

``FLIPOUT_LM_MMAP_THRESHOLD_MB`` sets the threshold in MiB (default 4); ``0`` leaves glibc's own
behaviour. Other C libraries are left alone. Applied once per process, by CPU trainings
(:class:`lm.train.trainer.Trainer`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

from lm.errors import UserError

ENV = "FLIPOUT_LM_MMAP_THRESHOLD_MB"
DEFAULT_MIB = 4
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def threshold_mib(environ=os.environ) -> int:
    """The threshold asked for, in MiB (0: leave glibc alone); a one-line error for a bad value."""
    raw = environ.get(ENV, str(DEFAULT_MIB)).strip()
    if not raw.isdigit() or int(raw) > 32:
        raise UserError(f"{ENV}={raw!r} is not a threshold glibc takes: give a whole number of MiB from 1 to 32, "
                        "or 0 for glibc's own")
    return int(raw)


@functools.cache  # once per process: later calls say what the first did
def tune() -> str:
    """Set the threshold (first call of the process) and say what holds, for the start-up summary."""
    mib = threshold_mib()
    if mib == 0:
        text = f"glibc's own malloc thresholds ({ENV}=0)"
    elif not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        text = "the C library's own malloc (not glibc: no threshold set)"
    elif ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, mib << 20) == 1:
        text = f"blocks of {mib} MiB and more mmapped, returned to the system when freed ({ENV}=0: glibc's own)"
    else:
        text = f"glibc refused an mmap threshold of {mib} MiB: its own thresholds"
    return text
