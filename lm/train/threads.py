"""How many CPU threads a training uses when several share one machine.

Each PyTorch process starts with as many intra-op threads as the machine has cores. Two such
trainings on one machine then fight over the cores: on 2 cores, two quick-start runs each ran at
0.22 of their solo speed (29k against 131k tokens/s), while with one thread each they ran at
0.55-0.60. OpenMP's passive wait policy helps the pair but halved the speed of a run alone, so it
is not used.

The policy (``train.threads: 0``, the default): every CPU training registers itself as a file
``<registry>/<pid>`` (``$FLIPOUT_LM_RUNS_DIR`` or ``/tmp/flipout-lm-runs-<uid>``), removed when it
ends; files of processes that are gone are ignored and removed. A run uses
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

BASE_THREADS = torch.get_num_threads()  # PyTorch's default, before this process changes it


def registry_dir() -> Path:
    env = os.environ.get("FLIPOUT_LM_RUNS_DIR")
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"flipout-lm-runs-{uid}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (``/proc/<pid>/stat`` field 22), '' where unknown.

    Stored in the registration so that a recycled PID is not taken for the run that registered it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def active_runs(registry: Path) -> int:
    """Registered runs whose process still lives (stale files are removed); at least 1."""
    live = 0
    for path in registry.glob("*"):
        if not path.name.isdigit():
            continue
        pid = int(path.name)
        try:
            started = path.read_text().strip()
        except OSError:  # removed meanwhile
            continue
        if _alive(pid) and (not started or not _start_time(pid) or started == _start_time(pid)):
            live += 1
        else:
            path.unlink(missing_ok=True)
    return max(1, live)


def register(pid: int, registry: Path | None = None) -> Path | None:
    """Register process ``pid`` as a CPU training; the entry's path, or None if the directory is unwritable.

    A parallel seed sweep registers its children as soon as they start, so that each child's first
    count already sees all its siblings.
    """
    registry = registry or registry_dir()
    try:
        registry.mkdir(parents=True, exist_ok=True)
        entry = registry / str(pid)
        entry.write_text(_start_time(pid) + "\n")
        return entry
    except OSError:  # an unwritable temp dir must not stop training: count only the others
        return None


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

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def describe(self) -> str:
        if self.requested:
            return f"{self.threads} (train.threads)"
        if not self.auto:
            return f"{self.threads} (torch default; GPU run, not shared)"
        return (f"{self.threads} (auto: {self.active} flipout-lm run{'s' if self.active > 1 else ''} on "
                f"{self.base} default threads, re-counted every {self.interval:.0f} s; set train.threads to fix)")

    def start(self) -> int:
        """Register (policy) or apply the fixed count; return the thread count now in force."""
        if self.requested:
            torch.set_num_threads(self.requested)
        elif self.auto:
            self._entry = register(os.getpid(), self.registry)
            if self._entry is not None:
                atexit.register(self._entry.unlink, missing_ok=True)  # also when fit() is never reached
            self._apply()
        return self.threads

    def _apply(self) -> bool:
        self._checked = time.monotonic()
        self.active = active_runs(self.registry) if self.registry.is_dir() else 1
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
            self._entry.unlink(missing_ok=True)
            self._entry = None
        if self.requested or self.auto:
            torch.set_num_threads(self._previous)
