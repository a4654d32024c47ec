"""Build, cache and load the small C kernels of :mod:`lm.nn` (``csrc/lstm_step.c``, ``csrc/philox.c``).

The C files use no torch headers, so a build is one ``cc`` call of 0.6-2 s on the development
machine (a torch C++ extension takes a minute). The compiler is ``$CC`` (a command line, e.g.
``ccache gcc``), else ``gcc`` or ``cc`` on the PATH; the code is built for ``-march=native``
unless ``$FLIPOUT_LM_MARCH`` names another target (``x86-64-v3`` or ``haswell``: the AVX2 build of
an AVX2-only machine, made on an AVX-512 one). A compiler that rejects ``-fopenmp`` (Apple's
clang) gets a build without OpenMP: the same results on one thread, said in :func:`build_info`
and the start-up summary.

**The cache.** The shared object is cached under ``$FLIPOUT_LM_CACHE`` (default
``~/.cache/flipout-lm``), named by a hash of the source, the flags (``-march``, OpenMP), the
compiler's command and version and this CPU's flags, so later runs and other processes load it
without building. A library loaded from a directory runs its code inside training, so the
cache is treated as :mod:`lm.private` says: the directory is created with mode 0700 and used only
if it is owned by this user and not writable by others; a cached file is opened without following
symlinks and loaded only if that descriptor is a regular file owned by this user and not writable
by others (the very file checked is loaded, through ``/proc/self/fd`` where there is one). A
build happens in a private temporary directory and is copied into the cache under a temporary
name and renamed, so concurrent runs never load half a file. A cache that fails a check or
cannot be written (read-only, ``EROFS``, full) is not used: the library is built for this
process alone and the summary says why. A cached file that fails a check is rebuilt over.

Nothing here is required: :func:`load` returns None when there is no compiler, the build fails,
``FLIPOUT_LM_FUSED=0`` is set, the library does not load or lacks a function it must export
(a foreign or stale file), and :func:`status` says why; the callers then use their torch
implementation. The library is linked with ``-fopenmp`` and loaded after torch, so it shares
torch's OpenMP runtime (``libgomp.so.1``, already in the process) rather than starting a second
thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lm import private

CSRC = Path(__file__).resolve().parent / "csrc"
BASE_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=gnu11")
"""No -ffast-math (IEEE results, NaN kept). -fno-math-errno is what lets gcc call glibc's vector
logf/sinf/cosf (libmvec) in the Philox normals, which philox.c declares with ``omp declare simd``.
-fno-trapping-math lets gcc compute both sides of a select (``a < b ? x : y``) and blend them,
which is how the C step's loops (σ, tanh, zoneout's lerp) vectorise where vectors have no masks:
without it an AVX2 build left them scalar and its forward step ran 4x slower than the AVX-512
build's. It changes no value (the code never reads the floating-point exception flags)."""
X86_FLAGS = ("-mprefer-vector-width=512",)
"""On x86: gcc vectorises with 256-bit vectors even where AVX-512 is there (its tuning default);
512-bit ones made the C step's forward 10-20% faster on an AVX-512 Xeon. Where the target has
no AVX-512 (AVX2) the flag changes nothing."""
SYMBOLS = {
    "philox": ("philox_uniform", "philox_normal", "philox_two_valued", "philox_bytes", "philox_kat"),
    "lstm_step": ("lstm_step_abi", "lstm_left", "lstm_forward_step", "lstm_backward_gates",
                  "lstm_backward_hidden_gates", "transpose_2d", "transpose_to_bf16", "lstm_activations"),
}
"""The functions each library must export; a library without one is not used."""


@dataclass
class BuildStatus:
    """What :func:`load` did for one source: ``ok``; ``reason`` when not; ``seconds`` the build took
    in this process (0.0: loaded from the cache); ``path`` of the shared object (its cache entry, or
    '' when it was built for this process alone); ``openmp``, ``march``, ``compiler`` (its command)
    and ``version`` (the first line of its ``--version``) of the build; ``notes``: what did not go as usual (a cache
    not used, a cached file rejected, no OpenMP)."""

    ok: bool
    reason: str = ""
    seconds: float = 0.0
    path: str = ""
    openmp: bool = False
    march: str = ""
    compiler: str = ""
    version: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.ok:
            target = f"; -march={self.march}" if self.march not in ("", "native") else ""
            return f"off ({self.reason}{target})" + (f"; {'; '.join(self.notes)}" if self.notes else "")
        how = f"built in {self.seconds:.1f} s" if self.seconds else "cached build"
        where = self.path or "not cached"
        threads = "OpenMP" if self.openmp else "no OpenMP: one thread"
        facts = f"{self.version or self.compiler}, -march={self.march}, {threads}"
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"C kernel ({how}, {facts}; {where}{notes})"


_LOADED: dict[str, tuple[ctypes.CDLL | None, BuildStatus]] = {}
_OPEN_FDS: list[int] = []  # descriptors of loaded libraries: kept open so that no later /proc/self/fd/N is reused


def cache_dir() -> Path:
    return Path(os.environ.get("FLIPOUT_LM_CACHE") or Path.home() / ".cache" / "flipout-lm")


