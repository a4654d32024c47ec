"""``python -m lm.analysis.study_report``: writes ``docs/results.md`` from the runs of ``scripts/study.sh``.

Reads ``<study dir>/{char,word}/<regularizer>/seed<S>`` (seed sweeps written by ``train.py
--seeds``) through :mod:`lm.eval.compare`, sets the paper's Table 2 / Table 3 figures beside the
study's, and tests each of the paper's findings on the seeds with Welch's t-test
(:mod:`lm.analysis.stats`). Everything on the page is computed from the run directories, so rerunning the
study regenerates it; hand-written remarks live in ``docs/study/notes.md``, which is copied in. The
paired study's section (:mod:`lm.analysis.paired_report`) is carried over from the page as it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path
from typing import Sequence

import torch

from lm.eval.compare import aggregate, find_runs, read_run
from lm.errors import UserError
from lm.analysis.paired_report import carry
from lm.analysis.stats import welch

REGULARIZERS = ("unregularized", "dropout", "variational", "semeniuta", "zoneout", "weight_drop", "wd_flipout",
                "gauss", "flipout")
# (paper row, valid, test) from Wen et al. 2018, Tables 2 and 3 (../shared/docs/paper_facts.md, section 2).
PAPER = {
    "char": {"unregularized": ("Unregularized LSTM", 1.468, 1.423), "semeniuta": ("Semeniuta (2016)", 1.337, 1.300),
             "zoneout": ("Zoneout (2016)", 1.306, 1.270), "variational": ("Gal (2016)", 1.277, 1.245),
             "gauss": ("Mult. Gauss (σ = 1)", 1.257, 1.230), "flipout": ("Mult. Gauss + Flipout", 1.256, 1.227)},
    "word": {"unregularized": ("Unregularized LSTM", 132.23, 128.97), "dropout": ("Zaremba (2014)", 80.40, 76.81),
             "semeniuta": ("Semeniuta (2016)", 81.91, 77.88), "variational": ("Gal (2016)", 78.24, 75.39),
             "zoneout": ("Zoneout (2016)", 78.66, 75.45), "weight_drop": ("WD (2017)", 78.82, 75.71),
             "wd_flipout": ("WD+Flipout", 76.88, 73.20)},
}
ALPHA = 0.05  # significance level of every verdict on the page
DESIGN_KEYS = ("data.train_tokens", "model.hidden_size", "model.num_layers", "model.emb_size", "model.input",
               "optim.name", "optim.lr", "optim.clip", "train.batch_size", "train.bptt", "train.max_epochs",
               "train.patience", "eval.batch_size", "train.threads")


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg if cfg != {} else None


def load_level(level_dir: Path) -> dict[str, dict]:
    """regularizer directory name -> {'row': compare row, 'runs': [Run], 'metric': 'bpc'|'ppl'}."""
    out = {}
    for reg in REGULARIZERS:
        d = level_dir / reg
        if not d.is_dir():
            continue
        runs = [read_run(p) for p in find_runs([str(d)])]
        tables = aggregate(runs)
        rows = [r for t in tables for r in t["rows"]]
        done = [r for r in rows if r["status"] == "done"]
        if len(done) != 1 or len(rows) != 1:
            raise UserError(f"{d} holds {len(done)} finished configs and {len(rows) - len(done)} incomplete runs: "
                            "finish the study (rerun scripts/study.sh) before writing the page")
        out[reg] = {"row": done[0], "runs": runs, "metric": tables[0]["metric"]}
    return out


def _per_seed(entry: dict, key: str) -> list[float]:
    return [float(r.values[key]) for r in entry["runs"] if r.values.get(key) is not None]


def _fmt(x: float, metric: str) -> str:
    return f"{x:.2f}" if metric == "ppl" else f"{x:.3f}"


def _ms(stat: dict | None, metric: str) -> str:
    return "—" if stat is None else f"{_fmt(stat['mean'], metric)} ± {_fmt(stat['std'], metric)}"


def overfit(entry: dict) -> dict:
    """Mean over seeds of: valid at the last epoch minus the best valid, and the final train-valid gap."""
    m = entry["metric"]
    rises, gaps = [], []
    for run in entry["runs"]:
        recs = [r for r in run.curve if f"valid_{m}" in r]
        if not recs:
            continue
        best = min(r[f"valid_{m}"] for r in recs)
        rises.append(recs[-1][f"valid_{m}"] - best)
        if f"train_{m}" in recs[-1]:
            gaps.append(recs[-1][f"valid_{m}"] - recs[-1][f"train_{m}"])
    return {"rise": statistics.fmean(rises) if rises else None, "gap": statistics.fmean(gaps) if gaps else None}


def compare_pair(data: dict, a: str, b: str) -> str | None:
    """One sentence: is ``a`` better (lower test figure) than ``b`` across seeds?"""
    if a not in data or b not in data:
        return None
    m = data[a]["metric"]
    ta, tb = _per_seed(data[a], "test"), _per_seed(data[b], "test")
    if len(ta) < 2 or len(tb) < 2:
        return f"{a} vs {b}: fewer than two seeds each, no test"
    w = welch(ta, tb)
    if w.p < ALPHA:
        verdict = "**better**" if w.diff < 0 else "**worse**"
    else:
        verdict = "no significant difference" + (" (lower on average)" if w.diff < 0 else " (higher on average)")
    return (f"{a} vs {b}: test {_fmt(statistics.fmean(ta), m)} vs {_fmt(statistics.fmean(tb), m)}, "
            f"difference {w.diff:+.3f} ± {w.se:.3f} (SE), Welch t = {w.t:.2f}, df = {w.df:.1f}, "
            f"p {'< 0.001' if w.p < 0.001 else f'= {w.p:.3f}'}: "
            f"{verdict}")


def _paper_better(level: str, a: str, b: str) -> bool | None:
    pa, pb = PAPER[level].get(a), PAPER[level].get(b)
    return None if pa is None or pb is None else pa[2] < pb[2]


def findings(level: str, data: dict) -> list[str]:
    """The paper's claims for this level, each tested on the study's seeds."""
    lines = []
    for reg in REGULARIZERS[1:]:
        text = compare_pair(data, reg, "unregularized")
        if text:
            paper = " (paper: better)" if _paper_better(level, reg, "unregularized") else ""
            lines.append(f"- Regularized beats unregularized? {text}{paper}.")
    for a, b in (("flipout", "gauss"), ("wd_flipout", "weight_drop")):
        text = compare_pair(data, a, b)
        if text:
            pb = _paper_better(level, a, b)
            paper = "" if pb is None else f" (paper: {'better' if pb else 'not better'}, test " \
                f"{_fmt(PAPER[level][a][2], data[a]['metric'])} vs {_fmt(PAPER[level][b][2], data[a]['metric'])})"
            lines.append(f"- Flipout vs its shared perturbation? {text}{paper}.")
    ranked = [r for r in REGULARIZERS if r in data and r in PAPER[level]]
    ours = sorted(ranked, key=lambda r: data[r]["row"]["test"]["mean"])
    theirs = sorted(ranked, key=lambda r: PAPER[level][r][2])
    lines.append(f"- Ranking by test figure, best first (rows of the paper's table only): paper "
                 f"{' < '.join(theirs)}; this study {' < '.join(ours)}; Kendall τ = {kendall_tau(theirs, ours):+.2f}.")
    return lines


def kendall_tau(x: Sequence[str], y: Sequence[str]) -> float:
    """Kendall's τ between two orderings of the same items (1 = same order, −1 = reversed)."""
    pos = {item: i for i, item in enumerate(y)}
    n = len(x)
    if n < 2:
        return float("nan")
    s = sum(1 if pos[x[i]] < pos[x[j]] else -1 for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def results_table(level: str, data: dict) -> list[str]:
    m = next(iter(data.values()))["metric"]
    name = "BPC" if m == "bpc" else "ppl"
    base = data.get("unregularized")
    base_tps = base["row"]["tokens_per_s"]["mean"] if base and base["row"]["tokens_per_s"] else None
    out = [f"| regularizer | paper row | paper valid / test | valid {name} | test {name} | best epoch | epochs run "
           "| valid rise after best | final valid − train | train tok/s | vs unregularized | seeds |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for reg, e in data.items():
        row, paper, of = e["row"], PAPER[level].get(reg), overfit(e)
        tps = row["tokens_per_s"]["mean"] if row["tokens_per_s"] else None
        cells = [reg, paper[0] if paper else "—",
                 f"{_fmt(paper[1], m)} / {_fmt(paper[2], m)}" if paper else "—",
                 _ms(row["valid"], m), _ms(row["test"], m),
                 f"{row['best_epoch']['mean']:.1f}", f"{row['epochs']['mean']:.1f}",
                 "—" if of["rise"] is None else _fmt(of["rise"], m), "—" if of["gap"] is None else _fmt(of["gap"], m),
                 "—" if tps is None else f"{tps / 1e3:.1f}k",
                 "—" if tps is None or not base_tps else f"{tps / base_tps:.2f}", str(row["n"])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def design_table(levels: dict[str, dict]) -> list[str]:
    cols = list(levels)
    out = ["| setting | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    firsts = {lv: next(iter(d.values()))["runs"][0].config for lv, d in levels.items()}
    for key in DESIGN_KEYS:
        vals = [None if key == "model.emb_size" and _get(firsts[lv], "model.input") == "onehot"  # unused
                else _get(firsts[lv], key) for lv in cols]
        out.append(f"| `{key}` | " + " | ".join("—" if v is None else f"`{v}`" for v in vals) + " |")
    params = [f"{next(iter(d.values()))['row']['params']['mean']:,.0f}" for d in levels.values()]
    out.append("| parameters | " + " | ".join(params) + " |")
    return out


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


NOTES_MARKER = "<!-- results.md includes this file from the next line on"


def included_notes(notes: str) -> str:
    """The part of docs/study/notes.md that goes into results.md: everything after its marker line
    (above it: the page's own title and introduction), or all of it when there is no marker."""
    _, marker, rest = notes.partition(NOTES_MARKER)
    if marker:
        notes = rest.partition("\n")[2]  # drop the rest of the marker line
    return notes.strip()


def render(study_dir: Path, levels: dict[str, dict], notes: str | None) -> str:
    wall = sum(float(r.values.get("wall_s") or 0) for d in levels.values() for e in d.values() for r in e["runs"])
    n_runs = sum(len(e["runs"]) for d in levels.values() for e in d.values())
    out = ["# Regularizer study at CPU scale (PTB, char and word level)", "",
           f"*Generated by `python -m lm.analysis.study_report` from `{study_dir}`; rerun everything with "
           "`bash scripts/study.sh`.*", "",
           f"Machine: {machine()}. {n_runs} runs; {wall / 60:.0f} min of training (summed over runs, evaluation "
           "included), run two at a time on one thread each.", ""]
    out += ["## Design", "", DESIGN_TEXT, "", *design_table(levels), ""]
    for level, data in levels.items():
        paper_table = "Table 2 (BPC)" if level == "char" else "Table 3 (perplexity)"
        out += [f"## {level.capitalize()} level", "",
                f"Mean ± sample std over seeds; test at the best-validation checkpoint. Paper figures: Wen et al. "
                f"2018, {paper_table}, at the paper's full size and data. Full tables and curves: "
                f"[`docs/measurements/study/{level}/compare.md`](measurements/study/{level}/compare.md).", "",
                *results_table(level, data), "",
                f"![{level} learning curves](measurements/study/{level}/curves.png)", "",
                "Paper findings tested on these seeds (Welch's t-test on the test figures, two-sided, "
                f"α = {ALPHA}; with 3 seeds a test has low power, so *no significant difference* is not *equal*):",
                "", *findings(level, data), ""]
    if notes:
        out += ["## Reading the results", "", included_notes(notes), ""]
    out += [CAVEATS_TEXT, ""]
    return "\n".join(out)


DESIGN_TEXT = """\
The paper's models (1×1000 char LSTM on 5M characters; 2×650 word LSTM on 930k words) need GPU-days.
The study keeps each paper config (`configs/<level>_<regularizer>.yaml`: optimizer, clipping,
regularization rates, initialisation) and changes only size and data, through the overrides in
`scripts/study.sh`:

- **Reduced training set, full evaluation.** Training uses only the first `data.train_tokens` tokens
  of PTB's train split, while validation and test use the *full* valid and test splits. A small
  training set is what lets a CPU-size model overfit within minutes, and overfitting is what the
  regularizers exist to prevent; the full evaluation splits keep the figures' noise low.
- **Smaller models** (char: one 256-unit layer with one-hot input; word: 2×128 with 128-d untied
  embeddings), sized so that a run takes a few minutes on one core and the unregularized model still
  has far more parameters than training tokens.
- **Smaller batches** (16 at char level, 20 at word level) so that an epoch of the small training set is
  still 70–80 optimizer steps; the char learning rate is doubled (AMSGrad 0.004, as in
  `configs/quickstart.yaml`) so that the char models overfit within the epoch budget.
- **Early stopping on the full validation split**, once per epoch, with patience 3 and an epoch cap;
  the test figure is the best-validation checkpoint's. Nothing was tuned: every regularization rate is
  the paper's (or the config's stated choice where the paper gives none), and the test split was only
  read by the final evaluation of each run.
- **3 seeds** per config (`train.seed` 1, 2, 3), reported as mean ± sample standard deviation."""

CAVEATS_TEXT = """\
## What this study cannot say

- Scale: the paper's rankings are for 4–20M-parameter models trained to convergence on the full data;
  regularizers' relative strengths change with model size, data size and training length, and the
  paper's rates were chosen for those larger models. A finding that does not reproduce here is not
  evidence against the paper at its scale.
- Runs that stop at the epoch cap (epochs run = cap, best epoch near it) were still improving: their
  figures are upper bounds of what the regularizer reaches in this setting.
- Throughput here is one thread per run with two runs sharing the machine; `bench/throughput.py`
  measures the paper sizes properly ([performance.md](performance.md))."""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.analysis.study_report", description=__doc__.split("\n")[0])
    p.add_argument("--study-dir", default="runs/study", help="the study's run directory (default: runs/study)")
    p.add_argument("--out", default="docs/results.md", help="page to write (default: docs/results.md)")
    p.add_argument("--notes", default="docs/study/notes.md", help="hand-written remarks to include, if present")
    args = p.parse_args(argv)
    study = Path(args.study_dir)
    levels = {lv: load_level(study / lv) for lv in ("char", "word") if (study / lv).is_dir()}
    levels = {lv: d for lv, d in levels.items() if d}
    if not levels:
        raise UserError(f"no study runs under {study}: run `bash scripts/study.sh` first")
    notes = Path(args.notes).read_text() if Path(args.notes).is_file() else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.is_file() else ""
    out.write_text(carry(old, render(study, levels, notes)))  # the paired study's section is not ours to drop
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from lm.errors import run_cli

    raise SystemExit(run_cli(main))
