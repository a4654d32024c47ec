"""examples/sequence_classifier.py runs end to end at a tiny size and prints its three models' accuracies
and the Bayesian variant's Monte-Carlo predictive entropy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sequence_classifier_tiny():
    args = ["--train", "16", "--test", "32", "--steps", "6", "--hidden", "8", "--epochs", "1", "--batch", "8",
            "--mc-samples", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "sequence_classifier.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for label in ("nn.LSTM", "wd_flipout", "bbb_flipout", "bbb_flipout (MC, K=2)"):
        row = re.search(rf"^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
        assert row, (label, out)
        assert all(0 <= float(v) <= 1 for v in row.groups()[:2])
    entropies = re.search(r"test right ([\d.na]+), test wrong ([\d.na]+), pure noise \(out of distribution\) ([\d.]+)",
                          out)
    assert entropies and 0 <= float(entropies.group(3)) <= 1.3863, out
