"""``python train.py``: argument parsing, run-directory policy, and the call into the trainer."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import yaml

from lm.config import config_help, load_config, parse_overrides
from lm.errors import UserError
from lm.regularizers import build_regularizer, describe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an LSTM language model on Penn Treebank.",
        epilog=config_help() + "\n\nexample: python train.py --config char_flipout.yaml --optim.lr 0.001 "
        "--train.max_steps 50")
    p.add_argument("--config", help="YAML config: a path or a file name under configs/ (e.g. char_flipout.yaml)")
    p.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--list-regularizers", action="store_true", help="print the regularizers and exit")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train the config once per seed, one after the other, into <run dir>/seed<SEED>; "
                   "run the same command again to skip finished seeds and resume interrupted ones")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="with --seeds: train up to N seeds at once in separate processes, which split the CPU "
                   "threads between them; each seed's output goes to <run dir>/seed<SEED>.log")
    return p


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if args.config:
        return Path("runs") / Path(args.config).stem
    raise UserError("no --config given: pass --config FILE (or --run-dir DIR --resume to continue a run)")


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.list_regularizers:
        print(describe())
        return 0
    if args.parallel < 1:
        raise UserError(f"--parallel {args.parallel}: give a positive number of processes")
    if args.parallel > 1 and not args.seeds:
        raise UserError("--parallel needs --seeds: pass the seeds to train side by side, e.g. --seeds 1 2 --parallel 2")
    if args.seeds:
        from lm.cli.sweep import run_sweep

        return run_sweep(args, rest, main)
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: keep one")
    overrides = parse_overrides(rest)
    run_dir = _run_dir(args)
    base = None
    if args.resume:
        saved = run_dir / "config.yaml"
        if not (run_dir / "last.pt").is_file() or not saved.is_file():
            raise UserError(f"cannot resume: {run_dir} has no last.pt and config.yaml; train it first without --resume")
        base = yaml.safe_load(saved.read_text())
    elif not args.config:
        raise UserError("no --config given: pass --config FILE (or --run-dir DIR --resume to continue a run)")
    cfg = load_config(args.config, overrides, base=base)
    build_regularizer(cfg.regularizer)  # validate regularizer options before touching the run directory
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        if not args.force:
            raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it, --force to "
                            "replace it, or --run-dir for a new one")
    from lm.train.distributed import session
    from lm.train.trainer import Trainer  # heavy import after argument checks: fast --help and errors

    with session(cfg.train.device) as dist:  # a torchrun rank joins its process group (docs/workflow.md)
        trainer = Trainer(cfg, run_dir, resume=args.resume, dist=dist)  # loads data, builds the model: may raise
        if args.force and run_dir.exists() and dist.is_main:
            shutil.rmtree(run_dir)
        return trainer.fit()
