#!/usr/bin/env python
"""Print the configuration reference (docs/configuration.md) from the config schema.

    python scripts/config_reference.py > docs/configuration.md

The logic is in lm/config/reference.py; tests/test_config_reference.py checks the committed page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import this checkout's lm

from lm.config.reference import render  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
