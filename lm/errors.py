"""User-facing errors and the wrapper that turns them into one line and exit code 2."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Sequence

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


def _rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as ``error: ...`` on stderr and return 2.

    Under torchrun rank 0 prints at once; another rank prints (naming itself) only if it is
    still alive after ``QUIET_RANK_GRACE_S``, i.e. if rank 0 did not fail too."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        rank = _rank()
        if rank:
            time.sleep(QUIET_RANK_GRACE_S)
        print(f"error: {f'(process {rank}) ' if rank else ''}{e}", file=sys.stderr)
        return 2
