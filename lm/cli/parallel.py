"""Seeds in parallel processes: ``python train.py --config X --seeds 1 2 3 4 --parallel 2``.

Up to N seeds train at once, each in its own Python process, started as soon as a slot is free.
Each child's output goes to ``<run dir>/seed<SEED>.log`` (appended, so a resumed seed keeps its
history); this process prints one line when a seed starts and one when it ends.

Threads are split by the thread policy of :mod:`lm.train.threads`: a child is registered the
moment it starts, so each of N children on C cores starts with ``max(1, C // N)`` threads (when
no other training runs), and the last ones take the cores back as the others finish. An explicit
``--train.threads K`` is passed on and used as given.

Ctrl-C or SIGTERM is forwarded once to every running child (they run in their own sessions, so a
terminal's Ctrl-C does not reach them twice); each saves ``last.pt``, no new seed starts, and
running the same command again resumes the sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import lm
from lm.train.threads import register, unregister

_CHILD = ("import sys; from lm.errors import run_cli; from lm.cli.train import main; "
          "sys.exit(run_cli(main, sys.argv[1:]))")


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line of one seed's process (train.py's main with ``argv``)."""
    return [sys.executable, "-c", _CHILD, *argv]


def run_parallel(jobs: Sequence[tuple[int, Path, list[str]]], base: Path, parallel: int,
                 say: Callable[[str], None], poll_s: float = 0.2) -> list[int]:
    """Run ``(seed, run dir, train.py argv)`` jobs, ``parallel`` at a time; return their exit codes.

    Stops starting new seeds after a signal or an interrupted child (exit code >= 128).
    """
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    root = str(Path(lm.__file__).resolve().parents[1])  # the children import this very copy of lm
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pending, running, codes = list(jobs), {}, []
    stop: list[int] = []

    def forward(signum, frame) -> None:
        if not stop:
            stop.append(signum)
            for proc in running:
                proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            while pending and len(running) < parallel and not stop:
                seed, run, argv = pending.pop(0)
                log_path = base / f"seed{seed}.log"
                log = open(log_path, "a")
                proc = subprocess.Popen(child_command(argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                running[proc] = (seed, log, register(proc.pid))
                say(f"seed {seed}: started {run} in process {proc.pid} (log: {log_path})")
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                seed, log, entry = running.pop(proc)
                log.close()
                unregister(entry)
                code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # killed by a signal
                codes.append(code)
                say(f"seed {seed}: finished with exit code {code}"
                    + ("" if code == 0 else f" (see {base}/seed{seed}.log)"))
                if code >= 128 and not stop:  # interrupted from outside: start nothing new
                    stop.append(code - 128)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop:
        codes.append(128 + stop[0])
    return codes
