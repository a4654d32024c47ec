"""The C step's interface: the loaded library (``csrc/lstm_step.c``), its plan and slots.

A :class:`Builder` fills one ``Plan`` (the C struct every step call reads) from tensors: each slot
is a base pointer with the distances between rows and between steps, in elements, and the
builder keeps the tensors alive while the plan is in use. :func:`library` loads the library
(:mod:`lm.nn.cext`) and sets the functions' signatures, refusing a build whose struct layout
differs. :func:`transposed` is the library's tiled transpose. The window logic that uses them is
:mod:`lm.nn.lstm_fused`.
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int, c_int32, c_int64, c_void_p

import torch

from lm.nn import cext

F_X, F_R, F_C, F_H, F_CELL, F_ZC, F_ZH, F_FAC, F_AUX, F_MASK, F_S, F_LEFT0, F_LEFT1, F_LOW0, F_BIAS = range(15)  # csrc
B_FAC, B_AUX, B_ZC, B_ZH, B_R, B_S, B_MASK, B_DOUT, B_DH, B_DC, B_SIGNED, B_DGLOW, B_DB = range(13)
Z_NONE, Z_MASK, Z_SCALAR = 0, 1, 2


class _Slot(ctypes.Structure):
    _fields_ = [("base", c_void_p), ("row", c_int64), ("step", c_int64)]


class _Plan(ctypes.Structure):
    _fields_ = [("batch", c_int64), ("hid", c_int64), ("threads", c_int32), ("low", c_int32), ("save", c_int32),
                ("zc_mode", c_int32), ("zh_mode", c_int32), ("xlow", c_int32), ("nokeep", c_int32),
                ("flow", c_int32), ("zc", c_float), ("zh", c_float), ("bytes", c_int32), ("cell_scale", c_float),
                ("s", _Slot * 16)]


def library() -> ctypes.CDLL | None:
    """The loaded C kernels with their signatures set, or None (see :func:`lm.nn.cext.load`)."""
    lib, status = cext.load("lstm_step")
    if lib is None or getattr(lib, "_flipout_ready", False):
        return lib
    if lib.lstm_step_abi() != ctypes.sizeof(_Plan):  # a stale or foreign build: never read past the struct
        cext._LOADED["lstm_step"] = None, cext.BuildStatus(False, "C struct layout mismatch")
        return None
    plan = ctypes.POINTER(_Plan)
    lib.lstm_left.argtypes = [plan, c_int64]
    lib.lstm_forward_step.argtypes = [plan, c_int64, c_int64, c_void_p, c_void_p]
    lib.lstm_backward_gates.argtypes = [plan, c_int64]
    lib.lstm_backward_hidden_gates.argtypes = [plan, c_int64, c_void_p, c_void_p]
    lib.transpose_2d.argtypes = [c_void_p, c_void_p, c_int64, c_int64, c_int, c_int]
    lib.transpose_to_bf16.argtypes = [c_void_p, c_void_p, c_int64, c_int64, c_int]
    lib.lstm_activations.argtypes = [c_void_p, c_void_p, c_void_p, c_int64]
    for f in (lib.lstm_left, lib.lstm_forward_step, lib.lstm_backward_gates, lib.lstm_backward_hidden_gates,
              lib.transpose_2d, lib.transpose_to_bf16, lib.lstm_activations):
        f.restype = None
    lib._flipout_ready = True
    return lib


class Builder:
    """Fills a plan's slots from tensors and keeps those tensors alive while the plan is used."""

    def __init__(self, batch: int, hid: int, low: torch.dtype | None, save: bool, zc, zh) -> None:
        self.plan, self.keep = _Plan(), []
        p = self.plan
        p.batch, p.hid, p.threads, p.low, p.save = batch, hid, torch.get_num_threads(), int(low is not None), int(save)
        for name, z in (("zc", zc), ("zh", zh)):
            mode = Z_NONE if z is None else Z_MASK if isinstance(z, torch.Tensor) else Z_SCALAR
            setattr(p, f"{name}_mode", mode)
            setattr(p, name, float(z) if mode == Z_SCALAR else 0.0)
        self.ref = ctypes.byref(p)

    def __call__(self, index: int, t: torch.Tensor | float | None, dtype: torch.dtype = torch.float32,
                 out: bool = False) -> None:
        """Slot ``index`` := ``t``, a ``(B, X)`` tensor (the same every step), ``(T, B, X)``, or ``(X,)``
        (the same for every row and step); an input is converted when needed, an output (``out``)
        must already be right."""
        if not isinstance(t, torch.Tensor):
            return
        if t.dtype != dtype or t.device.type != "cpu" or t.stride(-1) != 1:
            if out:
                raise ValueError(f"output slot {index} is {t.dtype} on {t.device} (needs {dtype}, unit stride)")
            t = t.to("cpu", dtype).contiguous()
        self.keep.append(t)
        row, step = (0, 0) if t.dim() == 1 else (t.stride(0), 0) if t.dim() == 2 else (t.stride(1), t.stride(0))
        self.plan.s[index] = _Slot(t.data_ptr(), row, step)

    def mask(self, index: int, t: torch.Tensor | float | None) -> None:
        """Slot ``index`` := a step mask: ``uint8`` 0/1 bytes, read as they are (the C step converts
        them in L1), or float32."""
        if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.device.type == "cpu":
            self.plan.bytes |= 1 << index
            self(index, t, torch.uint8)
        else:
            self(index, t)


def transposed(m: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``mᵀ`` as a contiguous copy (float32 or bfloat16 ``(R, C)`` -> ``(C, R)``, in ``dtype``, by
    default ``m``'s) by the C tiled transpose: the backward products' weights, once per window
    (torch's strided copy is ~4x slower). float32 -> bfloat16 rounds as it transposes, bit for bit
    ``m.to(bfloat16).t()``, in one pass instead of a cast and a transpose."""
    m, dtype = m.contiguous(), dtype or m.dtype
    out, threads = m.new_empty(m.shape[1], m.shape[0], dtype=dtype), torch.get_num_threads()
    if dtype == m.dtype:
        library().transpose_2d(m.data_ptr(), out.data_ptr(), *m.shape, m.element_size(), threads)
    elif (m.dtype, dtype) == (torch.float32, torch.bfloat16):
        library().transpose_to_bf16(m.data_ptr(), out.data_ptr(), *m.shape, threads)
    else:
        return transposed(m.to(dtype))
    return out