def march() -> str:
    """The ``-march`` target: ``$FLIPOUT_LM_MARCH`` or ``native``."""
    return os.environ.get("FLIPOUT_LM_MARCH", "").strip() or "native"


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
        return subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""


def _version_line(cc: str) -> str:
    return (_compiler_version(cc).strip().splitlines() or [""])[0]


def flags(openmp: bool) -> tuple[str, ...]:
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return (*BASE_FLAGS, *(X86_FLAGS if x86 else ()), f"-march={march()}", *(("-fopenmp",) if openmp else ()))


def _key(source: bytes, cc: str, openmp: bool) -> str:
    blob = b"\0".join([source, " ".join(flags(openmp)).encode(), cc.encode(), _compiler_version(cc).encode(),
                       _cpu_flags().encode()])
    return hashlib.sha256(blob).hexdigest()[:16]


def _compile(src: Path, out: Path, cc: str, openmp: bool) -> str:
    """Build ``out``; '' on success, else the compiler's first error line (or its last line)."""
    done = subprocess.run([*shlex.split(cc), *flags(openmp), "-o", str(out), str(src), "-lm"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 0 and out.is_file():
        return ""
    lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
    return next((line.strip() for line in lines if "error" in line.lower()), lines[-1].strip())


def _dlopen(fd: int, path: str) -> ctypes.CDLL:
    """Load the file open as ``fd`` (the very file that was checked, where ``/proc/self/fd`` exists)."""
    import torch  # noqa: F401  (torch's libgomp first, so the library binds to it)

    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc):
        lib = ctypes.CDLL(proc)
        _OPEN_FDS.append(fd)
        return lib
    try:
        return ctypes.CDLL(path)
    finally:
        os.close(fd)


def _missing(lib: ctypes.CDLL, name: str) -> list[str]:
    return [s for s in SYMBOLS.get(name, ()) if not hasattr(lib, s)]


def _obtain(name: str, cc: str) -> tuple[ctypes.CDLL | None, BuildStatus]:
    src = CSRC / f"{name}.c"
    source = src.read_bytes()
    status = BuildStatus(False, march=march(), compiler=cc, version=_version_line(cc))
    cache = cache_dir()
    dir_fd = None
    try:
        dir_fd = private.open_dir(cache)
    except OSError as e:  # Untrusted included
        status.notes.append(f"cache not used: {e}")
    try:
        # 1. a cached build: with OpenMP, else one made without (this compiler rejected -fopenmp)
        if dir_fd is not None:
            for openmp in (True, False):
                fname = f"{name}-{_key(source, cc, openmp)}.so"
                try:
                    fd = private.open_file(fname, dir_fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    status.notes.append(f"cached file rejected and rebuilt: {e}")
                    break
                lib = _dlopen(fd, str(cache / fname))
                return _checked(lib, name, status, openmp, 0.0, str(cache / fname))
        # 2. build in a private temporary directory, then copy into the cache
        start = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix="flipout-lm-build-"))
        try:
            openmp = True
            out = build / f"{name}.so"
            error = _compile(src, out, cc, openmp=True)
            if error:
                if _compile(src, out, cc, openmp=False):
                    raise RuntimeError(f"{cc} failed: {error}")
                openmp = False
                status.notes.append(f"{cc} rejected -fopenmp ({error}): built without OpenMP")
            fname = f"{name}-{_key(source, cc, openmp)}.so"
            path = ""
            if dir_fd is not None:
                try:
                    private.write_atomic(fname, out.read_bytes(), dir_fd, mode=0o700)
                    path = str(cache / fname)
                except OSError as e:
                    status.notes.append(f"not cached: {e.strerror or e}")
            fd = private.open_file(str(out))
            lib = _dlopen(fd, str(out))
            return _checked(lib, name, status, openmp, time.perf_counter() - start, path)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _checked(lib: ctypes.CDLL, name: str, status: BuildStatus, openmp: bool, seconds: float,
             path: str) -> tuple[ctypes.CDLL | None, BuildStatus]:
    status.openmp, status.seconds, status.path = openmp, seconds, path
    missing = _missing(lib, name)
    if missing:
        status.reason = f"{path or name} lacks {', '.join(missing)} (a foreign or stale file: delete it to rebuild)"
        return None, status
    status.ok = True
    return lib, status


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
        try:
            result = _obtain(name, cc)
        except Exception as e:  # noqa: BLE001 -- any failure here only means: use the torch implementation
            result = None, BuildStatus(False, f"build or load failed: {type(e).__name__}: {e}", march=march(),
                                       compiler=cc, version=_version_line(cc))
    _LOADED[name] = result
    return result


def status(name: str) -> BuildStatus:
    """How ``name`` was (or would now be) obtained, building it if this process has not yet."""
    return load(name)[1]


def build_info(name: str = "lstm_step") -> dict:
    """The build facts of ``name`` for the start-up summary and ``results.json``: ``ok``, ``compiler``
    (its command), ``compiler_version``, ``march``, ``openmp``, ``cached`` and ``reason``/``notes``
    when not as usual."""
    s = status(name)
    return {"ok": s.ok, "compiler": s.compiler, "compiler_version": s.version, "march": s.march or march(),
            "openmp": s.openmp if s.ok else None, "cached": s.ok and s.seconds == 0.0, "path": s.path, "reason": s.reason, "notes": list(s.notes)}
