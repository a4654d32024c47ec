"""``python train.py``: argument parsing, run-directory policy, and the call into the trainer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lm.config import check_keys, config_help, load_config, parse_overrides, read_yaml, resolve_config_path, to_dict
from lm.errors import UserError
from lm.regularizers import build_regularizer, describe
from lm.train.rundir import check_target, restart_notice


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


def _resume_base(run_dir: Path) -> dict:
    """The run's saved config.yaml, else the config last.pt holds (a damaged one is a one-line error naming it)."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        base, where = read_yaml(saved, "run config"), saved
    else:
        from lm.train.checkpoint import load_checkpoint

        base, where = load_checkpoint(run_dir / "last.pt").get("config"), run_dir / "last.pt"
    try:
        return to_dict(load_config(base=base))
    except (UserError, ValueError, TypeError) as e:
        raise UserError(f"run config {where} is damaged ({e}): fix it or put back the run's own config.yaml") \
            from None


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
    # the command line and the config first (typos, unknown keys, a missing file), the run directory after
    overrides = parse_overrides(rest)
    check_keys(overrides)
    if not args.resume and not args.config:
        raise UserError("no --config given: pass --config FILE (or --run-dir DIR --resume to continue a run)")
    if not args.resume:
        cfg = load_config(args.config, overrides)
        build_regularizer(cfg.regularizer)
    elif args.config:
        resolve_config_path(args.config)
    run_dir = _run_dir(args)
    action = check_target(run_dir, args.resume, args.force)  # a file, a foreign directory, an existing run
    resume = action == "resume"
    if action == "restart":
        print(restart_notice(run_dir), file=sys.stderr)
    if args.resume:  # a resumed run's base is its own config (a restarted one's, its config.yaml)
        base = _resume_base(run_dir)
        cfg = load_config(args.config, overrides, base=base)
        build_regularizer(cfg.regularizer)  # validate regularizer options before touching the run directory
    from lm.train.checkpoint import load_checkpoint
    from lm.train.distributed import session
    from lm.train.resume import check_resume
    from lm.train.rundir import RunLock, repair, replace_run
    from lm.train.trainer import Trainer  # heavy import after argument checks: fast --help and errors

    if resume:  # overrides are checked against last.pt before config.yaml is rewritten
        ck = load_checkpoint(run_dir / "last.pt")
        try:
            ck_config = to_dict(load_config(base=ck.get("config")))
        except (UserError, ValueError, TypeError):
            raise UserError(f"{run_dir}/last.pt holds no valid config: it was not written by this run's "
                            "train.py; put back the run's own last.pt") from None
        check_resume(base, ck_config, cfg, run_dir, ck)
    with session(cfg.train.device) as dist:  # a torchrun rank joins its process group (docs/distributed.md)
        # data, sizes, memory, the model and (on resume) last.pt: all before the run directory changes
        trainer = Trainer(cfg, run_dir, resume=resume, dist=dist)
        lock = RunLock(run_dir)

        def claim() -> None:  # rank 0 only; its error reaches every rank
            lock.acquire()
            if check_target(run_dir, args.resume, args.force) != action:  # again under the lock: another start
                raise UserError(f"run directory {run_dir} changed while this run was starting (another start?): "
                                "run the command again")
            if action in ("replace", "restart"):
                replace_run(run_dir)
            repair(run_dir, trainer.step if resume else None, trainer.pending)

        dist.main_first(lambda: claim() if dist.is_main else None, lambda _: [])
        try:
            return trainer.fit()
        finally:
            lock.release()
