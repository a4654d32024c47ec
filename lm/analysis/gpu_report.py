"""The markdown summary of ``scripts/gpu_check.sh``: one page from the files the check wrote.

``python -m lm.analysis.gpu_report env DIR DEVICE`` writes ``DIR/env.json`` (device name, torch,
CUDA and cuDNN versions, TF32 policy); ``python -m lm.analysis.gpu_report summary DIR`` reads

* ``env.json``;
* ``pytest_cuda.xml`` (JUnit XML of ``pytest -m cuda``): passed / failed / skipped counts and
  the failing tests' names;
* ``throughput.md`` and ``throughput.json`` (``bench/throughput.py``'s printed tables and
  records): the ratio table per precision and the bf16-over-fp32 speed-ups;
* ``train/metrics.jsonl`` (the timed ``char_flipout.yaml`` run): tokens/s and the valid-BPC curve,
  also drawn into ``train_curve.png``;

and writes ``DIR/summary.md`` (printed too). Missing pieces are reported as missing, not skipped.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from lm.nn.precision import Precision


def write_env(out: Path, device: str) -> dict:
    """Record where the check ran (``DIR/env.json``)."""
    env = Precision("fp32", device).describe()
    env["cuda"] = torch.version.cuda
    env["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    return env


def pytest_counts(path: Path) -> dict | None:
    """Counts from a JUnit XML file (None when absent or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _throughput_section(out: Path) -> list[str]:
    table = out / "throughput.md"  # bench/throughput.py's printed tables
    if not table.is_file() or not (out / "throughput.json").is_file():
        return ["_missing: throughput.md / throughput.json_"]
    return ["Training and evaluation tokens/s, each regularizer's ratio to `nn.LSTM` under the same "
            "precision (median of the rounds; records in throughput.json):", "", table.read_text().strip()]


def _train_section(run: Path, out: Path) -> list[str]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return ["_missing: train/metrics.jsonl (no validation finished)_"]
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not recs:
        return ["_no validation finished_"]
    lines = [f"{recs[-1]['step']} steps in {recs[-1]['elapsed_s']:.0f} s; training tokens/s "
             f"{recs[-1]['tokens_per_s']:,.0f}.", "", "| step | epoch | elapsed s | tokens/s | train BPC | valid BPC |",
             "|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['step']} | {r['epoch']:.3f} | {r['elapsed_s']:.0f} | {r['tokens_per_s']:,.0f} "
                     f"| {r.get('train_bpc', float('nan')):.3f} | {r.get('valid_bpc', float('nan')):.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["elapsed_s"] for r in recs], [r["valid_bpc"] for r in recs], marker="o")
        ax.set_xlabel("wall-clock s")
        ax.set_ylabel("valid BPC")
        ax.set_title(run.name)
        fig.tight_layout()
        fig.savefig(out / "train_curve.png", dpi=100)
        plt.close(fig)
        lines += ["", "![valid BPC against time](train_curve.png)"]
    except ImportError:
        pass
    return lines


def summary(out: Path) -> str:
    """Build ``DIR/summary.md`` from the check's files and return its text."""
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    lines = ["# GPU check", "", f"Device: {env.get('device_name', '?')} ({env.get('device', '?')}); torch "
             f"{env.get('torch', '?')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; TF32 {env.get('tf32')}.", ""]
    lines += ["## Tests (`pytest -m cuda`)", ""]
    counts = pytest_counts(out / "pytest_cuda.xml")
    if counts is None:
        lines.append("_missing: pytest_cuda.xml_")
    else:
        lines.append(f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                     f"{counts['skipped']} skipped (of {counts['tests']}).")
        lines += [f"- FAILED {n}" for n in counts["failed_names"]]
    lines += ["", "## One window: cuDNN, torch step, Triton step, Triton in CUDA graphs (`bench/gpu_steps.py`)", ""]
    steps = out / "steps.md"
    lines.append(steps.read_text().strip() if steps.is_file() and (out / "steps.json").is_file()
                 else "_missing: steps.md / steps.json_")
    lines += ["", "## Throughput (`bench/throughput.py`)", ""] + _throughput_section(out)
    lines += ["", "## Timed training (`char_flipout.yaml`)", ""] + _train_section(out / "train", out)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "env":
        write_env(Path(argv[1]), argv[2] if len(argv) > 2 else "cpu")
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        print(summary(Path(argv[1])))
        return 0
    print("usage: python -m lm.analysis.gpu_report env DIR DEVICE | summary DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
