#!/usr/bin/env python
"""Train an LSTM language model on PTB: ``python train.py --config char_flipout.yaml``.

Seed sweeps: ``--seeds 1 2 3``; several GPUs: ``torchrun --nproc_per_node 4 train.py ...``;
your own text: ``data.path`` (docs/workflow.md).
"""

import sys

from lm.errors import run_cli
from lm.cli.train import main as _main


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
