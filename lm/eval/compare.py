"""Tables, learning curves and JSON of runs (``python evaluate.py compare``, :mod:`lm.cli.compare`).

Reads what :mod:`lm.train.trainer` writes in each run directory (``config.yaml``, ``metrics.jsonl``,
``results.json``; ``last.pt``/``best.pt`` only for the parameter count of unfinished runs, and
for the config when ``config.yaml`` is gone). A directory with neither config nor checkpoint
stands for the run directories below it at any depth (a seed sweep, or a study of several sweeps).

* Finished runs whose configs differ only in ``train.seed`` (and runtime-only keys) form one
  row: mean ± sample standard deviation, with the number of seeds.
* A run without ``results.json`` (crashed, interrupted or still training) keeps its own row,
  marked ``incomplete``, with its best validation so far and no test figure.
* One table per data set and level (PTB char BPC, PTB word perplexity, each own corpus and
  tokenizer); own-corpus tables add text BPC, which compares across their tokenizations.

* Each figure comes with the number of tokens it was scored on; a table whose rows were scored
  on different numbers of tokens (``eval.max_tokens``) says so under it.

The front end prints the tables and, with ``--out DIR``, writes ``DIR/compare.md``,
``DIR/compare.json`` (the same content, raw numbers) and ``DIR/curves.png`` (:mod:`lm.analysis.plots`).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from lm.config import RUNTIME_KEYS, flatten, load_config, to_dict
from lm.errors import UserError
from lm.eval.metrics import metric_name

NUMERIC = ("params", "epochs", "best_epoch", "valid", "test", "valid_tokens", "test_tokens", "valid_text_bpc",
           "test_text_bpc", "tokens_per_s", "wall_s")


@dataclass
class Run:
    """One run directory as read from disk; ``values`` holds the table's numbers (None = unknown)."""

    path: Path
    config: dict
    curve: list[dict]
    results: dict | None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.results is not None

    @property
    def level(self) -> str:
        d = self.config.get("data", {})
        own = d.get("tokenizer") if d.get("path") else None  # own corpus: the tokenizer is the level
        return (self.results or {}).get("level") or own or d.get("level", "?")

    @property
    def dataset(self) -> str:
        return self.config.get("data", {}).get("path") or "PTB"


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


RUN_FILES = ("config.yaml", "last.pt", "best.pt")  # any of them makes a directory a run


def _is_run(p: Path) -> bool:
    return any((p / name).is_file() for name in RUN_FILES)


def _runs_below(p: Path) -> list[Path]:
    """Run directories under ``p`` at any depth (e.g. ``study/char/<regularizer>/seed<S>``), in natural order."""
    runs: list[Path] = []
    for q in sorted((q for q in p.iterdir() if q.is_dir()), key=_natural):
        runs.extend([q] if _is_run(q) else _runs_below(q))
    return runs


def find_runs(paths: Sequence[str]) -> list[Path]:
    """Run directories among ``paths``; a directory that is not a run stands for the runs below it."""
    runs: list[Path] = []
    for name in paths:
        p = Path(name)
        if not p.is_dir():
            raise UserError(f"run directory {p} not found: give directories written by train.py")
        if _is_run(p):
            runs.append(p)
            continue
        inner = _runs_below(p)
        if not inner:
            raise UserError(f"{p} is not a run directory (no config.yaml nor checkpoint) and holds none: give "
                            "directories written by train.py")
        runs.extend(inner)
    return list(dict.fromkeys(runs))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _from_checkpoint(path: Path, key: str) -> Any:
    """``key`` of the run's last.pt (else best.pt), or None."""
    for name in ("last.pt", "best.pt"):
        try:  # mmap: a count or the config is all we need, not gigabytes of weights
            return torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)[key]
        except Exception:  # noqa: BLE001  # missing or damaged: try the other one
            continue
    return None


