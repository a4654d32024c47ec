"""``bash scripts/paired_study.sh``: the paired study of flipout against its shared perturbation.

One command: a pilot of paired seeds (both arms of :data:`lm.analysis.paired_report.PAIRS` on seeds
1..P), the power analysis on the pilot's paired SD, the further pairs the time budget allows up to
the number needed for the target power, then the section of ``docs/results.md`` (design and rules:
:mod:`lm.analysis.paired_report`, statistics: :mod:`lm.analysis.paired`). Each arm runs as a seed
sweep of ``train.py --seeds`` (``--parallel`` for ``--jobs`` > 1), in chunks of ``--jobs`` seeds that
alternate between the arms, so an interrupted study leaves whole pairs; running the same command
again skips finished seeds and resumes interrupted ones. ``--tiny DIR`` runs the same pipeline with
seconds-long models on the corpus in DIR (a test of the pipeline, not a result).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Sequence

from lm.analysis.paired_report import (COMMON, PAIRS, SIZES, Pair, analyse_pair, complete_pairs, conclusion, render,
                                       seeds_present, splice)
from lm.errors import UserError
from lm.files import atomic_write

TrainMain = Callable[[Sequence[str]], int]
EXIT_INTERRUPTED_MIN = 128


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/paired_study.sh", description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="word", help="which pair to run (default: word)")
    p.add_argument("--study-dir", default="runs/paired", help="run directory of the study (default: runs/paired)")
    p.add_argument("--pilot", type=int, default=6, help="pairs in the pilot, seeds 1..PILOT (default: 6)")
    p.add_argument("--budget-min", type=float, default=120.0,
                   help="machine minutes for the whole pair, pilot included (default: 120)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time, one thread each (default: 2)")
    p.add_argument("--power", type=float, default=0.8, help="target power at the paper's effect (default: 0.8)")
    p.add_argument("--max-pairs", type=int, default=100, help="never more pairs than this (default: 100)")
    p.add_argument("--out", default="docs/results.md", help="page whose paired-study section is rewritten")
    p.add_argument("--report-only", action="store_true", help="train nothing; rewrite the section from the runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; train and write nothing")
    p.add_argument("--tiny", metavar="DIR", help="seconds-long runs on the corpus in DIR (train/valid/test.txt): "
                   "tests the pipeline, gives no result")
    return p


def sizes(pair: Pair, tiny: str | None) -> list[str]:
    """The overrides of every run: the study's size, or the tiny test size on ``tiny``'s corpus."""
    if tiny is None:
        return [*SIZES[pair.level], *COMMON]
    emb = ["--model.emb_size", "8"] if pair.level == "word" else []
    return ["--data.path", tiny, "--data.tokenizer", pair.level, *emb, "--model.hidden_size", "8",
            "--train.batch_size", "4", "--train.bptt", "8", "--train.max_epochs", "1", "--train.max_steps", "3",
            "--eval.batch_size", "4", "--eval.bptt", "20", "--eval.max_tokens", "200", *COMMON]


def arm_argv(pair: Pair, arm: str, study: Path, seeds: Sequence[int], jobs: int, tiny: str | None) -> list[str]:
    """``train.py`` arguments of one arm's seed sweep over ``seeds``."""
    return ["--config", f"{pair.level}_{arm}.yaml", "--run-dir", str(study / pair.level / arm),
            "--seeds", *map(str, seeds), "--parallel", str(min(jobs, len(seeds))), *sizes(pair, tiny)]


def run_pairs(pair: Pair, study: Path, seeds: Sequence[int], jobs: int, tiny: str | None, train_main: TrainMain) -> int:
    """Train both arms on ``seeds``, ``jobs`` seeds at a time, alternating the arms; the worst exit code."""
    codes = [0]
    for i in range(0, len(seeds), jobs):
        for arm in (pair.flipout, pair.shared):
            code = train_main(arm_argv(pair, arm, study, seeds[i: i + jobs], jobs, tiny))
            if code >= EXIT_INTERRUPTED_MIN:
                return code
            codes.append(code)
    return max(codes)


