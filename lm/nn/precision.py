"""The one numerical policy of training and evaluation: float32, or mixed precision (bf16, fp16).

``train.precision`` (and ``evaluate.py --precision``):

* ``fp32``: everything in float32. TF32 is set *explicitly* (:func:`set_tf32`): off unless
  ``train.tf32: true``. PyTorch's own defaults differ between cuBLAS (TF32 off) and cuDNN
  (TF32 on), so without this the fused cuDNN path of one regularizer would run its recurrent
  matmuls in TF32 while the window kernel of another ran IEEE float32: two rows of one
  comparison, or training and evaluation, would use different arithmetic.
* ``bf16`` / ``fp16``: the forward pass runs under :func:`torch.autocast` with that dtype.
  Matmuls run in the low precision; parameters, optimizer state, the carried ``(h, c)``, the
  LSTM cell update and the loss stay float32 (the window kernel does its element-wise work in
  float32, :mod:`lm.nn.lstm_kernel`; the fused path hands its state back in float32,
  :mod:`lm.nn.lstm`; the logits are cast to float32 before the loss). ``fp16`` also scales the
  loss (:meth:`Precision.scaler`, a :class:`torch.amp.GradScaler`) because float16's exponent
  range cannot hold small gradients; bf16 has float32's range and needs no scaling.

:meth:`Precision.describe` is what ``results.json`` records under ``precision``.
"""

from __future__ import annotations

import contextlib

import torch

from lm.errors import UserError
from lm.nn import hardware

PRECISIONS = ("fp32", "bf16", "fp16")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_tf32(allow: bool) -> None:
    """Allow (or forbid) TF32 for float32 matmuls (cuBLAS) and cuDNN (the fused LSTM) alike.

    The legacy flags are used on purpose: in torch 2.13, mixing them with the newer
    ``fp32_precision`` attributes makes reading either raise; the legacy setters keep both views
    consistent (``torch.backends.cuda.matmul.fp32_precision`` follows them)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)


def tf32_flags() -> dict:
    """The TF32 settings in force (for results.json and the tests)."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The low-precision dtype autocast is running in on ``device_type`` now, or None (float32).

    The window kernel asks this at each call: under autocast it runs its matmuls in that dtype
    (and switches autocast off for its own float32 element-wise work)."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def autocast_off(device_type: str):
    """A context with autocast switched off on ``device_type`` (the window kernel casts explicitly);
    a no-op on devices without autocast (the meta device, on which tests trace the kernel)."""
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device (the GPU model, or the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return hardware.cpu_model()


def fused_in_float32(device: torch.device) -> bool:
    """Whether the fused layers (PyTorch's own LSTM) must leave autocast and run in float32 here:
    on a CPU under a low dtype for which oneDNN has no LSTM (:func:`lm.nn.hardware.fused_lstm`)."""
    if device.type != "cpu":
        return False
    dtype = autocast_dtype("cpu")
    return dtype is not None and not hardware.fused_lstm(dtype)


def window_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the window kernel's matmuls now: autocast's low dtype (:func:`autocast_dtype`),
    or None (float32) on a CPU where oneDNN has no linear in it (no bf16 units): ATen's emulated
    bf16 matmuls train the char window kernels at 0.15-0.17x of float32's speed there
    (docs/hardware.md), float32 matmuls at full speed."""
    dtype = autocast_dtype(device_type)
    if dtype is not None and device_type == "cpu" and not hardware.onednn_linear(dtype):
        return None
    return dtype


BF16_WITHOUT_UNITS = (0.82, 0.95)
"""bf16's training speed over fp32's on a CPU without bf16 units, after the float32 fallbacks
(char size, 1x1000): ``python bench/precision_ab.py --threads 2`` under ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 FLIPOUT_LM_MARCH=x86-64-v3`` on an Intel Xeon (median over rounds per
regularizer: none 0.95, zoneout 0.82, wd_flipout 0.92); the emulation gives the direction, not an
AMD figure (docs/hardware.md)."""


class Precision:
    """The policy of one run: ``name`` in :data:`PRECISIONS` on ``device``, TF32 allowed or not.

    Creating it sets the TF32 flags (process-wide: the flags are global in PyTorch)."""

    def __init__(self, name: str, device: torch.device | str, tf32: bool = False) -> None:
        if name not in PRECISIONS:
            raise UserError(f"precision {name!r} is invalid: expected one of {', '.join(PRECISIONS)}")
        self.name, self.device, self.tf32 = name, torch.device(device), bool(tf32)
        self.dtype = LOW_DTYPES.get(name)  # None: float32
        if self.dtype is torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"precision bf16 needs a GPU with bfloat16 support ({device_name(self.device)} has "
                            "none): use fp16 or fp32")
        set_tf32(self.tf32)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 only (a disabled one passes everything through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def plan(self) -> tuple[str, list[str]]:
        """What runs in which dtype on this machine (the start-up summary's ``precision`` line),
        and the notices that go with it (a float32 fallback, bf16 slower than fp32 here)."""
        if self.dtype is None:
            return "fp32: everything in float32", []
        low, notices = self.name, []
        parts = [f"matmuls in {low}", "cell update, state, loss and optimizer in float32"]
        if self.device.type == "cuda":
            parts.insert(1, f"fused layers (cuDNN LSTM) in {low}")
        else:
            if not hardware.onednn_linear(self.dtype):
                parts[0] = f"decoder and input matmuls in {low}"
                parts.insert(1, "window kernels in float32")
                notices.append(f"notice: oneDNN has no {low} matmul on this CPU ({hardware.isa()}): the window "
                               "kernels (per-example or per-step noise) run in float32")
            if hardware.fused_lstm(self.dtype):
                parts.insert(1, f"fused layers (oneDNN LSTM) in {low}")
            else:
                parts.insert(1, "fused layers in float32")
                notices.append(f"notice: oneDNN has no {low} LSTM on this CPU ({hardware.isa()}): the fused "
                               f"layers (regularizers without per-example or per-step noise) run in float32")
            if self.dtype is torch.bfloat16 and not hardware.bf16_units():
                lo, hi = BF16_WITHOUT_UNITS
                notices.append(f"notice: this CPU has no bf16 units: bf16 matmuls are emulated, and bf16 runs at about "
                               f"{lo:.2f}-{hi:.2f}x the speed of fp32 here (measured under the AVX2 emulation, "
                               "docs/hardware.md): fp32 is the faster choice")
        return f"{low}: " + "; ".join(parts), notices

    def describe(self) -> dict:
        """What results.json records: precision, device, its name and machine class (ISA, bf16
        units), torch version, TF32 flags, and what runs in float32 instead."""
        return {"precision": self.name, "device": str(self.device), "device_name": device_name(self.device),
                "machine": hardware.facts(self.device), "plan": self.plan()[0],
                "torch": torch.__version__, "tf32": tf32_flags(),
                "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None}
