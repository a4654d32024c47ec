"""Report of scripts/bayes.sh (docs/bayes.md): iterations and wall-clock to a fixed validation
loss for ``bbb`` against ``bbb_flipout``, per batch size, paired by seed; and the final figures.

Layout read: ``<dir>/b<B>/<regularizer>/seed<S>/{metrics.jsonl, results.json}``.

Target (chosen by rule, not by eye): per batch size, the lowest validation loss that *every*
run of both schemes reaches, so that each run has a time to it; two easier targets are
reported too (that loss plus 0.1 and 0.3 nats per token). The step (and wall-clock second) at which
a run first reaches a target is interpolated linearly between the two validations around it.
Effect size: per seed the ratio steps(bbb) / steps(bbb_flipout) (the same seed gives both schemes
the same initial weights and data order); the geometric mean of the ratios over seeds with a
two-sided 95% Student-t interval on the log ratios.

    python -m lm.analysis.bayes_report --dir runs/bayes --out runs/bayes/report.md --json runs/bayes/report.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from lm.analysis.stats import t_quantile
from lm.errors import UserError, run_cli

SCHEMES = ("bbb", "bbb_flipout")
TARGET_OFFSETS = (0.0, 0.1, 0.3)  # nats per token above the common lowest loss


def load_runs(root: Path) -> dict[int, dict[str, dict[int, dict]]]:
    """``{batch: {scheme: {seed: {"curve": [(step, elapsed_s, valid_loss)], "results": {...}}}}}``."""
    runs: dict[int, dict[str, dict[int, dict]]] = {}
    for metrics in sorted(root.glob("b*/*/seed*/metrics.jsonl")):
        seed_dir = metrics.parent
        scheme, batch = seed_dir.parent.name, int(seed_dir.parent.parent.name[1:])
        seed = int(seed_dir.name[4:])
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        results = seed_dir / "results.json"
        if scheme not in SCHEMES or not records or not results.is_file():
            continue  # unfinished runs are left out
        runs.setdefault(batch, {}).setdefault(scheme, {})[seed] = {
            "curve": [(r["step"], r["elapsed_s"], r["valid_loss"]) for r in records],
            "results": json.loads(results.read_text()), "last": records[-1]}
    if not runs:
        raise UserError(f"no finished bbb/bbb_flipout runs under {root}: run scripts/bayes.sh first")
    return runs


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(step, elapsed seconds) at which ``valid_loss`` first reaches ``target``, interpolated
    linearly between the validations before and after; None if it never does."""
    prev = (0, 0.0, math.inf)
    for step, wall, loss in curve:
        if loss <= target:
            if not math.isfinite(prev[2]):
                return float(step), float(wall)
            f = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + f * (step - prev[0]), prev[1] + f * (wall - prev[1])
        prev = (step, wall, loss)
    return None


def ratio_summary(ratios: Sequence[float]) -> dict:
    """Geometric mean of ``ratios`` and a two-sided 95% t-interval on the log scale."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return {"geo_mean": math.exp(mean), "ci95": [math.nan, math.nan], "n": n, "ratios": list(ratios)}
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t_quantile(0.025, n - 1) * sd / math.sqrt(n)
    return {"geo_mean": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)], "n": n,
            "ratios": list(ratios)}


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan)


def analyse(runs: dict) -> dict:
    out: dict = {"batches": {}}
    for batch in sorted(runs):
        by = runs[batch]
        if set(by) != set(SCHEMES):
            continue
        seeds = sorted(set(by["bbb"]) & set(by["bbb_flipout"]))
        if not seeds:
            continue
        common = max(min(loss for _, _, loss in by[s][seed]["curve"]) for s in SCHEMES for seed in seeds)
        targets = []
        for off in TARGET_OFFSETS:
            target = common + off
            per = {s: {seed: time_to(by[s][seed]["curve"], target) for seed in seeds} for s in SCHEMES}
            steps_r = [per["bbb"][k][0] / per["bbb_flipout"][k][0] for k in seeds]
            wall_r = [per["bbb"][k][1] / per["bbb_flipout"][k][1] for k in seeds]
            targets.append({
                "valid_loss": target, "valid_bpc": target / math.log(2),
                "steps": {s: [per[s][k][0] for k in seeds] for s in SCHEMES},
                "wall_s": {s: [per[s][k][1] for k in seeds] for s in SCHEMES},
                "steps_ratio": ratio_summary(steps_r), "wall_ratio": ratio_summary(wall_r)})
        final = {}
        for s in SCHEMES:
            res = [by[s][k]["results"] for k in seeds]
            final[s] = {"steps": res[0]["steps"],
                        "valid_bpc": _mean_sd([r["valid"]["bpc"] for r in res]),
                        "test_bpc": _mean_sd([r["test"]["bpc"] for r in res]),
                        "tokens_per_s": _mean_sd([r["train_tokens_per_s"] for r in res]),
                        "sigma_mean": _mean_sd([by[s][k]["last"].get("sigma_mean", math.nan) for k in seeds]),
                        "kl": _mean_sd([by[s][k]["last"].get("kl", math.nan) for k in seeds])}
        out["batches"][batch] = {"seeds": seeds, "targets": targets, "final": final}
    return out


def _fmt_ratio(r: dict) -> str:
    lo, hi = r["ci95"]
    ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else ""
    return f"{r['geo_mean']:.2f}{ci}"


def markdown(report: dict) -> str:
    lines = ["| batch | target valid BPC | steps bbb | steps bbb_flipout | steps ratio (95% CI) | "
             "wall ratio (95% CI) |", "|---|---|---|---|---|---|"]
    for batch, b in report["batches"].items():
        for t in b["targets"]:
            sb = ", ".join(f"{x:.0f}" for x in t["steps"]["bbb"])
            sf = ", ".join(f"{x:.0f}" for x in t["steps"]["bbb_flipout"])
            lines.append(f"| {batch} | {t['valid_bpc']:.3f} | {sb} | {sf} | {_fmt_ratio(t['steps_ratio'])} | "
                         f"{_fmt_ratio(t['wall_ratio'])} |")
    lines += ["", "| batch | scheme | steps | final valid BPC | final test BPC | train tok/s | mean σ | KL/N |",
              "|---|---|---|---|---|---|---|---|"]
    for batch, b in report["batches"].items():
        for s, f in b["final"].items():
            lines.append(f"| {batch} | {s} | {f['steps']} | {f['valid_bpc'][0]:.3f} ± {f['valid_bpc'][1]:.3f} | "
                         f"{f['test_bpc'][0]:.3f} ± {f['test_bpc'][1]:.3f} | {f['tokens_per_s'][0]:.0f} | "
                         f"{f['sigma_mean'][0]:.4f} | {f['kl'][0]:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.analysis.bayes_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="runs/bayes", help="BAYES_DIR of scripts/bayes.sh")
    p.add_argument("--out", help="write the markdown tables here (default: print)")
    p.add_argument("--json", help="write the full report as JSON here")
    args = p.parse_args(argv)
    report = analyse(load_runs(Path(args.dir)))
    text = markdown(report)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
