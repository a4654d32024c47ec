"""The window kernel's recurrence with each step's element-wise work in one Triton kernel: the
GPU counterpart of the fused C step (:mod:`lm.nn.lstm_fused`, ``csrc/lstm_step.c``).

Same maths, arguments, saved buffers and results as :mod:`lm.nn.lstm_torchstep` and
:mod:`lm.nn.lstm_fused`; what changes is the number of launches. On a GPU the torch step issues
about 20 small kernels per forward step and 10 per backward step, each paying PyTorch's dispatch
and a launch; here each step is its matmul(s) (cuBLAS, through :func:`lm.nn.lstm_matmul.low_mm`)
and **one** element-wise kernel (:mod:`lm.nn.triton_kernels`):

* forward, per step ``t``: ``p0 = h̃ W_hhᵀ`` (and ``p1 = (h̃ ∘ s) ΔŴᵀ``), then one launch that
  forms the gates ``x̂_t (+ b) + p0 + p1 ∘ r``, updates ``c`` and ``h`` (cell mask, zoneout),
  writes the saved factors and step ``t+1``'s left operands in the matmuls' dtype;
* backward, per step: one launch that finishes step ``t+1``'s hidden gradient
  (``dh_t = dout_t + m ∘ (p0 + p1 ∘ s) + dh_{t+1} ∘ z^h``, with ``p0 = dgates W_hh``,
  ``p1 = (dgates ∘ r) ΔŴ``) and turns step ``t``'s factors into its gate gradients, ``dc_{t-1}``,
  the signed gradients for ``dΔŴ``, the products' low-precision copy and the bias-gradient sums;
  then the product(s); one last launch gives ``dh_0``.

Operands: fp32 weights; the matmuls and their operands in float32 or, under autocast, bfloat16 /
float16 (with float32 accumulation); state, gates and saved factors float32, as in the C step.
Selected by ``FLIPOUT_LM_STEP=triton`` (:mod:`lm.nn.steps`); on a CPU only under
``TRITON_INTERPRET=1`` (the interpreter: the same kernels through numpy, for the tests).
"""

from __future__ import annotations

import torch
import triton

from lm.nn import triton_kernels as K
from lm.nn.lstm_fused import Backward
from lm.nn.lstm_matmul import low_mm

# A program owns BLOCK_B x BLOCK_H units (powers of two: tl.arange) and all four gates of each:
# 128 units, so that the char size (B 32, H 1000) launches 256 programs and the word size 220,
# enough to spread one step over a GPU's ~100+ SMs (a guess to be checked by scripts/gpu_check.sh)
BLOCK_H = 64
BLOCK_B = 2


def blocks(batch: int, hid: int) -> tuple[int, int, tuple[int, int]]:
    """``(BB, BH, grid)``: the block of ``(B, H)`` one program owns, and the launch grid."""
    bb, bh = min(BLOCK_B, triton.next_power_of_2(batch)), min(BLOCK_H, triton.next_power_of_2(hid))
    return bb, bh, (triton.cdiv(batch, bb), triton.cdiv(hid, bh))


def _zone(z) -> tuple[int, torch.Tensor | None, float]:
    """Zoneout as ``(mode, masks or None, probability)``."""
    if z is None:
        return K.Z_NONE, None, 0.0
    if isinstance(z, torch.Tensor):
        return K.Z_MASK, z.to(torch.float32).contiguous(), 0.0
    return K.Z_SCALAR, None, float(z)


def _per_step(x: torch.Tensor | None, per_step_stride: int) -> tuple[torch.Tensor | None, int]:
    """``x`` contiguous float32 and its step stride: ``per_step_stride`` for ``(T, ...)``, 0 for a
    per-window tensor."""
    if x is None:
        return None, 0
    return x.to(torch.float32).contiguous(), per_step_stride if x.dim() == 3 else 0


class _Products:
    """The per-step products of a window: ``x ↦ x Wᵀ`` (forward) or ``x ↦ x W`` (backward) for
    ``W_hh`` (index 0) and ``ΔŴ`` (index 1), the weights cast to ``low`` once per window."""

    def __init__(self, w: torch.Tensor, delta: torch.Tensor | None, low: torch.dtype | None, backward: bool):
        self.low = low
        mats = (w,) if delta is None else (w, delta)
        self.mats = [(m if backward else m.t()) if low is None else (m if backward else m.t()).to(low) for m in mats]

    def __call__(self, i: int, a: torch.Tensor) -> torch.Tensor:
        return low_mm(a, self.mats[i], self.low)  # float32 where the device hands it back so


