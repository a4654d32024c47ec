"""User-facing errors and the wrapper that turns them into one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI): one line, exit code 2.

    The message must name the problem and the fix; no traceback is shown.
    """


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as ``error: ...`` on stderr and return 2."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
