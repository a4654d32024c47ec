"""The window kernel: one autograd Function for a whole BPTT window of the LSTM recurrence.

:func:`lstm_window` computes exactly what :func:`lm.nn.lstm.reference_loop` computes (same arguments:
the window's input projection, the state, ``W_hh`` and the :class:`lm.nn.noise.WindowDraws`), with a
hand-written backward. Shapes: ``xproj`` ``(T, B, 4H)``, state ``(h, c)`` each ``(B, H)``,
``W_hh`` ``(4H, H)``; outputs ``(T, B, H)``.

Why a hand-written backward: autograd of a step loop differentiates every step separately,
so it computes one ``(4H, H)`` gradient of ``W_hh`` (and of ``ΔŴ``) per step and adds them up;
that is T large outer products and T passes over a ``4H x H`` buffer. The window kernel
(:class:`_LSTMWindow`) instead

* computes ``dW_hh = Σ_t dgatesᵀ h̃_{t-1}`` and ``dΔŴ = Σ_t (dgates ∘ r)ᵀ (h̃_{t-1} ∘ s)`` as one
  matmul each over the window;
* writes, during the forward step, the element-wise derivative factors of the four gates into
  one ``(T, B, 4H)`` buffer (plus ``(T, B, 2H)``), which backward turns into the gate gradients
  in place: memory stays linear in T and below nn.LSTM's, and the backward step is a handful
  of element-wise ops and one matmul;
* leaves per step only the unavoidable matmuls (forward ``h̃ W_hhᵀ``, backward ``dgates W_hh``,
  and the ``ΔŴ`` products with flipout; backends in :mod:`lm.nn.lstm_matmul`) and element-wise ops
  into preallocated buffers. The kernel leaves torch's thread setting alone: switching to one
  thread for the element-wise ops (tried) cost 1-4% on an idle 2-core machine, because every
  switch re-forms the OpenMP team of the next matmul.

Mixed precision (under ``torch.autocast`` with bfloat16 or float16, :mod:`lm.nn.precision`): the
kernel switches autocast off for itself and runs only the matmuls in the low dtype -- the
per-step products (:mod:`lm.nn.lstm_matmul`) and the window's two weight-gradient products --
with float32 accumulation. The input projection arrives in the low dtype (the fused step reads
it so, the torch step takes it to float32) and its gradient goes back in it; the state, the
gates, the cell update and the whole element-wise backward stay float32, as do the outputs and
the gradients handed back. The saved backward factors are float32 on the torch step and bf16 on
the fused C step (stored rounded, computed and read back in float32; :mod:`lm.nn.lstm_fused`).
"""

from __future__ import annotations

import torch

from lm.nn import lstm_fused, steps
from lm.nn.flipout import Flip
from lm.nn.lstm_matmul import low_mm
from lm.nn.noise import State, WindowDraws
from lm.nn.precision import autocast_dtype, autocast_off, window_dtype


def _flip_parts(flip: Flip | None):
    if flip is None:
        return None, None, None
    return flip.delta, flip.sign_in, flip.sign_out


def _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save: bool, bias=None,
                    cell_scale: float = 1.0):
    """The forward recurrence of one window (``delta``: ``ΔŴ`` ``(4H, H)`` with flipout, else None;
    ``low``: the dtype of the matmuls under mixed precision, else None; ``bias`` ``(4H,)``, added
    to ``xproj`` when given: the window made ``xproj`` itself, see :func:`_run`). The step masks
    ``cell``, ``zc``, ``zh`` may be ``uint8`` bytes (``cell`` times ``cell_scale``) on the fused C
    step only; :func:`lstm_window` hands the other steps :meth:`WindowDraws.dense` values.

    Returns ``hall`` ``(T+1, B, H)`` (``h0``, then every ``h_t``), ``c_T``, and, when ``save``,
    what backward needs (else None): ``fac`` ``(T, B, 4H)``, the derivative factors of the four
    gate pre-activations, which backward turns into ``dgates`` in place::

        [σ'(i) g̃,  σ'(f) c_{t-1},  σ(i) tanh'(g) d_t,  σ'(o) tanh(c̃) (1 - z^h)]   (g̃ = tanh(g) d_t)

    ``aux`` ``(T, B, 2H)`` = ``[σ(o) tanh'(c̃) (1 - z^h),  σ(f)]``, and ``left`` the matmuls'
    left operands: ``h̃`` ``(T, B, H)`` (with a hidden mask) or ``[h̃, h̃ ∘ s]`` ``(2, T, B, H)``
    (flipout); None when ``h̃ = h_{t-1}``. Last, the ``[W_hh, ΔŴ]`` stack the ``bmm`` backend
    built for flipout (None otherwise), which backward reuses instead of stacking again.

    Where it applies (CPU, packed matmuls), :mod:`lm.nn.lstm_fused` runs the same recurrence with
    each step's element-wise work fused into one C call; with ``FLIPOUT_LM_STEP=triton``
    :mod:`lm.nn.lstm_triton` in one Triton kernel; elsewhere :mod:`lm.nn.lstm_torchstep` as torch
    ops (:mod:`lm.nn.steps` chooses).
    """
    kind = steps.choose(w, low)
    run = steps.module(kind).window_forward
    scaled = {"cell_scale": cell_scale} if kind == "c" else {}
    return run(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save, bias, **scaled)


