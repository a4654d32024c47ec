"""Learning-curve figure of :mod:`lm.eval.compare`: validation metric against epoch and wall-clock time.

One row of two panels per comparison table (levels have different metrics), one line per run.
Seeds of one config share a colour and differ in line style; the legend sits right of each
row so that it never hides a curve.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LINESTYLES = ("-", "--", ":", "-.")


def plot_curves(tables: list[dict], runs: dict[str, Any], path: Path) -> None:
    """Write a PNG with the curves of every row of ``tables``.

    Args:
        tables: :func:`lm.eval.compare.aggregate` output.
        runs: run path -> :class:`lm.eval.compare.Run` (its ``curve`` is the metrics.jsonl records).
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 2, figsize=(13, 4.2 * len(tables)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (ax_epoch, ax_time), table in zip(axes, tables):
        m = table["metric"]
        longest = max((rec.get("elapsed_s", 0) for row in table["rows"] for p in row["runs"]
                       for rec in runs[p].curve), default=0)
        unit, scale = ("h", 3600) if longest > 3 * 3600 else ("min", 60) if longest > 180 else ("s", 1)
        for i, row in enumerate(table["rows"]):
            for j, p in enumerate(row["runs"]):
                recs = [r for r in runs[p].curve if f"valid_{m}" in r]
                if not recs:
                    continue
                label = row["run"] + (f" (seed {row['seeds'][j]})" if row["n"] > 1 else "")
                if row["status"] != "done":
                    label += " [incomplete]"
                style = dict(color=colours[i % len(colours)], linestyle=LINESTYLES[j % len(LINESTYLES)],
                             marker="o" if len(recs) < 30 else None, markersize=3)
                ys = [r[f"valid_{m}"] for r in recs]
                ax_epoch.plot([r["epoch"] for r in recs], ys, label=label, **style)
                ax_time.plot([r.get("elapsed_s", 0) / scale for r in recs], ys, label=label, **style)
        ylabel = f"valid {'BPC' if m == 'bpc' else 'perplexity'}"
        ax_epoch.set(xlabel="epoch", ylabel=ylabel, title=table["title"])
        ax_time.set(xlabel=f"wall-clock time ({unit})", ylabel=ylabel, title=table["title"])
        for ax in (ax_epoch, ax_time):
            ax.grid(alpha=0.3)
        if ax_time.lines:
            ax_time.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_variance(result: dict, path: Path, gates: Sequence[str], family_title: dict[str, str]) -> None:
    """bench/variance.py's figure: log-log panels, one row per perturbation family, one column per gate
    (and the whole matrix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.asarray(result["ns"], float)
    families = [f for f in family_title if any(s["family"] == f for s in result["schemes"].values())]
    cols = [*gates, "all"]
    fig, axes = plt.subplots(len(families), len(cols), figsize=(3.1 * len(cols), 3.0 * len(families) + 0.6),
                             squeeze=False, sharex=True)
    style = {"shared": dict(color="tab:red", marker="o"), "flipout": dict(color="tab:blue", marker="s")}
    for row, family in enumerate(families):
        members = {s["perturbation"]: s for s in result["schemes"].values() if s["family"] == family}
        for col, gate in enumerate(cols):
            ax = axes[row][col]
            first = []
            for kind, s in members.items():
                d = s if gate == "all" else s["gates"][gate]
                v = np.asarray(d["variance"])
                low = np.maximum(np.asarray(d["ci_low"]), v / 20)  # a negative lower end cannot be drawn in log
                err = np.stack([v - low, np.asarray(d["ci_high"]) - v]).clip(min=0)
                ax.errorbar(ns, v, yerr=err, ms=4, lw=1.2, capsize=2, **style[kind],
                            label=f"{kind} (slope {d['slope']:.2f})")
                first.append(v[0])
            ax.plot(ns, np.mean(first) / ns, "k--", lw=0.9, label="ideal α/N")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{family_title[family]}: {'W_hh' if gate == 'all' else 'gate ' + gate}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7, loc="lower left")
            if row == len(families) - 1:
                ax.set_xlabel("mini-batch size N", fontsize=9)
            if col == 0:
                ax.set_ylabel("gradient variance", fontsize=9)
    c = result["config"]
    fig.suptitle(f"Var of ∂L/∂W_hh (layer {c['layer']}), {c['level']}-level PTB, H={result['model']['hidden']}, "
                 f"T={c['bptt']}, data {c['data_mode']}, {c['reps']} reps, 90% t-CI over {c['groups']} groups",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency; a 64-colour palette keeps the file small
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)


def print_variance_table(result: dict) -> None:
    """bench/variance.py's table: variance per N, slope and a + b/N fit of every scheme."""
    ns = result["ns"]
    print(f"\n{'scheme':15s} " + " ".join(f"N={n:<8d}" for n in ns) + "  slope  a          b")
    for name, s in result["schemes"].items():
        print(f"{name:15s} " + " ".join(f"{v:<10.3e}" for v in s["variance"])
              + f"  {s['slope']:5.2f}  {s['a']:<10.3e} {s['b']:.3e}")