def read_run(path: Path) -> Run:
    raw: Any = {}
    try:  # config.yaml, else the copy every checkpoint holds
        raw = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
        raw = raw if raw is not None else (_from_checkpoint(path, "config") or {})
        config = to_dict(load_config(base=raw))  # fill keys added since the run was made
    except Exception:  # noqa: BLE001  # an old or newer config still compares on its own keys
        config = raw if isinstance(raw, dict) else {}
    curve = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                curve.append(json.loads(line))
            except ValueError:  # a crash can leave a half-written last line
                pass
    run = Run(path, config, curve, _read_json(path / "results.json"))
    run.values = _values(run)
    return run


def _values(run: Run) -> dict[str, Any]:
    m = metric_name(run.level)
    r, last = run.results, (run.curve[-1] if run.curve else {})
    best = [rec for rec in run.curve if rec.get("best")] or run.curve
    if r is not None:
        # fractional epoch of the best validation, from the curve (older results.json files count whole epochs)
        at_best = [rec["epoch"] for rec in run.curve if rec.get("step") == r.get("best_step") and "epoch" in rec]
        return {"params": r.get("params"), "epochs": r.get("epochs"),
                "best_epoch": at_best[-1] if at_best else r.get("best_epoch"),
                "valid": r["valid"].get(m), "test": r["test"].get(m),
                "valid_tokens": r["valid"].get("tokens"), "test_tokens": r["test"].get("tokens"),
                "valid_text_bpc": r["valid"].get("text_bpc"), "test_text_bpc": r["test"].get("text_bpc"),
                "tokens_per_s": r.get("train_tokens_per_s"), "wall_s": r.get("wall_s")}
    vals = [rec[f"valid_{m}"] for rec in run.curve if f"valid_{m}" in rec]
    scored = [rec for rec in run.curve if f"valid_{m}" in rec]
    at_min = min(scored, key=lambda rec: rec[f"valid_{m}"]) if scored else {}
    texts = [rec["valid_text_bpc"] for rec in run.curve if "valid_text_bpc" in rec]
    params = _from_checkpoint(run.path, "params")
    return {"params": int(params) if params is not None else None, "epochs": last.get("epoch"),
            "best_epoch": best[-1].get("epoch") if best else None, "valid": min(vals) if vals else None,
            "test": None, "valid_tokens": at_min.get("valid_tokens"), "test_tokens": None,
            "valid_text_bpc": min(texts) if texts else None, "test_text_bpc": None,
            "tokens_per_s": last.get("tokens_per_s"), "wall_s": last.get("elapsed_s")}


def _group_key(run: Run) -> str:
    flat = {k: v for k, v in flatten(run.config).items() if k != "train.seed" and k not in RUNTIME_KEYS}
    return json.dumps(flat, sort_keys=True, default=str)


def _group_name(runs: list[Run]) -> str:
    names = {re.sub(r"[-_]?seed\d+$", "", r.path.name) for r in runs}
    if len(names) == 1 and "" not in names:
        return names.pop()
    parents = {r.path.parent for r in runs}
    if all(re.fullmatch(r"seed\d+", r.path.name) for r in runs) and len(parents) == 1:
        parent = parents.pop().name
        return parent if len(runs) > 1 else f"{parent}/{runs[0].path.name}"
    return runs[0].path.name + (f" (+{len(runs) - 1})" if len(runs) > 1 else "")


