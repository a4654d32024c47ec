#!/usr/bin/env python
"""Train an LSTM language model on PTB: ``python train.py --config char_flipout.yaml``.

Seed sweeps: ``--seeds 1 2 3``; several GPUs: ``torchrun --nproc_per_node 4 train.py ...``;
your own text: ``data.path`` (docs/data.md).
"""

import sys

from lm.errors import run_cli


def _main(argv):
    from lm.cli.train import main as real_main  # imported inside run_cli: Ctrl-C while torch loads is one line too

    return real_main(argv)


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
