"""The window kernel's recurrence with each step's element-wise work fused into one C call.

Same maths, arguments and saved buffers as the torch loops of :mod:`lm.nn.lstm_torchstep`
(``window_forward`` and ``window_backward``); only who does the element-wise work
changes. Per step the torch loop issues about 20 small kernels forward and 10 backward (gate
activations, masks, cell and hidden updates, zoneout, the saved derivative factors, the gate
gradients), each a pass over ``(B, H)`` or ``(B, 4H)`` memory with its dispatch cost. Here:

* forward, per step ``t``: the packed matmul(s) ``p0 = h̃ W_hhᵀ`` (and ``p1 = (h̃ ∘ s) ΔŴᵀ``),
  then one call (``lstm_forward_step`` in ``csrc/lstm_step.c``) that forms the gates
  ``x̂_t + p0 + p1 ∘ r``, updates ``c`` and ``h`` (cell mask, zoneout), writes the saved factors
  and builds step ``t+1``'s left operands (``h̃ = h ∘ m``, ``h̃ ∘ s``) in the matmuls' dtype;
* backward, per step: one call turns the saved factors into the gate gradients and ``dc_{t-1}``
  and hands them on: ``dgates ∘ r`` for the ΔŴ product (kept for the window's ``dΔŴ``), the
  bias gradient's running sum (when the window projected its input), and under bf16 their bf16
  copy; then the packed product(s), and one call forms
  ``dh_{t-1} = dh^{out}_{t-1} + m ∘ (p0 + p1 ∘ s) + dh_t ∘ z^h``. So backward has no pass over a
  ``(T, B, 4H)`` buffer left besides the matmuls.

Under bf16 the C step writes the products' bf16 operands directly: the left operands (kept for the
window's weight gradients, ``(T, B, H)``: the values the torch step rounds them to) and a bf16 copy
of the gate gradients ``(T, B, 4H)``, which :mod:`lm.nn.lstm_kernel` uses for ``dW_hh``, ``dW_ih``
and ``dx``. Unless a float32 input projection from outside needs float32 gate gradients, the saved
factors ``fac`` and ``aux`` are then bf16 too (computed in float32, rounded once as stored, read
back exactly; :data:`LOW_FACTORS`), and backward writes no float32 gate gradients. The state, the
gates, the cell update, the carried ``dh``, ``dc`` and every sum stay float32.

Where: CPU, float32 weights, the ``packed`` matmul backend (:mod:`lm.nn.lstm_matmul`) in float32
or bfloat16, and the C library built (:mod:`lm.nn.cext`). Anything else -- CUDA, float64, fp16,
no compiler, ``FUSED = False`` or ``FLIPOUT_LM_FUSED=0`` -- takes the torch loop, which gives the
same numbers up to float rounding (tests/test_lstm_fused.py). The C code reads raw pointers, so
every operand is checked here to be a CPU tensor of the expected dtype with unit stride along
its rows (an input is converted, an output must already be right).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lm.nn.cstep import (B_AUX, B_DB, B_DC, B_DGLOW, B_DH, B_DOUT, B_FAC, B_MASK, B_R, B_S, B_SIGNED, B_ZC, B_ZH,
                         F_AUX, F_BIAS, F_C, F_CELL, F_FAC, F_H, F_LEFT0, F_LEFT1, F_LOW0, F_MASK, F_R, F_S, F_X,
                         F_ZC, F_ZH, Builder, library, transposed)
from lm.nn.lstm_matmul import Packed, use_packed
from lm.nn.pool import POOL, clear_pool  # noqa: F401  (the pool this module fills)

FUSED: bool | None = None
"""None (default): the C step wherever it applies; False: always the torch loop."""

LOW_FACTORS: bool = True
"""Under bf16, store the saved factors in bf16 where backward needs no float32 gate gradients
(default); False: always float32 (``bench/flag_ab.py`` times the two)."""

def usable(w: torch.Tensor, low: torch.dtype | None) -> bool:
    """Whether the fused step runs this window (weights ``w``, matmul dtype ``low`` or None)."""
    return (FUSED is not False and w.device.type == "cpu" and w.dtype == torch.float32
            and low in (None, torch.bfloat16) and use_packed(w, low) and library() is not None)


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save: bool, bias=None,
                   cell_scale: float = 1.0):
    """:func:`lm.nn.lstm_kernel._window_forward` on the fused step (same arguments and results);
    ``bias`` ``(4H,)`` is given when the window projected its input itself (:func:`project`), and
    the C step adds it to ``xproj``. The step masks ``cell``, ``zc``, ``zh`` may be ``uint8`` 0/1
    bytes (:class:`lm.nn.noise.WindowDraws`), a kept unit of ``cell`` then weighing ``cell_scale``.

    ``xproj`` may be bfloat16 when ``low`` is (autocast's input projection): the C step reads it
    as it is. Its gradient is then the bfloat16 copy of the gate gradients that backward writes
    anyway (:func:`window_backward`), so ``fac`` never leaves the module and is pooled. The same
    holds when the window projected its input itself: its backward turns ``fac`` into ``dx``,
    ``dW_ih`` and ``db``. Under bf16 the left operands are always kept (``h̃ = h`` without a mask),
    as the C step writes ``h`` in bf16 for the products anyway: ``dW_hh`` reads that copy."""
    lib = library()
    steps, batch, h4 = xproj.shape
    hid = h4 // 4
    xlow = low is not None and xproj.dtype == low
    xproj = xproj.contiguous() if xlow else xproj.to(torch.float32).contiguous()
    new = lambda *shape, dtype=torch.float32: w.new_empty(*shape, dtype=dtype)  # noqa: E731
    hall, call = new(steps + 1, batch, hid), POOL.take(w, steps + 1, batch, hid)
    hall[0], call[0] = h0, c0
    fac = aux = left_all = None
    # fac stays inside the module (pooled; bf16 factors under bf16) unless it leaves as the float32
    # gradient of a float32 xproj from outside: xproj came in bf16, or the window projected it
    inner = xlow or bias is not None
    fdt = low if LOW_FACTORS and low is not None and inner else torch.float32
    if save:
        fac = POOL.take(w, steps, batch, h4, dtype=fdt) if inner else new(steps, batch, h4)
        aux = POOL.take(w, steps, batch, 2 * hid, dtype=fdt)
    flip = delta is not None
    ldt = low or torch.float32  # the left operands are kept in the matmuls' dtype
    if flip:
        left_all = POOL.take(w, 2, steps, batch, hid, dtype=ldt) if save else new(2, 1, batch, hid, dtype=ldt)
    elif mask is not None or (low is not None and save):  # under bf16 h̃ = h in bf16 for dW_hh too
        left_all = POOL.take(w, steps, batch, hid, dtype=ldt) if save else new(1, batch, hid, dtype=ldt)
    left0 = None if left_all is None else left_all[0] if flip else left_all
    left1 = left_all[1] if flip else None
    slot = Builder(batch, hid, low, save, zc, zh)
    slot.plan.xlow, slot.plan.flow, slot.plan.cell_scale = int(xlow), int(fdt != torch.float32), cell_scale
    slot(F_X, xproj, xproj.dtype)
    slot(F_BIAS, bias)
    for index, t in ((F_R, r), (F_C, call), (F_H, hall), (F_MASK, mask), (F_S, s)):
        slot(index, t)
    for index, t in ((F_CELL, cell), (F_ZC, zc), (F_ZH, zh)):
        slot.mask(index, t)
    slot(F_FAC, fac, fdt, out=True)
    slot(F_AUX, aux, fdt, out=True)
    for index, t in ((F_LEFT0, left0), (F_LEFT1, left1)):  # one reused buffer when nothing is saved
        slot(index, t if t is None or save else t[0], ldt, out=True)
    h_low = new(batch, hid, dtype=low) if low is not None and left0 is None else None  # h in bf16
    slot(F_LOW0, h_low, ldt, out=True)
    lin = products(w, delta, low, batch)
    lib.lstm_left(slot.ref, 0)
    # each step's left operands as views made in one call (a Python index per step costs more)
    if left0 is None:
        a0s = hall.unbind(0) if h_low is None else (h_low,) * steps
    else:
        a0s = left0.unbind(0) if save else (left0[0],) * steps
    a1s = (left1.unbind(0) if save else (left1[0],) * steps) if flip else (None,) * steps
    for t, a0, a1 in zip(range(steps), a0s, a1s):
        p0 = lin[0](a0)
        p1 = lin[1](a1) if flip else None
        lib.lstm_forward_step(slot.ref, t, steps, p0.data_ptr(), _ptr(p1))
    c_last = call[steps].clone()
    POOL.give(call)
    return hall, c_last, fac, aux, left_all if save else None, None


def products(w: torch.Tensor, delta: torch.Tensor | None, low: torch.dtype | None, batch: int,
             backward: bool = False) -> list[Packed]:
    """The per-step products of a window, their weights cast to ``low`` (or float32) and reordered
    once for ``batch``-row operands: ``x ↦ x Wᵀ`` for ``W_hh`` (and ``ΔŴ``), or with ``backward``
    ``x ↦ x W`` (the weights transposed by :func:`transposed`)."""
    ldt = low or torch.float32
    weights = (w,) if delta is None else (w, delta)
    return [Packed(transposed(m, ldt) if backward else m.to(ldt), batch) for m in weights]


def project(x: torch.Tensor, w_ih: torch.Tensor, low: torch.dtype | None, pooled: bool = True):
    """``(x W_ihᵀ, x', W_ih')``: the input projection ``(T, B, 4H)`` without its bias, in a pooled
    buffer (unless not ``pooled``), and the operands it multiplied (``x``, ``W_ih`` cast to ``low`` as
    autocast's ``F.linear`` casts them, or as they are), which its gradients need. The caller hands
    the buffer back (:func:`release`) once the window's forward has read it: at the char size a
    fresh ``(T, B, 4H)`` buffer costs more in page faults than the projection's matmul itself."""
    steps, batch = x.shape[:2]
    shape, dtype = (steps, batch, w_ih.shape[0]), low or w_ih.dtype
    out = POOL.take(w_ih, *shape, dtype=dtype) if pooled else w_ih.new_empty(*shape, dtype=dtype)
    xl, wl = (x, w_ih) if low is None else (x.to(low), w_ih.to(low))
    torch.mm(xl.reshape(steps * batch, -1), wl.t(), out=out.view(steps * batch, -1))
    return out, xl, wl


def window_backward(d_out, d_h, d_c, fac, aux, w, delta, s, r, mask, zc, zh, low, fresh_low: bool = False,
                    keep: bool = True, signed: bool = False, bias: bool = False) -> Backward:
    """The step loop of :meth:`lm.nn.lstm_kernel._LSTMWindow._backward` on the fused step: turns
    the saved factors into the gate gradients and returns them as :class:`Backward`.

    ``keep``: the float32 gate gradients are written into ``fac`` in place (what the weight
    gradients read in float32); under bf16 they may go only into ``dgates_low``, the window's
    gate gradients in ``low`` for the weight gradients, and ``fac`` is left as it was.
    ``signed`` (flipout): the window's ``dgates ∘ r`` ``(T, B, 4H)`` in the matmul dtype, for
    ``dΔŴ`` (else the C step signs one step at a time for the ΔŴ product only). ``bias``: the
    bias gradient ``Σ_{t,b} dgates`` summed by the C step as it forms the gradients.

    The caller hands ``aux``, the left operands, ``dgates_low`` and ``signed`` to :func:`release`
    once its weight gradients are done; with ``fresh_low`` ``dgates_low`` is a new buffer (it
    leaves as the bfloat16 input projection's gradient) and ``fac`` goes to the pool instead."""
    lib = library()
    steps, batch, h4 = fac.shape
    hid = h4 // 4
    d_out = d_out.to(torch.float32).contiguous()
    f32 = torch.float32  # the carried gradients (fac may be bf16)
    dh2, dc2 = fac.new_empty(2, batch, hid, dtype=f32), fac.new_empty(2, batch, hid, dtype=f32)
    torch.add(d_out[steps - 1], d_h, out=dh2[steps & 1])
    dc2[steps & 1] = d_c
    flip = delta is not None
    ldt = low or torch.float32
    slot = Builder(batch, hid, low, True, zc, zh)
    slot.plan.nokeep = int(not keep and low is not None)
    slot.plan.flow = int(fac.dtype != torch.float32)
    if slot.plan.flow and not slot.plan.nokeep:  # bf16 factors cannot hold float32 gate gradients
        raise ValueError("window_backward: the saved factors are bf16, so keep must be False")
    slot(B_FAC, fac, fac.dtype)
    slot(B_AUX, aux, aux.dtype)
    for index, t in ((B_R, r), (B_S, s), (B_MASK, mask), (B_DOUT, d_out), (B_DH, dh2), (B_DC, dc2)):
        slot(index, t)
    slot.mask(B_ZC, zc)
    slot.mask(B_ZH, zh)
    sg = None
    if flip:
        sg = POOL.take(fac, steps, batch, h4, dtype=ldt) if signed else fac.new_empty(batch, h4, dtype=ldt)
    dglow = None if low is None else fac.new_empty(steps, batch, h4, dtype=low) if fresh_low else \
        POOL.take(fac, steps, batch, h4, dtype=low)
    db = fac.new_zeros(slot.plan.threads, h4, dtype=f32) if bias else None
    slot(B_SIGNED, sg, ldt, out=True)
    slot(B_DGLOW, dglow, ldt, out=True)
    slot(B_DB, db, out=True)
    lin = products(w, delta, low, batch, backward=True)
    grads = (fac if dglow is None else dglow).unbind(0)
    sgs = (sg.unbind(0) if signed else (sg,) * steps) if flip else None
    lib.lstm_backward_gates(slot.ref, steps - 1)
    for t in range(steps - 1, -1, -1):  # step t's products, then its dh_{t-1} and step t-1's gates
        p0 = lin[0](grads[t])
        p1 = lin[1](sgs[t]) if flip else None
        lib.lstm_backward_hidden_gates(slot.ref, t, p0.data_ptr(), _ptr(p1))
    # the C code wrote fac through a raw pointer (with keep off it only read it, but the window's
    # buffers go back to the pool all the same): bump its version, so that a second backward
    # through a retained graph fails on ctx.saved_tensors as the torch step's does
    torch.autograd.graph.increment_version(fac)
    return Backward(dh2[0], dc2[0], dglow, sg if signed else None, None if db is None else db.sum(0))


class Backward(NamedTuple):
    """What :func:`window_backward` hands back: ``dh_0``, ``dc_0`` ``(B, H)``; ``dgates_low``
    ``(T, B, 4H)`` in the matmul dtype (None in float32: the gradients are in ``fac``); ``signed``
    ``dgates ∘ r`` ``(T, B, 4H)`` (when asked for); ``bias`` ``(4H,)`` (when asked for)."""

    dh: torch.Tensor
    dc: torch.Tensor
    dgates_low: torch.Tensor | None
    signed: torch.Tensor | None
    bias: torch.Tensor | None


def release(*buffers: torch.Tensor | None) -> None:
    """Hand a finished window's ``aux``, left operands, low-precision and signed gate gradients
    (or, where those left as the input projection's gradient, ``fac``) to the pool (after its
    backward)."""
    POOL.give(*buffers)
