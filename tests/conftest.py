"""Shared fixtures. Real-PTB tests find the data through $PTB_DIR (CI sets it to ../shared/data/ptb).

Without the data they skip locally, but under CI (``CI=true``) a missing PTB is a failure:
the real-data tests must never silently skip there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_PTB = ROOT.parent / "shared" / "data" / "ptb"


def _ptb_dir() -> Path | None:
    env = os.environ.get("PTB_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    return _DEFAULT_PTB if _DEFAULT_PTB.is_dir() else None


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """The real PTB directory; skip (fail under CI) when it is absent."""
    path = _ptb_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("PTB data not found under CI: set PTB_DIR=../shared/data/ptb")
        pytest.skip("real PTB not available: set PTB_DIR")
    os.environ["PTB_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path_factory, monkeypatch):
    """Caches go to one temporary data root per session, never into the repository's data/."""
    root = tmp_path_factory.getbasetemp() / "lm-data"
    monkeypatch.setenv("FLIPOUT_LM_DATA", str(root))
    # the thread policy counts only this session's trainings, not other sessions' on the same machine
    monkeypatch.setenv("FLIPOUT_LM_RUNS_DIR", str(tmp_path_factory.getbasetemp() / "lm-runs"))
    path = _ptb_dir()
    if path is not None:
        monkeypatch.setenv("PTB_DIR", str(path))


@pytest.fixture(scope="module")
def one_thread():
    """The tensors here are tiny: on 2 shared cores, thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the fault battery's run (tests/test_faults.py, tests/test_faults_runtime.py) --------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, ptb_dir):
    """A tiny finished-for-now run: 4 steps, validations (and last.pt) at steps 2 and 4."""
    import train as train_script  # here, not at the top: only these tests need the entry script
    from tests.tiny import write_tiny

    base = tmp_path_factory.mktemp("faults")
    os.environ["FLIPOUT_LM_DATA"] = str(tmp_path_factory.getbasetemp() / "lm-data")
    cfg = write_tiny(base, train={"max_steps": 4, "eval_every_steps": 2, "progress": False})
    run = base / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    return cfg, run


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run (and its config file)."""
    cfg, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return cfg, copy
