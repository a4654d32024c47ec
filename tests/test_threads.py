"""The thread policy for trainings that share a machine, and seeds trained in parallel processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_script
from lm.train import threads
from lm.train.threads import ThreadPolicy, active_runs, policy_threads, register
from tests.tiny import write_tiny


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_policy_threads():
    assert [policy_threads(2, n) for n in (1, 2, 3, 5)] == [2, 1, 1, 1]
    assert [policy_threads(16, n) for n in (1, 2, 3, 4)] == [16, 8, 5, 4]
    assert policy_threads(1, 0) == 1


def test_active_runs_counts_live_registrations_and_drops_stale_ones(tmp_path, sleeper):
    assert active_runs(tmp_path) == 1  # nobody registered: this one run
    register(os.getpid(), tmp_path)
    register(sleeper.pid, tmp_path)
    gone = dead_pid()
    (tmp_path / str(gone)).write_text("123\n")
    (tmp_path / "notes.txt").write_text("not a registration")
    assert active_runs(tmp_path) == 2
    assert not (tmp_path / str(gone)).exists() and (tmp_path / "notes.txt").exists()


def test_recycled_pid_is_not_a_run(tmp_path, sleeper):
    if not Path(f"/proc/{sleeper.pid}/stat").exists():
        pytest.skip("no /proc: start times unknown, a live PID is trusted")
    (tmp_path / str(sleeper.pid)).write_text("1\n")  # registered by an earlier process with that PID
    assert active_runs(tmp_path) == 1 and not (tmp_path / str(sleeper.pid)).exists()


def test_policy_splits_and_takes_back_the_cores(tmp_path, sleeper, restore_threads):
    other = register(sleeper.pid, tmp_path)
    policy = ThreadPolicy(0, registry=tmp_path, interval=0.0, base=4)
    assert policy.start() == 2 and policy.active == 2
    assert (tmp_path / str(os.getpid())).exists()
    assert "auto: 2 flipout-lm runs" in policy.describe()
    assert policy.maybe_adjust() is False  # nothing changed
    other.unlink()  # the other run ended
    assert policy.maybe_adjust() is True and torch.get_num_threads() == 4
    register(sleeper.pid, tmp_path)
    register(dead_pid(), tmp_path)  # a crashed run's leftover does not count
    assert policy.maybe_adjust() is True and torch.get_num_threads() == 2
    before = policy._previous
    policy.stop()
    assert not (tmp_path / str(os.getpid())).exists() and torch.get_num_threads() == before


def test_policy_waits_for_its_interval(tmp_path, sleeper, restore_threads):
    policy = ThreadPolicy(0, registry=tmp_path, interval=3600.0, base=4)
    assert policy.start() == 4
    register(sleeper.pid, tmp_path)
    assert policy.maybe_adjust() is False and torch.get_num_threads() == 4  # re-counts only every hour
    policy.stop()


def test_explicit_threads_and_gpu_runs_do_not_register(tmp_path, restore_threads):
    fixed = ThreadPolicy(3, registry=tmp_path, interval=0.0, base=4)
    assert fixed.start() == 3 and not any(tmp_path.iterdir())
    register(os.getpid() + 0, tmp_path)
    assert fixed.maybe_adjust() is False and torch.get_num_threads() == 3
    assert fixed.describe() == "3 (train.threads)"
    fixed.stop()
    (tmp_path / str(os.getpid())).unlink()
    gpu = ThreadPolicy(0, enabled=False, registry=tmp_path, base=4)
    n = torch.get_num_threads()
    assert gpu.start() == n and not any(tmp_path.iterdir())


def test_default_registry_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("FLIPOUT_LM_RUNS_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert threads.registry_dir().name == f"flipout-lm-runs-{os.getuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert threads.registry_dir() == tmp_path / "flipout-lm-runs"


# -- a registry on a shared machine: each attack of another user ----------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, a process of another user)")


def test_a_new_registry_is_private(tmp_path):
    registry = tmp_path / "reg"
    assert register(os.getpid(), registry) is not None
    assert (registry.stat().st_mode & 0o777) == 0o700 and registry.stat().st_uid == os.geteuid()
    assert (registry / str(os.getpid())).stat().st_mode & 0o022 == 0


def test_a_symlinked_registry_is_not_used_and_nothing_there_is_touched(tmp_path, restore_threads):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / str(dead_pid())).write_text("precious\n")  # numeric name, no live process
    registry = tmp_path / "reg"
    registry.symlink_to(victim)
    assert active_runs(registry) == 1 and register(os.getpid(), registry) is None
    assert [p.name for p in victim.iterdir()] != [] and len(list(victim.iterdir())) == 1
    policy = ThreadPolicy(0, registry=registry, interval=0.0, base=2)
    policy.start()
    assert policy.active == 1 and "registry not used" in policy.describe() and "not a directory" in policy.describe()
    policy.stop()
    assert len(list(victim.iterdir())) == 1


def test_a_planted_entry_symlink_is_replaced_not_written_through(tmp_path):
    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text("precious\n")
    (registry / str(os.getpid())).symlink_to(target)
    entry = register(os.getpid(), registry)
    assert entry is not None and not entry.is_symlink() and target.read_text() == "precious\n"
    threads.unregister(entry)
    assert target.read_text() == "precious\n"


def test_a_fifo_named_like_a_pid_does_not_block_the_count(tmp_path, sleeper):
    import threading

    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    os.mkfifo(registry / str(sleeper.pid))
    result = []
    worker = threading.Thread(target=lambda: result.append(active_runs(registry)), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the count blocked on a FIFO"
    assert result == [1] and not (registry / str(sleeper.pid)).exists()


def test_entries_writable_by_others_are_not_registrations(tmp_path, sleeper):
    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    entry = register(sleeper.pid, registry)
    register(os.getpid(), registry)
    assert active_runs(registry) == 2
    os.chmod(entry, 0o666)
    assert active_runs(registry) == 1 and not entry.exists()  # the writable one is dropped


def test_a_registry_writable_by_others_is_not_used(tmp_path, sleeper):
    registry = tmp_path / "reg"
    registry.mkdir()
    os.chmod(registry, 0o777)
    (registry / str(sleeper.pid)).write_text("\n")  # planted: would count as a live run
    (registry / str(os.getpid())).write_text("\n")
    assert active_runs(registry) == 1 and register(os.getpid() + 1, registry) is None


@as_root
def test_a_registry_owned_by_another_user_is_not_used(tmp_path, sleeper, restore_threads):
    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    (registry / str(sleeper.pid)).write_text("\n")
    (registry / str(dead_pid())).write_text("\n")
    os.chown(registry, 4242, 4242)
    policy = ThreadPolicy(0, registry=registry, interval=0.0, base=2)
    assert policy.start() == 2 and policy.active == 1 and "owned by uid 4242" in policy.describe()
    assert policy.maybe_adjust() is False
    policy.stop()
    assert len(list(registry.iterdir())) == 2  # nothing of theirs removed


@as_root
def test_a_live_process_of_another_user_is_not_a_run(tmp_path):
    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    other = subprocess.Popen(["sleep", "60"], user=4242)
    try:
        (registry / str(other.pid)).write_text(threads._start_time(other.pid) + "\n")
        register(os.getpid(), registry)
        assert active_runs(registry) == 1  # this run alone: the other user's process is not one
    finally:
        other.kill()
        other.wait()


def test_every_oserror_counts_this_run_alone(tmp_path, monkeypatch, restore_threads):
    """A registry whose entries cannot be removed (PermissionError) or listed (EIO): the policy
    starts and re-counts without raising, counting this run alone."""
    import errno

    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    (registry / str(dead_pid())).write_text("\n")  # stale: the count removes it

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "unlink", refuse)
    policy = ThreadPolicy(0, registry=registry, interval=0.0, base=2)
    assert policy.start() == 2 and policy.active == 1
    assert policy.maybe_adjust() is False

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "listdir", broken)
    assert policy.maybe_adjust() is False and policy.active == 1 and "Input/output error" in policy.describe()
    monkeypatch.undo()
    policy.stop()


def test_parallel_seeds(ptb_dir, tmp_path, monkeypatch, capsys):
    registry = tmp_path / "registry"
    monkeypatch.setenv("FLIPOUT_LM_RUNS_DIR", str(registry))
    cfg = write_tiny(tmp_path, train={"max_epochs": 1})
    base = tmp_path / "sweep"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(base), "--seeds", "1", "2",
                              "--parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("started") == 2 and out.count("finished with exit code 0") == 2
    counts = []
    for seed in (1, 2):
        assert json.loads((base / f"seed{seed}" / "results.json").read_text())["seed"] == seed
        log = (base / f"seed{seed}.log").read_text()
        assert "flipout-lm: training" in log
        counts += [int(n) for n in re.findall(r"threads \d+ \(auto: (\d) flipout-lm run", log)]
    # both children are registered as they start, so the first child to count (after importing
    # torch, long after the parent registered both) sees 2 runs; the other may start so late on a
    # loaded machine that its sibling has already finished (then it rightly counts 1)
    assert 2 in counts, counts
    assert not [p for p in registry.iterdir() if p.name.isdigit()]  # every registration removed
    # the same command again: both seeds are finished and skipped
    assert train_script.main(["--config", str(cfg), "--run-dir", str(base), "--seeds", "1", "2",
                              "--parallel", "2"]) == 0
    assert capsys.readouterr().out.count("skipped") == 2


def test_a_sweep_registers_its_children_before_they_count(tmp_path, monkeypatch):
    """``run_parallel`` registers each child as it starts it, so a child that counts the registered
    runs at once (and registers nothing itself) sees its sibling and itself. The stand-in children
    wait for each other (a file each, at most 60 s), so neither can finish before the other has
    counted: the test does not depend on how fast the machine starts processes."""
    from lm.cli import parallel

    monkeypatch.setenv("FLIPOUT_LM_RUNS_DIR", str(tmp_path / "registry"))
    code = ("import pathlib, sys, time\n"
            "from lm.train.threads import active_runs, registry_dir\n"
            "d = pathlib.Path(sys.argv[1])\n"
            "(d / sys.argv[2]).write_text(str(active_runs(registry_dir())))\n"
            "start = time.monotonic()\n"
            "while len(list(d.glob('count*'))) < 2 and time.monotonic() - start < 60:\n"
            "    time.sleep(0.05)\n")
    monkeypatch.setattr(parallel, "child_command", lambda argv: [sys.executable, "-c", code, *argv])
    jobs = [(seed, tmp_path / f"run{seed}", [str(tmp_path), f"count{seed}"]) for seed in (1, 2)]
    assert parallel.run_parallel(jobs, tmp_path / "sweep", 2, say=lambda line: None, poll_s=0.05) == [0, 0]
    assert [(tmp_path / f"count{seed}").read_text() for seed in (1, 2)] == ["2", "2"]


def test_parallel_needs_seeds(tmp_path, capsys):
    cfg = write_tiny(tmp_path)
    assert train_script.main(["--config", str(cfg), "--parallel", "2"]) == 2
    assert "--parallel needs --seeds" in capsys.readouterr().err
    assert train_script.main(["--config", str(cfg), "--seeds", "1", "--parallel", "0"]) == 2


def test_parallel_seeds_stop_together_on_ctrl_c(ptb_dir, tmp_path):
    """SIGINT to the sweep reaches each child once: both save last.pt and say so, the sweep exits 130."""
    import signal
    import time

    cfg = write_tiny(tmp_path, train={"max_epochs": 10000, "eval_every_steps": 5})
    base = tmp_path / "sweep"
    env = dict(os.environ, FLIPOUT_LM_RUNS_DIR=str(tmp_path / "registry"))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "train.py"), "--config", str(cfg), "--run-dir", str(base),
                             "--seeds", "1", "2", "--parallel", "2"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not all((base / f"seed{s}" / "last.pt").is_file() for s in (1, 2)):  # both are training
            assert time.monotonic() < deadline and proc.poll() is None, "seeds did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert out.count("finished with exit code 130") == 2 and "run the same command again" in out
    for s in (1, 2):
        assert "interrupted at step" in (base / f"seed{s}.log").read_text()