class _LSTMWindow(torch.autograd.Function):
    """The recurrence of one window with a hand-written backward (see the module docstring).

    Its first input is either the input projection ``xproj`` ``(T, B, 4H)`` (``w_ih`` None) or,
    with ``w_ih`` ``(4H, in)`` and ``b`` ``(4H,)``, the layer's input ``x`` ``(T, B, in)``, which the
    window projects itself: on the fused step into a pooled buffer, with the bias added by the C
    step, and its backward computes ``dx``, ``dW_ih`` and ``db`` from the gate gradients, so that
    neither ``xproj`` nor ``fac`` leaves the kernel and both are reused from window to window.

    Backward overwrites its saved factors with the gate gradients (saving a fresh ``(T, B, 4H)``
    buffer), so a second backward through the same graph (``retain_graph=True``) is refused with
    an error. Flipout signs must be exactly ±1 (as :meth:`Flip.sample` draws them): ``dΔ`` flips
    the signs of the gate gradients in place and back.
    """

    @staticmethod
    def forward(ctx, xin, w_ih, b, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, cell_scale):
        (hall, c, fac, aux, left, stacked), xl, wl = _run(xin, w_ih, b, h0, c0, w, delta, s, r, mask, cell, zc, zh,
                                                         low, save=True, cell_scale=cell_scale)
        ctx.low, ctx.x_dtype, ctx.proj = low, xin.dtype, w_ih is not None
        zc_t, zh_t = (z if isinstance(z, torch.Tensor) else None for z in (zc, zh))
        ctx.save_for_backward(hall, fac, aux, left, w, delta, stacked, s, r, mask, zc_t, zh_t, xl, wl)
        ctx.zone = (zc, zh) if zc_t is None or zh_t is None else None  # floats (eval expectation) or None
        # the output as a view of hall and the final h as its own tensor: slicing hall outside
        # would make autograd zero-fill and copy a (T+1, B, H) gradient for each of the two
        return hall[1:], hall[-1].clone(), c

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):
        with autocast_off(d_out.device.type):  # float32 element-wise work, explicit casts
            return _LSTMWindow._backward(ctx, d_out, d_h, d_c)

    @staticmethod
    def _backward(ctx, d_out, d_h, d_c):
        low = ctx.low
        try:
            hall, fac, aux, left, w, delta, stacked, s, r, mask, zc, zh, xl, wl = ctx.saved_tensors
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
            raise RuntimeError("the LSTM window kernel supports one backward pass per forward (its backward "
                               "reuses the saved buffers): run the forward again instead of retain_graph=True"
                               ) from e
        if ctx.zone is not None:
            zc = zc if zc is not None else ctx.zone[0]
            zh = zh if zh is not None else ctx.zone[1]
        kind, dg_low, signed, d_b = steps.choose(w, low), None, None, None
        fused = kind == "c"
        h4, hid = w.shape
        need = ctx.needs_input_grad
        # an xproj that came in `low` gets its gradient in `low`: the C step's bf16 copy of dgates
        x_low = not ctx.proj and ctx.x_dtype == low
        want_dd = delta is not None and need[6]
        if kind != "torch":
            # under bf16 the float32 gate gradients are needed only for an xproj that came in
            # float32; the C (or Triton) step sums the bias gradient and signs the window's dgates for dΔŴ
            keep = low is None or not (ctx.proj or x_low)
            got = steps.module(kind).window_backward(d_out, d_h, d_c, fac, aux, w, delta, s, r, mask, zc, zh, low,
                                             fresh_low=x_low, keep=keep, signed=want_dd,
                                             bias=ctx.proj and need[2])
            dh, dc, dg_low, signed, d_b = got
        else:
            dh, dc = steps.module(kind).window_backward(d_out, d_h, d_c, fac, aux, w, delta, s, r, mask, zc, zh, stacked,
                                                    low)
        # the fused step hands the gate gradients back in bf16 too (dg_low), so no cast here
        d_gates = (fac if dg_low is None else dg_low).view(-1, h4)
        hr = hall[:-1] if left is None else left[0] if delta is not None else left
        d_w = _weight_grad(d_gates, hr.reshape(-1, hid), low) if need[5] else None
        d_delta = None
        if signed is not None:
            d_delta = _weight_grad(signed.view(-1, h4), left[1].reshape(-1, hid), low)
        elif want_dd:
            # dΔ = Σ_t (dgates ∘ r)ᵀ (h̃ ∘ s): flip the signs of dgates in place and back (r ∘ r = 1 exactly)
            fac.mul_(r)
            d_delta = _weight_grad(d_gates, left[1].reshape(-1, hid), low)
            fac.mul_(r)
        d_x = d_w_ih = None
        if ctx.proj:  # xproj = x' W_ih'ᵀ + b (lm.nn.lstm_fused.project)
            if d_b is None and need[2]:
                d_b = fac.view(-1, h4).sum(0)
            d_w_ih = _weight_grad(d_gates, xl.reshape(-1, xl.shape[-1]), low) if need[1] else None
            if need[0]:
                d_x = low_mm(d_gates, wl, low).view(*xl.shape).to(ctx.x_dtype)
            spent = fac
        elif x_low and dg_low is not None:
            d_x, dg_low, spent = dg_low, None, fac
        else:
            d_x, spent = fac.to(ctx.x_dtype), None
        if fused:
            lstm_fused.release(aux, left, dg_low, spent, signed)
        return (d_x, d_w_ih, d_b, dh if need[3] else None, dc if need[4] else None, d_w, d_delta,
                None, None, None, None, None, None, None, None)


