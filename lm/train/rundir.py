"""The run directory's policy: what may be replaced, one run at a time, and repair after a crash.

* :func:`check_target` (after the command line and the config are checked, before anything is
  loaded or written): a run directory that is a file, one that holds files of other programs, and
  an existing run without ``--resume`` / ``--force`` are one-line errors whose advice works as
  given; a run directory without any checkpoint is started afresh with a notice.
* :class:`RunLock`: an OS-level lock (``fcntl.flock``) on ``<run dir>/.lock``, which holds the
  PID, taken for the life of a run; a second start on the same directory exits 2 naming the
  holder. The kernel drops the lock when its process dies (even by ``kill -9``), so a lock file
  left by a dead process never blocks.
* :func:`replace_run` (``--force``, once the new run is built): the old run's files go.
* :func:`diverged_note`, :func:`storage_failure`: the one-line messages of a diverged run and of a
  failed write, naming the checkpoints that are intact (or that none was written yet).
* :func:`repair` (every start, under the lock): temporary files of an interrupted write are
  removed; on resume, ``metrics.jsonl`` rows past ``last.pt``'s step (logged after the last
  checkpoint, then replayed) are dropped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from lm.errors import StorageError, UserError
from lm.files import atomic_write, storage_error

LOCK = ".lock"
TEMP = re.compile(r"^\..+\.tmp\d+$")  # lm.files.atomic_write's temporary files
TRACEBACK = "traceback.txt"  # the full traceback of a failure during training (lm.train.failure)
RUN_FILES = {"config.yaml", "metrics.jsonl", "best.pt", "last.pt", "results.json", "tokenizer.model", "tensorboard",
             TRACEBACK, LOCK}
CHECKPOINTS = ("last.pt", "best.pt")


def _leftover(name: str) -> bool:
    return name == LOCK or bool(TEMP.match(name))


def contents(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` other than the lock file and temporary files (empty if absent)."""
    return sorted(p.name for p in run_dir.iterdir() if not _leftover(p.name)) if run_dir.is_dir() else []


def _held(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_target(run_dir: Path, resume: bool, force: bool) -> str:
    """Decide what a start does with ``run_dir``; touches nothing. Every refusal's advice works as given.

    Returns:
        'new' (absent or empty), 'resume' (``--resume`` and a ``last.pt``), 'replace' (``--force`` on a
        run), or 'restart': a run directory of this codebase that holds no checkpoint (stopped before
        its first ``last.pt``) is started afresh, by the command that made it or by ``--resume`` (then
        from its ``config.yaml``); there is nothing to lose in it.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file, not a directory: choose another --run-dir")
    names = contents(run_dir)
    foreign = [n for n in names if n not in RUN_FILES]
    if foreign:
        raise UserError(f"run directory {run_dir} is not a flipout-lm run directory ({_held(foreign)}): "
                        "remove those files yourself or choose another --run-dir")
    checkpoints = [n for n in CHECKPOINTS if n in names]
    if resume:
        if "last.pt" in names:
            return "resume"
        if not checkpoints and "config.yaml" in names:
            return "restart"
        if not checkpoints:
            raise UserError(f"cannot resume: {run_dir} holds no run (no last.pt, no config.yaml): start it with "
                            f"python train.py --config CONFIG --run-dir {run_dir}")
        config = f"{run_dir}/config.yaml" if "config.yaml" in names else "CONFIG"
        raise UserError(f"cannot resume: {run_dir} has best.pt but no last.pt: evaluate it with python evaluate.py "
                        f"{run_dir}/best.pt, or train it again with python train.py --config {config} --run-dir "
                        f"{run_dir} --force")
    if not names:
        return "new"
    if not checkpoints:
        return "restart"
    if force:
        return "replace"
    if "last.pt" in names:
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it, --force to "
                        "replace it, or --run-dir for a new one")
    raise UserError(f"run directory {run_dir} already exists (best.pt, no last.pt to resume from): pass --force "
                    "to replace it, or --run-dir for a new one")


def restart_notice(run_dir: Path) -> str:
    return (f"notice: {run_dir} holds no checkpoint (it stopped before its first last.pt): starting it afresh")


class RunLock:
    """``fcntl.flock`` on ``<run dir>/.lock`` for the life of a run (a context manager).

    The file is left in place on release: removing it would let two processes lock two different
    files of the same name.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot create the run directory lock {self.path}: {e.strerror or e}; choose a "
                               "writable --run-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"run directory {self.path.parent} is in use by process {holder} (it holds "
                                f"{self.path}): wait for that run to end or stop it, or choose another --run-dir") \
                    from None
            raise StorageError(f"cannot lock {self.path}: {e.strerror or e}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock itself holds; the PID is only for the message of a second start
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def replace_run(run_dir: Path) -> None:
    """``--force``: remove the old run's files (the caller holds the lock; :func:`check_target` vetted them).

    Ctrl-C is held back while deleting, so an interruption never leaves half an old run.
    """
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        for name in contents(run_dir):
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except OSError as e:
        raise StorageError(f"cannot remove the old run in {run_dir}: {e.strerror or e}") from None
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def repair(run_dir: Path, last_step: int | None, pending: bool = False) -> None:
    """Remove stale temporary files; with ``last_step`` (resume) drop metrics rows logged after it (and,
    with ``pending``, the row of the failed validation at that step, which the resume repeats)."""
    for p in run_dir.iterdir():
        if TEMP.match(p.name) and p.is_file():
            try:
                p.unlink()
                print(f"notice: removed {p}, left by an interrupted write", file=sys.stderr)
            except OSError:
                pass
    metrics = run_dir / "metrics.jsonl"
    if last_step is None or not metrics.is_file():
        return
    lines = metrics.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row cut short by a crash
        if isinstance(row, dict) and (int(row.get("step", 0)) < last_step
                                      or (int(row.get("step", 0)) == last_step and not pending)):
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write(metrics, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in keep)))
        print(f"notice: dropped {len(lines) - len(keep)} row(s) of {metrics} logged after last.pt's step "
              f"{last_step}{' (its validation is repeated)' if pending else ''}", file=sys.stderr)


def _kept(run_dir: Path) -> list[str]:
    return [n for n in ("last.pt", "best.pt") if (run_dir / n).is_file()]


def diverged_note(run_dir: Path) -> str:
    """What a diverged run leaves: the checkpoints that keep the last good state, or that there are none."""
    kept = _kept(run_dir)
    if not kept:
        return "no checkpoint was written yet (it diverged before the first validation)"
    return f"{' and '.join(kept)} in {run_dir} keep{'s' if len(kept) == 1 else ''} the last good state"


def storage_failure(run_dir: Path, e: OSError) -> StorageError:
    """One line for a failed write during a run: what could not be written and what is intact (exit code 3)."""
    first = e if isinstance(e, StorageError) else storage_error(Path(e.filename) if e.filename else run_dir, e)
    kept = _kept(run_dir)
    if not kept:
        return StorageError(f"{first}; no checkpoint was written yet")
    return StorageError(f"{first}; {' and '.join(kept)} in {run_dir} {'are' if len(kept) > 1 else 'is'} intact: "
                        f"free space or fix the file system, then resume with python train.py --run-dir {run_dir} "
                        "--resume")
