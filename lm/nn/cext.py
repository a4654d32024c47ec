"""Build, cache and load the small C kernels of :mod:`lm.nn` (``csrc/lstm_step.c``, ``csrc/philox.c``).

The C files use no torch headers, so a build is one ``cc`` call of 0.6-2 s on the development
machine (a torch C++ extension takes a minute). The shared object is cached under ``$FLIPOUT_LM_CACHE`` (default
``~/.cache/flipout-lm``), named by a hash of the source, the flags, the compiler's version and
this CPU's flags (``-march=native``), so later runs and other processes load it without building;
it is written to a temporary name and renamed, so concurrent runs never load half a file.

Nothing here is required: :func:`load` returns None when there is no compiler, the build fails,
``FLIPOUT_LM_FUSED=0`` is set, or the library does not load, and :func:`status` says why; the
callers then use their torch implementation. The library is linked with ``-fopenmp`` and loaded
after torch, so it shares torch's OpenMP runtime (``libgomp.so.1``, already in the process)
rather than starting a second thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
"""No -ffast-math (IEEE results, NaN kept); -fno-math-errno is what lets gcc call glibc's vector
expf/tanhf (libmvec), which the C files declare with ``omp declare simd``."""


@dataclass
class BuildStatus:
    """What :func:`load` did for one source: ``ok``; ``reason`` when not; ``seconds`` the build took
    in this process (0.0: loaded from the cache); ``path`` of the shared object."""

    ok: bool
    reason: str = ""
    seconds: float = 0.0
    path: str = ""

    def describe(self) -> str:
        if not self.ok:
            return f"off ({self.reason})"
        how = f"built in {self.seconds:.1f} s" if self.seconds else "cached build"
        return f"C kernel ({how}, {self.path})"


_LOADED: dict[str, tuple[ctypes.CDLL | None, BuildStatus]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("FLIPOUT_LM_CACHE") or Path.home() / ".cache" / "flipout-lm")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _key(source: bytes, cc: str) -> str:
    blob = b"\0".join([source, " ".join(FLAGS).encode(), _compiler_version(cc).encode(), _cpu_flags().encode()])
    return hashlib.sha256(blob).hexdigest()[:16]


def _build(src: Path, out: Path, cc: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(src), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str) -> tuple[ctypes.CDLL | None, BuildStatus]:
    """The library built from ``csrc/<name>.c`` (once per process), and how it was obtained."""
    if name in _LOADED:
        return _LOADED[name]
    result: tuple[ctypes.CDLL | None, BuildStatus]
    cc = _compiler()
    if os.environ.get("FLIPOUT_LM_FUSED", "1").strip().lower() in ("0", "false", "off", "no"):
        result = None, BuildStatus(False, "FLIPOUT_LM_FUSED=0")
    elif cc is None:
        result = None, BuildStatus(False, "no C compiler (gcc or cc) on PATH")
    else:
        start = time.perf_counter()
        try:
            src = CSRC / f"{name}.c"
            out = cache_dir() / f"{name}-{_key(src.read_bytes(), cc)}.so"
            built = False
            if not out.exists():
                try:
                    _build(src, out, cc)
                except PermissionError:  # an unwritable cache: build into a private temporary folder
                    out = Path(tempfile.mkdtemp(prefix="flipout-lm-")) / out.name
                    _build(src, out, cc)
                built = True
            import torch  # noqa: F401  (torch's libgomp first, so the library binds to it)
            lib = ctypes.CDLL(str(out))
            seconds = time.perf_counter() - start if built else 0.0
            result = lib, BuildStatus(True, "", seconds, str(out))
        except Exception as e:  # noqa: BLE001 -- any failure here only means: use the torch implementation
            result = None, BuildStatus(False, f"build or load failed: {type(e).__name__}: {e}")
    _LOADED[name] = result
    return result


def status(name: str) -> BuildStatus:
    """How ``name`` was (or would now be) obtained, building it if this process has not yet."""
    return load(name)[1]