def _stat(values: list[Any]) -> dict | None:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def aggregate(runs: list[Run]) -> list[dict]:
    """Tables (one per data set and level), each with rows of aggregated runs (input order kept)."""
    tables: dict[tuple[str, str], dict] = {}
    groups: dict[tuple, list[Run]] = {}
    for run in runs:  # finished seeds of one config share a row; unfinished runs stand alone
        key = (run.dataset, run.level, _group_key(run)) if run.done else (run.dataset, run.level, str(run.path))
        groups.setdefault(key, []).append(run)
    for (dataset, level, _), members in groups.items():
        m = metric_name(level)
        label = ("BPC" if m == "bpc" else "perplexity")
        table = tables.setdefault((dataset, level), {
            "title": f"{dataset}, {level} level ({label})", "dataset": dataset, "level": level, "metric": m,
            "text_bpc": dataset != "PTB", "rows": []})
        first = members[0]
        table["rows"].append({
            "run": _group_name(members), "status": "done" if first.done else "incomplete",
            "level": level, "regularizer": first.config.get("regularizer", {}).get("name", "?"),
            "seeds": [r.config.get("train", {}).get("seed") for r in members], "n": len(members),
            "runs": [str(r.path) for r in members],
            **{k: _stat([r.values.get(k) for r in members]) for k in NUMERIC}})
    for table in tables.values():  # scores on different tokens side by side: said under the table
        table["tokens_differ"] = {split: counts for split in ("valid", "test")
                                  if len(counts := _counts(table["rows"], f"{split}_tokens")) > 1}
    return list(tables.values())


def _counts(rows: list[dict], key: str) -> list[int]:
    return sorted({int(row[key]["mean"]) for row in rows if row.get(key)})


# -- rendering --------------------------------------------------------------------------------
def _num(x: float, kind: str) -> str:
    if kind == "params":
        return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x / 1e3:.1f}k"
    if kind == "tokens_per_s":
        return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"
    if kind == "wall_s":
        h, rem = divmod(int(round(x)), 3600)
        return f"{h}h{rem // 60:02d}m" if h else (f"{rem // 60}m{rem % 60:02d}s" if rem >= 60 else f"{x:.1f}s")
    if kind == "tokens":
        return f"{int(x):,}"
    if kind in ("epochs", "best_epoch"):
        return f"{x:.2f}"
    if kind == "ppl":
        return f"{x:.2f}"
    return f"{x:.3f}"


def _cell(stat: dict | None, kind: str) -> str:
    if stat is None:
        return "—"
    text = _num(stat["mean"], kind)
    return text + (f" ± {_num(stat['std'], kind)}" if stat["n"] > 1 and kind not in ("params", "tokens") else "")


def render_markdown(tables: list[dict]) -> str:
    out = ["# Run comparison", ""]
    for t in tables:
        name = "BPC" if t["metric"] == "bpc" else "ppl"
        cols = [("params", "parameters"), ("epochs", "epochs"), ("best_epoch", "best epoch"),
                ("valid", f"valid {name}"), ("test", f"test {name}"), ("valid_tokens", "valid tokens"),
                ("test_tokens", "test tokens")]
        if t["text_bpc"]:
            cols += [("valid_text_bpc", "valid text BPC"), ("test_text_bpc", "test text BPC")]
        cols += [("tokens_per_s", "train tok/s"), ("wall_s", "wall time")]
        header = ["run", "level", "regularizer", *(c for _, c in cols), "seeds", "status"]
        out += [f"## {t['title']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in t["rows"]:
            kinds = {"valid": t["metric"], "test": t["metric"], "valid_tokens": "tokens", "test_tokens": "tokens"}
            cells = [row["run"], row["level"], row["regularizer"],
                     *(_cell(row[k], kinds.get(k, k)) for k, _ in cols), str(row["n"]), row["status"]]
            out.append("| " + " | ".join(cells) + " |")
        differ = t.get("tokens_differ", {})
        if differ:
            what = " and ".join(f"the {split} figures on {' and '.join(f'{c:,}' for c in counts)} tokens"
                                for split, counts in differ.items())
            out += ["", f"**Not on the same tokens:** the rows above were scored on different tokens ({what}; "
                    "eval.max_tokens or the streams differ): compare only rows with equal counts, or score the "
                    "checkpoints alike with evaluate.py."]
        out.append("")
    out.append("Mean ± sample standard deviation over the seeds of a config (seeds = runs averaged); "
               "tokens: the number of tokens each figure was scored on. "
               "*incomplete*: no results.json (crashed, interrupted or still training); its figures are the best "
               "validation so far, and it has no test figure.")
    return "\n".join(out) + "\n"
