"""Which step does the window kernel's element-wise work: the fused C step, the Triton step or
torch ops (:mod:`lm.nn.lstm_fused`, :mod:`lm.nn.lstm_triton`, :mod:`lm.nn.lstm_torchstep`).

``FLIPOUT_LM_STEP`` picks it (read at every window, so a test can set it):

* ``auto`` (default): the C step wherever it applies (CPU, float32 weights, packed matmuls),
  torch ops elsewhere, CUDA included;
* ``torch``: torch ops everywhere;
* ``triton``: the Triton step for float32 weights, on CUDA or, with ``TRITON_INTERPRET=1``, on
  CPU tensors through Triton's interpreter (how the tests run the very kernels a GPU runs);
  float64 weights (the exact tests) keep the torch step. Without the ``triton`` package, or on a
  CPU without the interpreter, it is an error, not a silent fallback.

All three give the same numbers up to float rounding (tests/test_lstm_kernel.py,
tests/test_lstm_triton.py). The noise draws are not the step's: switching it leaves them as
they are, so a training run ends at the same validation loss up to rounding.
"""

from __future__ import annotations

import functools
import os

import torch

from lm.errors import UserError
from lm.nn import lstm_fused

ENV = "FLIPOUT_LM_STEP"
CHOICES = ("auto", "torch", "triton")


def requested() -> str:
    """The value of ``FLIPOUT_LM_STEP`` (``auto`` when unset); anything else is a UserError."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise UserError(f"{ENV}={value!r} is not a step: use one of {', '.join(CHOICES)}")
    return value


def interpreted() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """``(importable, why not)`` for :mod:`lm.nn.lstm_triton` (imported once; ``import triton``
    works without a GPU)."""
    try:
        from lm.nn import lstm_triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e}): pip install triton==3.9.0"
    return True, ""


def choose(w: torch.Tensor, low: torch.dtype | None) -> str:
    """``"c"``, ``"triton"`` or ``"torch"`` for a window with weights ``w`` and matmul dtype ``low``."""
    want = requested()
    if want == "triton" and w.dtype == torch.float32:
        # the device first: importing the kernels without the interpreter would compile them for a GPU
        if w.device.type != "cuda" and not interpreted():
            raise UserError(f"{ENV}=triton runs on CUDA tensors, or on a CPU only under Triton's interpreter: "
                            "set TRITON_INTERPRET=1 (slow; for tests) or unset it")
        ok, why = triton_status()
        if not ok:
            raise UserError(f"{ENV}=triton: {why}")
        return "triton"
    if want == "auto" and lstm_fused.usable(w, low):
        return "c"
    return "torch"


def module(kind: str):
    """The module that runs a window's steps for ``kind`` (:func:`choose`)."""
    if kind == "c":
        return lstm_fused
    if kind == "triton":
        from lm.nn import lstm_triton
        return lstm_triton
    from lm.nn import lstm_torchstep
    return lstm_torchstep


def describe(device: str) -> str:
    """One line for the start-up summary: which step runs a float32 window on ``device``."""
    want = requested()
    if want == "triton":
        where = "CUDA" if device.startswith("cuda") else "CPU, Triton interpreter" if interpreted() else None
        if where is None:
            return f"{ENV}=triton unusable here: a CPU without TRITON_INTERPRET=1"
        ok, why = triton_status()
        if not ok:
            return f"{ENV}=triton unusable here: {why}"
        return f"the Triton step ({where}; {ENV}=triton)"
    if want == "torch":
        return f"torch ops ({ENV}=torch)"
    return ""
