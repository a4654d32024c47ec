"""The C build cache on a shared machine and on other compilers (lm/nn/cext.py, lm/private.py).

Each attack on the cache plants a library with a constructor that writes a marker file: a
library that is loaded runs it. Attacks that need another user (a foreign owner) run for real
as root (``chown``) and are otherwise covered by the decision functions, which are also tested
directly (running as root masks nothing there: the checks compare owners, not permissions).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from lm import private
from lm.nn import cext, fastrand, lstm_fused, lstm_matmul
from tests import test_lstm_fused as tf

GCC = shutil.which("gcc") or shutil.which("cc")
needs_cc = pytest.mark.skipif(GCC is None, reason="no C compiler")
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *m = getenv("PLANTED_MARKER");
    if (m) { FILE *f = fopen(m, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
int philox_kat(void) { return 0; }
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty private cache under tmp_path, nothing loaded, and a marker path for planted code."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(cext, "_LOADED", {})
    monkeypatch.setenv("FLIPOUT_LM_CACHE", str(cache))
    monkeypatch.setenv("PLANTED_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("CC", GCC or "gcc")
    monkeypatch.delenv("FLIPOUT_LM_MARCH", raising=False)
    yield cache
    cext._LOADED.clear()


def _expected(name: str = "philox", openmp: bool = True) -> str:
    return f"{name}-{cext._key((cext.CSRC / f'{name}.c').read_bytes(), cext._compiler(), openmp)}.so"


def _plant(path: Path) -> Path:
    src = path.with_suffix(".c")
    src.write_text(PLANTED)
    subprocess.run([GCC, "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    src.unlink()
    return path


def _ran(tmp_path: Path) -> bool:
    return (tmp_path / "marker").exists()


# -- the decision functions ------------------------------------------------------------

def _st(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("kind,mode,owner,expect", [
    ("dir", stat.S_IFDIR | 0o700, "me", ""),
    ("dir", stat.S_IFDIR | 0o755, "me", ""),
    ("dir", stat.S_IFDIR | 0o700, "other", "owned by uid"),
    ("dir", stat.S_IFDIR | 0o777, "me", "writable by other users"),
    ("dir", stat.S_IFDIR | 0o770, "me", "writable by other users"),
    ("dir", stat.S_IFLNK | 0o777, "me", "not a directory"),
    ("file", stat.S_IFREG | 0o700, "me", ""),
    ("file", stat.S_IFREG | 0o644, "other", "owned by uid"),
    ("file", stat.S_IFREG | 0o666, "me", "writable by other users"),
    ("file", stat.S_IFLNK | 0o777, "me", "not a regular file"),
    ("file", stat.S_IFIFO | 0o600, "me", "not a regular file"),
])
def test_decision_functions(kind, mode, owner, expect):
    me = 1000
    st = _st(mode, me if owner == "me" else 4242)
    got = (private.dir_problem if kind == "dir" else private.file_problem)(st, me)
    assert (expect in got) if expect else got == ""


# -- attacks on the cache --------------------------------------------------------------

@needs_cc
def test_a_planted_library_in_a_foreign_cache_directory_is_never_loaded(fresh, tmp_path):
    """The cache directory is owned by someone else (or writable by others): not used at all; the
    library is built for this process alone and the status says why."""
    fresh.mkdir(mode=0o777)
    os.chmod(fresh, 0o777)  # writable by everyone: anyone could have put the file there
    _plant(fresh / _expected())
    lib, status = cext.load("philox")
    assert lib is not None and status.ok and status.seconds > 0 and status.path == ""
    assert not _ran(tmp_path) and "cache not used" in status.describe() and "writable by other users" in status.describe()


@needs_cc
@as_root
def test_a_cache_directory_owned_by_another_user_is_not_used(fresh, tmp_path):
    fresh.mkdir(mode=0o700)
    _plant(fresh / _expected())
    os.chown(fresh, 4242, 4242)
    lib, status = cext.load("philox")
    assert lib is not None and status.path == "" and not _ran(tmp_path)
    assert "owned by uid 4242" in status.describe()


@needs_cc
@pytest.mark.parametrize("attack", ["symlink", "writable", "foreign", "fifo"])
def test_a_cached_file_that_fails_a_check_is_rebuilt_not_loaded(fresh, tmp_path, attack):
    if attack == "foreign" and os.geteuid() != 0:
        pytest.skip("chown needs root (the decision function is tested above)")
    fresh.mkdir(mode=0o700)
    target = fresh / _expected()
    if attack == "symlink":
        os.symlink(_plant(tmp_path / "elsewhere.so"), target)
    elif attack == "fifo":
        os.mkfifo(target)
    else:
        _plant(target)
        if attack == "writable":
            os.chmod(target, 0o666)
        else:
            os.chown(target, 4242, 4242)
    lib, status = cext.load("philox")
    assert lib is not None and status.ok and status.seconds > 0 and not _ran(tmp_path)
    assert "cached file rejected" in status.describe()
    assert stat.S_ISREG(os.lstat(target).st_mode) and os.lstat(target).st_uid == os.geteuid()  # rebuilt over it
    assert hasattr(lib, "philox_uniform")


@needs_cc
def test_a_library_without_the_expected_functions_falls_back(fresh, monkeypatch):
    """A file of this user at the expected name that lacks a function: the torch draw, with the reason."""
    fresh.mkdir(mode=0o700)
    _plant(fresh / _expected())
    assert fastrand.library() is None
    status = cext.status("philox")
    assert not status.ok and "lacks philox_uniform" in status.reason and "delete it" in status.describe()
    like = torch.empty(0)
    u = fastrand.uniform((1000,), like, torch.Generator().manual_seed(3))
    assert torch.equal(u, torch.rand(1000, generator=torch.Generator().manual_seed(3)))
    monkeypatch.setattr(cext, "_LOADED", {})
    (fresh / _expected()).unlink()
    assert cext.status("philox").ok  # deleted: rebuilt


@needs_cc
def test_an_unwritable_cache_builds_for_this_process(fresh, monkeypatch):
    """A read-only cache (EROFS, not only PermissionError): the library is built and used, not cached."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(private, "write_atomic", refuse)
    lib, status = cext.load("philox")
    assert lib is not None and status.ok and status.path == "" and "not cached: Read-only file system" in status.describe()


