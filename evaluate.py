#!/usr/bin/env python
"""Evaluate a checkpoint: ``python evaluate.py runs/char_flipout/best.pt --split test``.

Also ``python evaluate.py compare RUN_DIR...`` (tables and curves of runs) and
``python evaluate.py generate CHECKPOINT`` (sample text); see docs/workflow.md.
"""

import sys

from lm.errors import run_cli
from lm.cli.evaluate import main as _main


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