def make_plan(pair: Pair, study: Path, args: argparse.Namespace) -> dict:
    """The pilot's paired SD and the number of pairs to run: enough for ``args.power`` at the paper's
    effect, within the budget (machine minutes per pair: both arms' wall clock / runs at a time)."""
    pilot = list(range(1, args.pilot + 1))
    res = analyse_pair(study, pair, pilot, args.power)
    if res is None:
        raise UserError(f"the pilot of {pair.level} finished fewer than two pairs under {study}/{pair.level}: read "
                        "the seeds' logs there, fix the cause, and run the same command again")
    done, _, _, walls = complete_pairs(study, pair, pilot)
    pair_min = sum(walls) / len(done) / 60 / args.jobs
    affordable = len(done) + max(0, math.floor((args.budget_min - pair_min * len(done)) / max(pair_min, 1e-9)))
    needed = res.get("pairs_needed", len(done))
    target = max(len(done), min(needed, affordable, args.max_pairs))
    return {"pilot": len(done), "pilot_sd": res["primary"].sd, "needed": needed, "power": args.power,
            "budget_min": args.budget_min, "pair_min": pair_min, "jobs": args.jobs, "affordable": affordable,
            "max_pairs": args.max_pairs, "target": target}


def _plan_path(study: Path, pair: Pair) -> Path:
    return study / pair.level / "paired_plan.json"


def write_section(study: Path, out: Path, tiny: bool) -> str:
    """Analyse every pair with runs under ``study`` and rewrite the section of ``out``; return the verdicts."""
    from lm.analysis.study_report import machine

    pairs, lines = {}, []
    for level, pair in PAIRS.items():
        path = _plan_path(study, pair)
        plan = json.loads(path.read_text()) if path.is_file() else {}
        res = analyse_pair(study, pair, seeds_present(study, pair), plan.get("power", 0.8))
        if res is None:
            continue
        note = ("Tiny mode: seconds-long models on a toy corpus, a test of the pipeline and not a result."
                if tiny else "Size: the study's (table above).")
        pairs[level] = (res, {**plan, "machine": machine(), "note": note})
        lines.append(conclusion(pair, res))
    page = out.read_text() if out.is_file() else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = splice(page, render(pairs))
    atomic_write(out, lambda tmp: tmp.write_text(text))
    return "\n".join(lines) or "no pair has two finished pairs of seeds yet"


def _check(args: argparse.Namespace) -> None:
    if args.pilot < 2:
        raise UserError(f"--pilot {args.pilot}: a paired SD needs at least 2 pairs; give --pilot 2 or more")
    if args.jobs < 1 or args.budget_min <= 0 or args.max_pairs < args.pilot:
        raise UserError("--jobs must be >= 1, --budget-min > 0 and --max-pairs >= --pilot: fix the one that is not")
    if not 0 < args.power < 1:
        raise UserError(f"--power {args.power}: give a probability between 0 and 1, e.g. 0.8")
    if args.tiny is not None and not (Path(args.tiny) / "train.txt").is_file():
        raise UserError(f"--tiny {args.tiny}: no train.txt there; give a directory with train.txt, valid.txt, test.txt")


def main(argv: Sequence[str] | None = None, train_main: TrainMain | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    pair, study = PAIRS[args.pair], Path(args.study_dir)
    if train_main is None:
        from lm.cli.train import main as train_main
    if args.dry_run:
        pilot = list(range(1, args.pilot + 1))
        print(f"paired study of {pair.title} into {study}/{pair.level}; pilot: seeds 1-{args.pilot}, as")
        for arm in (pair.flipout, pair.shared):
            print("  python train.py " + " ".join(arm_argv(pair, arm, study, pilot, args.jobs, args.tiny)))
        print(f"then: pairs for {args.power:.0%} power at the paper's effect ({pair.paper_flipout} against "
              f"{pair.paper_shared}) from the pilot's paired SD, at most what {args.budget_min:.0f} machine minutes "
              f"allow ({args.jobs} runs at a time) and {args.max_pairs}; then the section of {args.out}")
        return 0
    if not args.report_only:
        code = run_pairs(pair, study, list(range(1, args.pilot + 1)), args.jobs, args.tiny, train_main)
        if code >= EXIT_INTERRUPTED_MIN:
            return code
        plan = make_plan(pair, study, args)
        text = json.dumps(plan, indent=2) + "\n"
        atomic_write(_plan_path(study, pair), lambda tmp: tmp.write_text(text))
        print(f"pilot: paired SD {plan['pilot_sd']:.4f}; {plan['needed']} pairs needed, {plan['affordable']} "
              f"affordable: running {plan['target']} pairs", flush=True)
        code = run_pairs(pair, study, list(range(args.pilot + 1, plan["target"] + 1)), args.jobs, args.tiny,
                         train_main)
        if code >= EXIT_INTERRUPTED_MIN:
            return code
    print(write_section(study, Path(args.out), args.tiny is not None))
    print(f"wrote the paired-study section of {args.out}")
    return 0


if __name__ == "__main__":
    from lm.errors import run_cli

    raise SystemExit(run_cli(main))
