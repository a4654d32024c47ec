"""User-facing errors and the wrapper that turns them into one line and a documented exit code.

Exit codes (README, "Guarantees"): 0 done; 1 the run diverged; 2 bad input (config, data,
checkpoint, CLI, run directory); 3 the run directory could not be written (disk full,
read-only file system); 130 / 143 interrupted by Ctrl-C (SIGINT) / SIGTERM.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_USER = 2
EXIT_STORAGE = 3
EXIT_SIGINT = 130


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI): one line, exit code 2.

    The message must name the problem and the fix; no traceback is shown.
    """

    exit_code = EXIT_USER


class StorageError(UserError, OSError):
    """A file of the run could not be written (disk full, read-only file system): one line, exit code 3.

    Also an :class:`OSError`, so best-effort writers (data caches) that skip an ``OSError`` still do.
    """

    exit_code = EXIT_STORAGE

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as ``error: ...`` on stderr and return its exit code.

    Ctrl-C before training installs its own handler (loading data, building the model) prints one
    line and returns 130 (the run directory is only changed once the run is built, see
    :mod:`lm.train.rundir`).
    """
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C) before training started; no checkpoint was written", file=sys.stderr)
        return EXIT_SIGINT
