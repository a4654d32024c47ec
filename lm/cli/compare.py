"""``python evaluate.py compare RUN_DIR... [--out DIR]``: tables, learning curves and JSON of runs.

Prints the tables; with ``--out DIR`` also writes ``DIR/compare.md`` (the same text),
``DIR/compare.json`` and ``DIR/curves.png``. Without ``--out`` nothing is written: no directory
is a safe default (the current one may be a source tree, a run directory is read by other tools).
What the tables hold is described in :mod:`lm.eval.compare`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from lm.eval.compare import aggregate, find_runs, read_run, render_markdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py compare", description="tables, learning curves and JSON of runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or directories holding them)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write compare.md, compare.json and curves.png there (default: print only)")
    p.add_argument("--no-plot", action="store_true", help="skip the learning-curve figure")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = [read_run(path) for path in find_runs(args.runs)]
    tables = aggregate(runs)
    text = render_markdown(tables)
    if args.out is None:
        print(text, end="")
        print("(printed only: add --out DIR to write compare.md, compare.json and curves.png)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps({"tables": tables}, indent=2) + "\n")
    if not args.no_plot:
        from lm.analysis.plots import plot_curves  # matplotlib only when a figure is wanted

        plot_curves(tables, {str(r.path): r for r in runs}, out / "curves.png")
    print(text, end="")
    print(f"wrote {out}/compare.md, compare.json" + ("" if args.no_plot else ", curves.png"))
    return 0