def window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save: bool, bias=None):
    """:func:`lm.nn.lstm_kernel._window_forward` on the Triton step (same arguments and results).

    ``xproj`` may arrive in ``low`` (autocast's input projection): the kernel reads it as it is.
    Under ``low`` the left operands are always written in ``low`` (``h̃ = h`` without a mask), and
    the window's ``dW_hh`` reads that copy, as on the C step."""
    steps, batch, h4 = xproj.shape
    hid = h4 // 4
    xlow = low is not None and xproj.dtype == low
    xproj = xproj.contiguous() if xlow else xproj.to(torch.float32).contiguous()
    new = lambda *shape, dtype=torch.float32: w.new_empty(*shape, dtype=dtype)  # noqa: E731
    hall, call = new(steps + 1, batch, hid), new(steps + 1, batch, hid)
    hall[0], call[0] = h0, c0
    fac = new(steps, batch, h4) if save else None
    aux = new(steps, batch, 2 * hid) if save else None
    flip, ldt, n = delta is not None, low or torch.float32, steps if save else 1
    s, s_t = _per_step(s, batch * hid)
    r, r_t = _per_step(r, batch * h4)
    mask = None if mask is None else mask.to(torch.float32).contiguous()
    left_all = None
    if flip:
        left_all = new(2, n, batch, hid, dtype=ldt)
    elif mask is not None or low is not None:
        left_all = new(n, batch, hid, dtype=ldt)
    left0 = None if left_all is None else left_all[0] if flip else left_all
    left1 = left_all[1] if flip else None
    if left0 is not None:  # step 0's left operands; the kernel writes each next step's
        h_m = h0 if mask is None else h0 * mask
        left0[0].copy_(h_m)
        if flip:
            left1[0].copy_(h_m * s[0] if s_t else h_m * s)
    cell = None if cell is None else cell.to(torch.float32).contiguous()
    (zc_mode, zc_m, zc_v), (zh_mode, zh_m, zh_v) = _zone(zc), _zone(zh)
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    lin = _Products(w, delta, low, backward=False)
    bb, bh, grid = blocks(batch, hid)
    d = hall  # the placeholder of an absent operand (never read)
    for t in range(steps):
        a0 = hall[t] if left0 is None else left0[t if save else 0]
        p0 = lin(0, a0)
        p1 = lin(1, left1[t if save else 0]) if flip else None
        K.forward_step[grid](
            xproj, d if bias is None else bias, p0, d if p1 is None else p1, d if r is None else r, r_t,
            hall, call, d if cell is None else cell, d if zc_m is None else zc_m, d if zh_m is None else zh_m,
            zc_v, zh_v, d if fac is None else fac, d if aux is None else aux, d if mask is None else mask,
            d if s is None else s, s_t, d if left0 is None else left0, d if left1 is None else left1,
            batch * hid if save else 0, t, batch, hid,
            HAS_BIAS=bias is not None, HAS_P1=flip, HAS_CELL=cell is not None, ZC_MODE=zc_mode, ZH_MODE=zh_mode,
            SAVE=save, HAS_MASK=mask is not None, HAS_L0=left0 is not None, HAS_L1=flip, MORE=t + 1 < steps,
            BB=bb, BH=bh)
    return hall, call[steps].clone(), fac, aux, left_all if save else None, None


def window_backward(d_out, d_h, d_c, fac, aux, w, delta, s, r, mask, zc, zh, low, fresh_low: bool = False,
                    keep: bool = True, signed: bool = False, bias: bool = False) -> Backward:
    """:func:`lm.nn.lstm_fused.window_backward` on the Triton step: the same arguments and the same
    :class:`lm.nn.lstm_fused.Backward` (``fresh_low`` is implied: every buffer here is new)."""
    steps, batch, h4 = fac.shape
    hid = h4 // 4
    d_out = d_out.to(torch.float32).contiguous()
    dh = (d_out[steps - 1] + d_h).contiguous()  # dh_{T-1}, then updated in place step by step
    dc = d_c.to(torch.float32).clone().contiguous()
    flip, ldt = delta is not None, low or torch.float32
    s, s_t = _per_step(s, batch * hid)
    r, r_t = _per_step(r, batch * h4)
    mask = None if mask is None else mask.to(torch.float32).contiguous()
    (zc_mode, zc_m, zc_v), (zh_mode, zh_m, zh_v) = _zone(zc), _zone(zh)
    bb, bh, grid = blocks(batch, hid)
    sg = None
    if flip:
        sg = fac.new_empty(steps, batch, h4, dtype=ldt) if signed else fac.new_empty(batch, h4, dtype=ldt)
    dglow = None if low is None else fac.new_empty(steps, batch, h4, dtype=low)
    db = fac.new_zeros(batch, h4) if bias else None  # per-row sums over the steps
    keep = keep or low is None
    lin = _Products(w, delta, low, backward=True)
    grads = fac if dglow is None else dglow
    p0 = p1 = None
    d = fac
    for t in range(steps - 1, -2, -1):  # t = -1: the last launch, dh_0 only
        hidden, gates = t < steps - 1, t >= 0
        K.backward_step[grid](
            fac, aux, d_out, dh, dc, d if p0 is None else p0, d if p1 is None else p1, d if mask is None else mask,
            d if s is None else s, s_t, d if zc_m is None else zc_m, d if zh_m is None else zh_m, zc_v, zh_v,
            d if r is None else r, r_t, d if dglow is None else dglow, d if sg is None else sg,
            batch * h4 if signed else 0, d if db is None else db, t, batch, hid,
            HIDDEN=hidden, GATES=gates, HAS_P1=flip, HAS_MASK=mask is not None, ZC_MODE=zc_mode, ZH_MODE=zh_mode,
            KEEP=keep, HAS_DGL=dglow is not None, HAS_SG=flip, HAS_DB=db is not None, BB=bb, BH=bh)
        if gates:
            p0 = lin(0, grads[t])
            p1 = lin(1, sg[t] if signed else sg) if flip else None
    # the kernels wrote fac through a raw pointer: bump its version, so that a second backward
    # through a retained graph fails on ctx.saved_tensors as the torch step's does
    torch.autograd.graph.increment_version(fac)
    return Backward(dh, dc, dglow, sg if signed else None, None if db is None else db.sum(0))
