"""What this machine can run: probes of the CPU (or GPU) and of PyTorch's kernels on it.

Every probe runs once per process (``functools.cache``) and is immune to the context of its
first call: it sets autocast, grad mode and inference mode itself, so a probe first asked inside
``torch.inference_mode()`` or under ``torch.autocast`` answers as it would anywhere else.

The facts and what follows from them (:mod:`lm.nn.precision` turns them into a plan):

* the ISA ATen dispatches to (``AVX512``, ``AVX2``, ...; ``ATEN_CPU_CAPABILITY`` lowers it) and
  the one oneDNN is capped at (``ONEDNN_MAX_CPU_ISA``): together they are the machine class of
  every figure in the docs; ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes an
  AVX-512 machine stand in for an AVX2 one;
* bf16 units (``avx512_bf16``, ``amx_bf16``) present in the CPU and usable by oneDNN under its
  cap: without them bf16 matmuls are emulated and slower than float32;
* oneDNN's LSTM under CPU autocast, per low dtype: float16 has none anywhere, bfloat16 only with
  bf16 units (``could not create a primitive descriptor`` otherwise); the fused layers then run
  in float32 (:meth:`lm.nn.lstm.LSTMLayer._fused`);
* oneDNN's linear per low dtype (:func:`onednn_linear`): without it the window kernel's matmuls
  run in float32 (:func:`lm.nn.precision.window_dtype`);
* on CUDA, the device's compute capability (bf16 needs 8.0).

Tests force a probe either way with :func:`force` (a context manager).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from lm.nn import cext
from lm.nn.lstm_matmul import onednn_linear_available

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) under which its bf16 instructions are not used
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_FORCED: dict[str, object] = {}


def _forced(name: str):
    return _FORCED.get(name)


@contextlib.contextmanager
def force(**probes):
    """Override probes inside the block (tests of the fallback decisions), for example
    ``force(fused_lstm_bfloat16=False, bf16_units=False)``."""
    old = dict(_FORCED)
    _FORCED.update(probes)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none, as on macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name, or what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def thp() -> dict:
    """Transparent huge pages: ``alloc``, whether PyTorch's CPU allocator asks for them
    (``THP_MEM_ALLOC_ENABLE=1``, read by c10 at its first allocation), and ``system``, the
    kernel's mode (``always``, ``madvise`` or ``never``; None where it cannot be read). With
    ``madvise`` the allocator's request is what turns them on for tensors of 2 MiB and more."""
    system = None
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        system = text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()
    except (OSError, IndexError):
        pass
    return {"alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "") == "1", "system": system}


def isa() -> str:
    """The ISA of this process's kernels: ATen's capability, and oneDNN's cap where one is set
    (``AVX512``, ``AVX2``, ``AVX2 (oneDNN AVX2)``, ...)."""
    forced = _forced("isa")
    if forced is not None:
        return str(forced)
    aten = torch.backends.cpu.get_cpu_capability()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return f"{aten} (oneDNN {cap})" if cap and cap not in ("ALL", "DEFAULT", aten.upper()) else aten


def bf16_units() -> bool:
    """Whether bf16 matmuls run on bf16 units here: the CPU has them (``avx512_bf16`` or
    ``amx_bf16``) and oneDNN may use them (not capped below, ``ONEDNN_MAX_CPU_ISA``)."""
    forced = _forced("bf16_units")
    if forced is not None:
        return bool(forced)
    if not ({"avx512_bf16", "amx_bf16"} & cpu_flags()):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap in _ONEDNN_NO_BF16:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@functools.cache
def _fused_lstm_probe(dtype: torch.dtype) -> bool:
    try:
        with torch.inference_mode(False), torch.enable_grad():
            lstm = torch.nn.LSTM(4, 8)
            x = torch.randn(3, 2, 4, requires_grad=True)
            with torch.autocast("cpu", dtype=dtype, enabled=True):
                y, _ = lstm(x)
            with torch.autocast("cpu", enabled=False):
                y.float().sum().backward()
            return bool(y.dtype == dtype and torch.isfinite(x.grad).all())
    except (RuntimeError, NotImplementedError):  # "could not create a primitive descriptor ..."
        return False


def fused_lstm(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU LSTM (oneDNN) runs forward and backward under autocast to ``dtype``."""
    forced = _forced("fused_lstm_" + str(dtype).removeprefix("torch."))
    return bool(forced) if forced is not None else _fused_lstm_probe(dtype)


def onednn_linear(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies in ``dtype`` on this CPU (:func:`lm.nn.lstm_matmul.onednn_linear_available`):
    without it, ATen's emulated bf16/fp16 matmuls run several times slower than float32."""
    forced = _forced("onednn_linear_" + str(dtype).removeprefix("torch."))
    return bool(forced) if forced is not None else onednn_linear_available(dtype)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (bf16 needs (8, 0))."""
    return torch.cuda.get_device_capability(device)


def describe_cpu() -> str:
    """``Intel(R) Xeon(R) Processor, AVX512, bf16 units``: the machine class of a CPU figure."""
    return f"{cpu_model()}, {isa()}, {'bf16 units' if bf16_units() else 'no bf16 units'}"


def describe(device: torch.device | str) -> str:
    """The start-up summary's device: ``cpu (model, ISA, bf16 units or not)`` or
    ``cuda:0 (GPU name, compute capability 9.0)``."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    return f"{device} ({describe_cpu()})"


def facts(device: torch.device | str) -> dict:
    """What results.json and the benchmark JSONs record of the machine: CPU model, ISA, bf16 units,
    threads, and on a CPU transparent huge pages (:func:`thp`) and the C step's build (on CUDA the GPU and its compute capability)."""
    device = torch.device(device)
    out = {"cpu": cpu_model(), "isa": isa(), "bf16_units": bf16_units(), "threads": torch.get_num_threads()}
    if device.type == "cpu":  # the fused C step's build: compiler, target (FLIPOUT_LM_MARCH), OpenMP
        out["thp"] = thp()
        info = cext.build_info("lstm_step")
        out["c_step"] = {k: info[k] for k in ("ok", "compiler_version", "march", "openmp", "reason")}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["compute_capability"] = ".".join(map(str, cuda_capability(device)))
    return out
