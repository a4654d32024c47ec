"""User-facing errors and the wrapper that turns them into one line and a documented exit code.

Exit codes (docs/guarantees.md): 0 done; 1 the run diverged; 2 bad input (config, data,
checkpoint, CLI, run directory); 3 the run directory could not be written (disk full,
read-only file system); 4 an unexpected failure after training started (lm/train/failure.py:
last.pt kept, traceback in the run directory); 130 / 143 interrupted by Ctrl-C (SIGINT) / SIGTERM.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Sequence

EXIT_USER = 2
EXIT_STORAGE = 3
EXIT_SIGINT = 130

# Under torchrun, how long a process other than rank 0 holds back its error line. Every process
# reads the same command line and data, so a bad input fails all of them at about the same moment:
# rank 0 prints the line and exits, and torchrun stops the others (it polls every 0.1 s) before
# they print it again. An error that rank 0 did not meet (a file missing on one node) is printed
# by its process after the wait. The wait also keeps rank 0 from being stopped before it prints.
QUIET_RANK_GRACE_S = 3.0


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI): one line, exit code 2.

    The message must name the problem and the fix; no traceback is shown. Under ``torchrun``
    it is printed once, by rank 0 (see :func:`run_cli`).
    """

    exit_code = EXIT_USER


class StorageError(UserError, OSError):
    """A file of the run could not be written (disk full, read-only file system): one line, exit code 3.

    Also an :class:`OSError`, so best-effort writers (data caches) that skip an ``OSError`` still do.
    """

    exit_code = EXIT_STORAGE

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


def _rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as ``error: ...`` on stderr and return its exit code.

    Under torchrun rank 0 prints at once; another rank prints (naming itself) only if it is
    still alive after ``QUIET_RANK_GRACE_S``, i.e. if rank 0 did not fail too. Ctrl-C before
    training installs its own handler (loading data, building the model) prints one line and
    returns 130 (the run directory is only changed once the run is built, see :mod:`lm.train.rundir`).
    """
    try:
        return int(main(argv) or 0)
    except UserError as e:
        rank = _rank()
        if rank:
            time.sleep(QUIET_RANK_GRACE_S)
        print(f"error: {f'(process {rank}) ' if rank else ''}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C) before training started; no checkpoint was written", file=sys.stderr)
        return EXIT_SIGINT