@needs_cc
def test_a_new_cache_directory_is_private(fresh):
    assert cext.status("philox").ok
    st = os.lstat(fresh)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert all(stat.S_IMODE(os.lstat(p).st_mode) & 0o022 == 0 for p in fresh.iterdir())


# -- compilers and targets -------------------------------------------------------------

@needs_cc
def test_a_compiler_command_line_is_accepted(fresh, monkeypatch):
    """``CC="ccache gcc"`` style: a command with arguments (here ``env gcc``)."""
    monkeypatch.setenv("CC", f"env {GCC}")
    lib, status = cext.load("philox")
    assert lib is not None and status.compiler == f"env {GCC}" and status.openmp


@needs_cc
def test_march_override_is_used_and_part_of_the_cache_key(fresh, monkeypatch):
    default = _expected()
    monkeypatch.setenv("FLIPOUT_LM_MARCH", "x86-64-v3" if os.uname().machine == "x86_64" else "native")
    if os.uname().machine == "x86_64":
        assert _expected() != default
    lib, status = cext.load("philox")
    assert lib is not None and status.march == cext.build_info("philox")["march"] == cext.march()
    assert (fresh / _expected()).is_file()
    monkeypatch.setattr(cext, "_LOADED", {})
    monkeypatch.setenv("FLIPOUT_LM_MARCH", "no-such-cpu")
    lib, status = cext.load("philox")
    assert lib is None and "failed" in status.reason and "error" in status.reason
    assert status.march == "no-such-cpu" and "-march=no-such-cpu" in status.describe()


def _no_openmp_cc(tmp_path: Path) -> str:
    """A stand-in for Apple's clang: fails when given -fopenmp, otherwise calls gcc."""
    script = tmp_path / "cc-no-openmp"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
                      f'{{ echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1; }}; done\nexec {GCC} "$@"\n')
    script.chmod(0o755)
    return str(script)


@needs_cc
def test_a_compiler_without_openmp_gets_a_single_threaded_build_with_the_same_results(fresh, monkeypatch, tmp_path):
    """The C step built without OpenMP gives the OpenMP build's results (Philox draws bit for bit;
    the window to float rounding, at a size where the OpenMP build splits rows across threads),
    the status says so, and a second process loads it from the cache."""
    if lstm_fused.library() is None or not lstm_matmul.onednn_linear_available():
        pytest.skip("fused step unavailable")
    inputs, draws = tf._case(True, "per_window", True, "masks", torch.float32)
    with_omp = tf._run(tf.lstm_window, inputs, draws)
    u_omp = fastrand.uniform((100_000,), torch.empty(0), torch.Generator().manual_seed(2))
    monkeypatch.setenv("CC", _no_openmp_cc(tmp_path))
    monkeypatch.setattr(cext, "_LOADED", {})
    info = cext.build_info("lstm_step")
    assert info["ok"] and info["openmp"] is False and any("rejected -fopenmp" in n for n in info["notes"])
    assert "no OpenMP" in cext.status("lstm_step").describe()
    assert torch.equal(fastrand.uniform((100_000,), torch.empty(0), torch.Generator().manual_seed(2)), u_omp)
    without = tf._run(tf.lstm_window, inputs, draws)
    for name, a, b in zip(tf.tk.NAMES, without, with_omp):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-5, f"{name}: {err:.2e}"
    monkeypatch.setattr(cext, "_LOADED", {})
    again = cext.status("lstm_step")
    assert again.ok and again.seconds == 0.0 and not again.openmp  # the no-OpenMP build, from the cache
