#!/usr/bin/env python
"""Evaluate a checkpoint: ``python evaluate.py runs/char_flipout/best.pt --split test``.

Also ``python evaluate.py compare RUN_DIR...`` (tables and curves of runs) and
``python evaluate.py generate CHECKPOINT`` (sample text); see docs/workflow.md.
"""

import sys

from lm.errors import run_cli


def _main(argv):
    from lm.cli.evaluate import main as real_main  # imported inside run_cli: Ctrl-C while torch loads is one line too

    return real_main(argv)


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