def _weight_grad(d_gates: torch.Tensor, left: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
    """``Σ_t dgates_tᵀ left_t`` ``(4H, H)`` over the window's ``T·B`` rows, in float32 (the
    product in ``low`` under mixed precision, accumulated in float32)."""
    if low is None:
        return d_gates.t().mm(left)
    return low_mm(d_gates.t(), left, low).float()


def lstm_window(xproj: torch.Tensor, state: State, weight_hh: torch.Tensor, draws: WindowDraws, *,
                weight_ih: torch.Tensor | None = None, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, State]:
    """The fast recurrence of one window; same arguments and results as :func:`reference_loop`.

    With ``weight_ih`` ``(4H, in)`` (and ``bias`` ``(4H,)``), the first argument is the layer's
    input ``x`` ``(T, B, in)`` instead, and the window computes ``xproj = x W_ihᵀ + b`` itself
    (see :class:`_LSTMWindow`: on the fused step no ``(T, B, 4H)`` buffer is allocated afresh).

    Under ``torch.autocast`` (bf16/fp16) the matmuls run in that dtype and everything else in
    the weights' float32 (see the module docstring); outputs and state come back in float32.
    When it is differentiated, the output is a view of the kernel's ``(T+1, B, H)`` buffer
    (``h_0`` first), so autograd refuses to modify it in place: use out-of-place ops on it."""
    device = xproj.device.type
    low = window_dtype(device) if weight_hh.dtype == torch.float32 else None
    if steps.choose(weight_hh, low) != "c":  # only the C step reads byte masks
        draws = draws.dense(state[0].dtype)
    delta, s, r = _flip_parts(draws.flip)
    if low is None and xproj.dtype != weight_hh.dtype and xproj.dtype == autocast_dtype(device):
        xproj = xproj.to(weight_hh.dtype)  # a float32 fallback (no oneDNN low matmul here) takes float32 input
    # under autocast the input projection arrives in `low` and stays so: the fused step reads it
    # directly, the torch step casts it (_window_forward); the gradient goes back in `low`
    if weight_ih is not None and bias is None:
        bias = weight_ih.new_zeros(weight_ih.shape[0])
    args = (xproj, weight_ih, bias, state[0], state[1], weight_hh, delta, s, r, draws.hidden_mask,
            draws.cell_mask, draws.zoneout_c, draws.zoneout_h)
    with autocast_off(device):  # the kernel casts explicitly; autocast would break out=
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            out, h, c = _LSTMWindow.apply(*args, low, draws.cell_scale)
            return out, (h, c)
        hall, c = _run(*args, low, save=False, cell_scale=draws.cell_scale)[0][:2]
    return hall[1:], (hall[-1], c)


def _run(xin, w_ih, b, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save: bool, cell_scale: float = 1.0):
    """``(_window_forward(...), x', W_ih')``: the window on ``xin``, which is ``xproj``, or with
    ``w_ih`` the input ``x``, projected first (:func:`lm.nn.lstm_fused.project`; ``x'``, ``W_ih'``
    the operands its gradients need, else None). On the fused step the projection's buffer is
    pooled and handed back once the forward has read it: neither backward nor the caller needs it."""
    if w_ih is None:
        return _window_forward(xin, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save,
                               cell_scale=cell_scale), None, None
    fused = steps.choose(w, low) == "c"
    xproj, xl, wl = lstm_fused.project(xin, w_ih, low, pooled=fused)
    out = _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save, bias=b,
                          cell_scale=cell_scale)
    if fused:
        lstm_fused.release(xproj)
    return out, xl, wl
