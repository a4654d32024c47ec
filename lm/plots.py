"""Learning-curve figure of :mod:`lm.compare`: validation metric against epoch and wall-clock time.

One row of two panels per comparison table (levels have different metrics), one line per run.
Seeds of one config share a colour and differ in line style; the legend sits right of each
row so that it never hides a curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LINESTYLES = ("-", "--", ":", "-.")


def plot_curves(tables: list[dict], runs: dict[str, Any], path: Path) -> None:
    """Write a PNG with the curves of every row of ``tables``.

    Args:
        tables: :func:`lm.compare.aggregate` output.
        runs: run path -> :class:`lm.compare.Run` (its ``curve`` is the metrics.jsonl records).
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
