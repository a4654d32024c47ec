"""How many CPU threads a training uses when several share one machine.

Each PyTorch process starts with as many intra-op threads as the machine has cores. Two such
trainings on one machine then fight over the cores: on 2 cores, two quick-start runs each ran at
0.22 of their solo speed (29k against 131k tokens/s), while with one thread each they ran at
0.55-0.60. OpenMP's passive wait policy helps the pair but halved the speed of a run alone, so it
is not used.

The policy (``train.threads: 0``, the default): every CPU training registers itself as a file
``<registry>/<pid>`` (``$FLIPOUT_LM_RUNS_DIR``, ``$XDG_RUNTIME_DIR/flipout-lm-runs`` or
``/tmp/flipout-lm-runs-<uid>``), removed when it ends; files of processes that are gone, or of
another user, are ignored and removed. The registry is a private directory of this user, and
its entries are read and written without following symlinks (:mod:`lm.private`): a registry
another user made or swapped for a symlink, an entry that is a symlink or a FIFO, or any OSError
leaves the run counting itself alone (said in the start-up summary) instead of crashing,
blocking, or writing or deleting files elsewhere. A run uses
``max(1, base // active)`` threads, where ``base`` is PyTorch's default thread count (which honours
``OMP_NUM_THREADS``) and ``active`` the number of registered live runs, and re-counts every
``interval`` seconds, so a run alone keeps today's speed, two runs split the cores, and the
survivor takes them back when the other ends. A ``train.threads`` > 0 is used as given and
never changed. GPU runs do not register (their CPU work is small).

Floating-point sums depend on the thread count, so a CPU run is bitwise reproducible only with
the same thread count: set ``train.threads`` for that.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from pathlib import Path

import torch

from lm import private

BASE_THREADS = torch.get_num_threads()  # PyTorch's default, before this process changes it


def registry_dir() -> Path:
    """``$FLIPOUT_LM_RUNS_DIR``, else ``$XDG_RUNTIME_DIR/flipout-lm-runs`` (a per-user directory the
    system makes private), else ``<tmp>/flipout-lm-runs-<uid>``."""
    env = os.environ.get("FLIPOUT_LM_RUNS_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "flipout-lm-runs"
    return Path(tempfile.gettempdir()) / f"flipout-lm-runs-{private.uid()}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (``/proc/<pid>/stat`` field 22), '' where unknown.

    Stored in the registration so that a recycled PID is not taken for the run that registered it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _ours(pid: int) -> bool:
    """Whether process ``pid`` lives and belongs to this user (another user's process is never one
    of this user's trainings, whatever a file claims)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid == private.uid()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False  # /proc exists: the process does not
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:  # gone (ProcessLookupError) or another user's (PermissionError)
        return False
    return True


def _remove(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)  # removes the entry itself, never what a symlink points to
    except OSError:
        pass


def count_runs(registry: Path) -> tuple[int, str]:
    """``(runs, problem)``: registered runs of this user whose process still lives (at least 1), and
    '' or why the registry could not be used (then 1: this run alone).

    Only entries that are regular files of this user are read (:mod:`lm.private`); anything else in
    the registry (a symlink, a FIFO, a stale registration) is removed, and every OSError counts this
    run alone rather than stopping a training."""
    try:
        fd = private.open_dir(registry, create=False)
    except FileNotFoundError:
        return 1, ""
    except OSError as e:
        return 1, str(e)
    try:
        live = 0
        for name in os.listdir(fd):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                started = private.read_small(name, fd).decode("ascii", "replace").strip()
            except FileNotFoundError:  # removed meanwhile
                continue
            except OSError:  # not a registration this user wrote
                _remove(name, fd)
                continue
            if _ours(pid) and (not started or not _start_time(pid) or started == _start_time(pid)):
                live += 1
            else:
                _remove(name, fd)
        return max(1, live), ""
    except OSError as e:
        return 1, str(e)
    finally:
        os.close(fd)


def active_runs(registry: Path) -> int:
    """Registered runs whose process still lives (stale files are removed); at least 1."""
    return count_runs(registry)[0]


def register(pid: int, registry: Path | None = None) -> Path | None:
    """Register process ``pid`` as a CPU training; the entry's path, or None if the registry cannot
    be used (unwritable, or not a private directory of this user: :mod:`lm.private`).

    A parallel seed sweep registers its children as soon as they start, so that each child's first
    count already sees all its siblings. The entry is written to a new file and renamed into
    place, so a symlink planted at its name is replaced, never written through.
    """
    registry = registry or registry_dir()
    try:
        fd = private.open_dir(registry, create=True)
        try:
            private.write_atomic(str(pid), (_start_time(pid) + "\n").encode(), fd)
        finally:
            os.close(fd)
        return registry / str(pid)
    except OSError:  # an unusable registry must not stop training: count only the others
        return None


def unregister(entry: Path | None) -> None:
    """Remove a registration (never following a symlink; any OSError ignored)."""
    if entry is None:
        return
    try:
        fd = private.open_dir(entry.parent, create=False)
    except OSError:
        return
    try:
        _remove(entry.name, fd)
    finally:
        os.close(fd)


def policy_threads(base: int, active: int) -> int:
    """Threads for one of ``active`` runs sharing ``base`` threads' worth of cores."""
    return max(1, base // max(1, active))


class ThreadPolicy:
    """Sets and keeps adjusting ``torch.set_num_threads`` for one training (see the module doc).

    Args:
        requested: ``train.threads``; > 0 fixes the count (no registration), 0 = the policy.
        enabled: False for a GPU run: nothing is registered or changed (unless ``requested``).
        interval: seconds between re-counts of the registered runs.
    """

    def __init__(self, requested: int, enabled: bool = True, registry: Path | None = None,
                 interval: float = 2.0, base: int | None = None) -> None:
        self.requested, self.interval = requested, interval
        self.auto = enabled and requested == 0
        self.registry = registry or registry_dir()
        self.base = base or BASE_THREADS
        self.active = 1
        self._previous = torch.get_num_threads()
        self._entry: Path | None = None
        self._checked = 0.0
        self.problem = ""  # why the registry could not be used ('' when it could)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def describe(self) -> str:
        if self.requested:
            return f"{self.threads} (train.threads)"
        if not self.auto:
            return f"{self.threads} (torch default; GPU run, not shared)"
        alone = f"; registry not used, counting this run alone: {self.problem}" if self.problem else ""
        return (f"{self.threads} (auto: {self.active} flipout-lm run{'s' if self.active > 1 else ''} on "
                f"{self.base} default threads, re-counted every {self.interval:.0f} s{alone}; set train.threads to fix)")

    def start(self) -> int:
        """Register (policy) or apply the fixed count; return the thread count now in force."""
        if self.requested:
            torch.set_num_threads(self.requested)
        elif self.auto:
            self._entry = register(os.getpid(), self.registry)
            if self._entry is not None:
                atexit.register(unregister, self._entry)  # also when fit() is never reached
            self._apply()
        return self.threads

    def _apply(self) -> bool:
        self._checked = time.monotonic()
        self.active, self.problem = count_runs(self.registry)
        wanted = policy_threads(self.base, self.active)
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            return True
        return False

    def maybe_adjust(self) -> bool:
        """Re-count the runs if ``interval`` seconds have passed; True when the thread count changed."""
        if not self.auto or time.monotonic() - self._checked < self.interval:
            return False
        return self._apply()

    def stop(self) -> None:
        """Unregister and restore the thread count found at construction (for in-process callers)."""
        if self._entry is not None:
            unregister(self._entry)
            self._entry = None
        if self.requested or self.auto:
            torch.set_num_threads(self._previous)
