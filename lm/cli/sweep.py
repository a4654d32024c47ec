"""Seed sweeps: ``python train.py --config X --seeds 1 2 3``.

Runs the config once per seed, one after the other, into sibling directories
``<run dir>/seed<SEED>`` (``<run dir>`` is ``--run-dir`` or ``runs/<config name>``), which
``evaluate.py compare <run dir>`` aggregates as mean ± std (``<run dir>`` must not be a run
itself: a sweep never writes inside a finished single run). Running the same command again
continues the sweep: a seed whose directory has ``results.json`` is skipped, one with
``last.pt`` is resumed, one without any checkpoint is started afresh; ``--force`` restarts every
seed. Skipping or resuming a seed whose saved config differs from the requested one
(apart from runtime-only keys) is an error, so a sweep never mixes two settings.
``--parallel N`` trains up to N seeds at once in separate processes (:mod:`lm.cli.parallel`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Sequence

from lm.config import RUNTIME_KEYS, flatten, load_config, parse_overrides, read_yaml, to_dict
from lm.errors import UserError

EXIT_INTERRUPTED_MIN = 128


def seed_dir(base: Path, seed: int) -> Path:
    return Path(base) / f"seed{seed}"


def config_differences(saved: dict, wanted: dict) -> list[str]:
    """Keys whose values differ between two config dicts, runtime-only keys excluded."""
    a, b = flatten(saved), flatten(wanted)
    return sorted(k for k in a.keys() | b.keys() if k not in RUNTIME_KEYS and a.get(k) != b.get(k))


def plan(config: str, overrides: Sequence[str], base: Path, seeds: Sequence[int],
         force: bool) -> list[tuple[int, Path, str]]:
    """``(seed, run dir, action)`` with action 'train', 'resume', 'skip' or 'restart'."""
    steps = []
    for seed in seeds:
        run = seed_dir(base, seed)
        wanted = to_dict(load_config(config, [*overrides, f"train.seed={seed}"]))
        if force or not run.is_dir() or not any(run.iterdir()):
            steps.append((seed, run, "restart" if force and run.is_dir() else "train"))
            continue
        if not (run / "last.pt").is_file():  # stopped before its first checkpoint: nothing to keep
            steps.append((seed, run, "restart"))
            continue
        saved = run / "config.yaml"
        diff = config_differences(read_yaml(saved, "run config"), wanted) if saved.is_file() else ["all"]
        if diff:
            raise UserError(f"{run} was trained with another config (differs in {', '.join(diff[:5])}): rerun with "
                            "--force to restart every seed, or give another --run-dir")
        steps.append((seed, run, "skip" if (run / "results.json").is_file() else "resume"))
    return steps


def run_sweep(args: argparse.Namespace, rest: Sequence[str], train_main: Callable[[Sequence[str]], int]) -> int:
    """Train every seed of ``args.seeds`` with ``train_main`` (train.py's main); return the worst exit code.

    An interrupted seed (exit code >= 128) stops the sweep; a diverged one does not.
    """
    if not args.config:
        raise UserError("--seeds needs --config: pass the config to sweep (the same command resumes the sweep)")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: give each seed once")
    overrides = parse_overrides(rest)
    if any(o.split("=", 1)[0] == "train.seed" for o in overrides):
        raise UserError("--seeds and --train.seed contradict each other: keep --seeds")
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: keep one")
    if args.parallel > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--parallel does not combine with torchrun: drop --parallel (torchrun already runs "
                        "one process per device)")
    base = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    steps = plan(args.config, overrides, base, args.seeds, args.force)  # the config first, then the directory
    check_base(base)
    say = (lambda line: print(line, flush=True)) if int(os.environ.get("RANK", "0")) == 0 else (lambda line: None)
    say(f"seed sweep into {base}: " + ", ".join(f"seed {s} {a}" for s, _, a in steps))

    if args.parallel > 1:
        return _run_parallel(args, rest, base, steps, say)

    from lm.train.distributed import session  # one process group for the whole sweep under torchrun

    codes = []
    with session(load_config(args.config, overrides).train.device) as dist:
        for seed, run, action in steps:
            if action == "skip":
                say(f"seed {seed}: {run}/results.json exists, skipped")
                continue
            argv = _seed_argv(args.config, run, rest, seed, action)
            say(f"seed {seed}: {action} {run}")
            code = train_main(argv)
            dist.barrier()
            if code >= EXIT_INTERRUPTED_MIN:
                say(f"sweep stopped at seed {seed}; run the same command again to continue it")
                return code
            codes.append(code)
    say(f"seed sweep done: compare with {compare_command(base, [run for _, run, _ in steps])}")
    return max(codes, default=0)


def check_base(base: Path) -> None:
    """A sweep's directory must not be a run itself: seeds written inside a finished run would be hidden
    by it (``evaluate.py compare`` shows a run directory, not what lies below it)."""
    if any((base / name).is_file() for name in ("config.yaml", "last.pt", "best.pt")):
        raise UserError(f"{base} is a run directory (trained without --seeds): a sweep writes <run dir>/seed<SEED> "
                        f"and must not write inside a run; give the sweep its own directory, e.g. --run-dir "
                        f"{base}_seeds")


def compare_command(base: Path, runs: list[Path]) -> str:
    """The ``evaluate.py compare`` command that shows this sweep's seeds: ``base`` when it holds nothing else."""
    others = [p for p in base.iterdir() if p.is_dir() and p not in runs] if base.is_dir() else []
    return "python evaluate.py compare " + (str(base) if not others else " ".join(map(str, runs)))


def _seed_argv(config: str, run: Path, rest: Sequence[str], seed: int, action: str) -> list[str]:
    argv = ["--config", config, "--run-dir", str(run), *rest, "--train.seed", str(seed)]
    return argv + {"resume": ["--resume"], "restart": ["--force"], "train": []}[action]


def _run_parallel(args: argparse.Namespace, rest: Sequence[str], base: Path, steps: list[tuple[int, Path, str]],
                  say: Callable[[str], None]) -> int:
    """``--parallel N``: the seeds in up to N processes at once (lm/cli/parallel.py)."""
    from lm.cli.parallel import run_parallel

    for seed, run, action in steps:
        if action == "skip":
            say(f"seed {seed}: {run}/results.json exists, skipped")
    jobs = [(seed, run, _seed_argv(args.config, run, rest, seed, action)) for seed, run, action in steps
            if action != "skip"]
    codes = run_parallel(jobs, base, args.parallel, say)
    if any(c >= EXIT_INTERRUPTED_MIN for c in codes):
        say("sweep stopped; run the same command again to continue it")
        return max(codes)
    say(f"seed sweep done: compare with {compare_command(base, [run for _, run, _ in steps])}")
    return max(codes, default=0)
