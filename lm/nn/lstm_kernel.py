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
it so, the torch step takes it to float32) and its gradient goes back in it; the state, the gates, the cell update, the saved backward factors and the whole
element-wise backward stay float32, as do the outputs and the gradients handed back.
"""

from __future__ import annotations

import torch

from lm.nn import lstm_fused
from lm.nn.flipout import Flip
from lm.nn.lstm_matmul import GateMatmul, HiddenGrad, low_mm
from lm.nn.noise import State, WindowDraws
from lm.nn.precision import autocast_dtype, autocast_off


def _flip_parts(flip: Flip | None):
    if flip is None:
        return None, None, None
    return flip.delta, flip.sign_in, flip.sign_out


def _steps(x, steps: int) -> list:
    """Per-step views of a per-step tensor ``(T, ...)``; a per-window tensor, a float or None repeated."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return list(x.unbind(0))
    return [x] * steps


def _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save: bool, bias=None,
                    projected: bool = False):
    """The forward recurrence of one window (``delta``: ``ΔŴ`` ``(4H, H)`` with flipout, else None;
    ``low``: the dtype of the matmuls under mixed precision, else None; ``bias`` ``(4H,)``, added
    to ``xproj`` when given; ``projected``: the window made ``xproj`` itself, see :class:`_LSTMWindow`).

    Returns ``hall`` ``(T+1, B, H)`` (``h0``, then every ``h_t``), ``c_T``, and, when ``save``,
    what backward needs (else None): ``fac`` ``(T, B, 4H)``, the derivative factors of the four
    gate pre-activations, which backward turns into ``dgates`` in place::

        [σ'(i) g̃,  σ'(f) c_{t-1},  σ(i) tanh'(g) d_t,  σ'(o) tanh(c̃) (1 - z^h)]   (g̃ = tanh(g) d_t)

    ``aux`` ``(T, B, 2H)`` = ``[σ(o) tanh'(c̃) (1 - z^h),  σ(f)]``, and ``left`` the matmuls'
    left operands: ``h̃`` ``(T, B, H)`` (with a hidden mask) or ``[h̃, h̃ ∘ s]`` ``(2, T, B, H)``
    (flipout); None when ``h̃ = h_{t-1}``. Last, the ``[W_hh, ΔŴ]`` stack the ``bmm`` backend
    built for flipout (None otherwise), which backward reuses instead of stacking again.

    Where it applies (CPU, packed matmuls), :mod:`lm.nn.lstm_fused` runs the same recurrence with
    each step's element-wise work fused into one C call; below is the torch loop it replaces.
    """
    if lstm_fused.usable(w, low):
        return lstm_fused.window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save, bias,
                                         projected)
    xproj = xproj.to(w.dtype) if bias is None else xproj.to(w.dtype) + bias  # it may arrive in `low`
    steps, batch, h4 = xproj.shape
    hid = h4 // 4
    new = lambda *shape: xproj.new_empty(*shape)  # noqa: E731
    hall = new(steps + 1, batch, hid)
    hall[0] = h0
    hs, xs = hall.unbind(0), xproj.unbind(0)
    fac = aux = left_all = None
    if save:
        fac, aux = new(steps, batch, h4), new(steps, batch, 2 * hid)
        fis, ffs, fgs, fos = (list(v.unbind(0)) for v in fac.view(steps, batch, 4, hid).unbind(2))
        bcs, fts = (list(v.unbind(0)) for v in aux.view(steps, batch, 2, hid).unbind(2))
    flip = delta is not None
    if flip:
        left_all = new(2, steps if save else 1, batch, hid)
        lefts = list(left_all.unbind(1)) if save else [left_all[:, 0]] * steps
    elif mask is not None:
        left_all = new(steps if save else 1, batch, hid)
        lefts = list(left_all.unbind(0)) if save else [left_all[0]] * steps
    if not save:
        left_all = None
    s_t, r_t, cell_t = _steps(s, steps), _steps(r, steps), _steps(cell, steps)
    zc_t, zh_t = _steps(zc, steps), _steps(zh, steps)
    gates = GateMatmul(w, delta, batch, low)
    gi, gf, gg, go = gates.gates
    u, v, tc, gp_buf, w_buf = (new(batch, hid) for _ in range(5))
    c_bufs = (new(batch, hid), new(batch, hid))
    cn_buf = new(batch, hid) if zc is not None else None
    hn_buf = new(batch, hid) if zh is not None else None
    c = c0
    for t in range(steps):
        h = hs[t]
        if flip:
            lt = lefts[t]
            hr = torch.mul(h, mask, out=lt[0]) if mask is not None else lt[0].copy_(h)
            torch.mul(hr, s_t[t], out=lt[1])
        else:
            lt = h if mask is None else torch.mul(h, mask, out=lefts[t])
        gates(xs[t], lt, r_t[t])
        gates.if_block.sigmoid_()
        gg.tanh_()
        go.sigmoid_()
        gp = gg if cell is None else torch.mul(gg, cell_t[t], out=gp_buf)
        torch.mul(gi, gp, out=u)
        torch.mul(gf, c, out=v)
        c_next = c_bufs[t % 2]
        cn = torch.add(v, u, out=c_next if zc is None else cn_buf)
        torch.tanh(cn, out=tc)
        hn = torch.mul(go, tc, out=hs[t + 1] if zh is None else hn_buf)
        if save:
            torch.addcmul(u, u, gi, value=-1, out=fis[t])  # i(1-i) g̃
            torch.addcmul(v, v, gf, value=-1, out=ffs[t])  # f(1-f) c_{t-1}
            torch.addcmul(gi, torch.mul(gi, gg, out=w_buf), gg, value=-1, out=fgs[t])  # i(1-g²)
            if cell is not None:
                fgs[t].mul_(cell_t[t])
            torch.addcmul(hn, hn, go, value=-1, out=fos[t])  # o(1-o) tanh(c̃)
            torch.addcmul(go, hn, tc, value=-1, out=bcs[t])  # o(1-tanh²(c̃))
            fts[t].copy_(gf)
            if isinstance(zh, torch.Tensor):  # times (1 - z^h)
                fos[t].addcmul_(fos[t], zh_t[t], value=-1)
                bcs[t].addcmul_(bcs[t], zh_t[t], value=-1)
            elif zh is not None:
                fos[t].mul_(1 - zh)
                bcs[t].mul_(1 - zh)
        if zc is not None:
            torch.lerp(cn, c, zc_t[t], out=c_next)
        if zh is not None:
            torch.lerp(hn, h, zh_t[t], out=hs[t + 1])
        c = c_next
    return hall, c, fac, aux, left_all, gates.stacked


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
    def forward(ctx, xin, w_ih, b, h0, c0, w, delta, s, r, mask, cell, zc, zh, low):
        proj, fused = w_ih is not None, lstm_fused.usable(w, low)
        xproj, xl, wl = lstm_fused.project(xin, w_ih, low, pooled=fused) if proj else (xin, None, None)
        hall, c, fac, aux, left, stacked = _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low,
                                                           save=True, bias=b, projected=proj)
        if proj and fused:
            lstm_fused.release(xproj)  # read by now; the backward needs x and W_ih, not xproj
        ctx.low, ctx.x_dtype, ctx.proj = low, xin.dtype, proj
        zc_t, zh_t = (z if isinstance(z, torch.Tensor) else None for z in (zc, zh))
        ctx.save_for_backward(hall, fac, aux, left, w, delta, stacked, s, r, mask, zc_t, zh_t, xl, wl)
        ctx.zone = (zc, zh) if zc_t is None or zh_t is None else None  # floats (eval expectation) or None
        return hall, c

    @staticmethod
    def backward(ctx, d_hall, d_c):
        with autocast_off(d_hall.device.type):  # float32 element-wise work, explicit casts
            return _LSTMWindow._backward(ctx, d_hall, d_c)

    @staticmethod
    def _backward(ctx, d_hall, d_c):
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
        fused, dg_low = lstm_fused.usable(w, low), None
        # an xproj that came in `low` gets its gradient in `low`: the C step's bf16 copy of dgates
        x_low = not ctx.proj and ctx.x_dtype == low
        if fused:
            dh, dc, dg_low = lstm_fused.window_backward(d_hall, d_c, fac, aux, w, delta, s, r, mask, zc, zh, low,
                                                        fresh_low=x_low)
        else:
            dh, dc = _backward_loop(d_hall, d_c, fac, aux, w, delta, s, r, mask, zc, zh, stacked, low)
        h4, hid = w.shape
        need = ctx.needs_input_grad
        # the fused step hands the gate gradients back in bf16 too (dg_low), so no cast here
        d_gates = (fac if dg_low is None else dg_low).view(-1, h4)
        hr = hall[:-1] if left is None else left[0] if delta is not None else left
        d_w = _weight_grad(d_gates, hr.reshape(-1, hid), low) if need[5] else None
        d_delta = None
        if delta is not None and need[6] and dg_low is not None:
            d_delta = _weight_grad((dg_low * r.to(dg_low.dtype)).view(-1, h4), left[1].reshape(-1, hid), low)
        elif delta is not None and need[6]:
            # dΔ = Σ_t (dgates ∘ r)ᵀ (h̃ ∘ s): flip the signs of dgates in place and back (r ∘ r = 1 exactly)
            fac.mul_(r)
            d_delta = _weight_grad(d_gates, left[1].reshape(-1, hid), low)
            fac.mul_(r)
        d_x = d_w_ih = d_b = None
        if ctx.proj:  # xproj = x' W_ih'ᵀ + b (lm.nn.lstm_fused.project)
            d_b = fac.view(-1, h4).sum(0) if need[2] else None
            d_w_ih = _weight_grad(d_gates, xl.reshape(-1, xl.shape[-1]), low) if need[1] else None
            if need[0]:
                d_x = low_mm(d_gates, wl, low).view(*xl.shape).to(ctx.x_dtype)
            spent = fac
        elif x_low and dg_low is not None:
            d_x, dg_low, spent = dg_low, None, fac
        else:
            d_x, spent = fac.to(ctx.x_dtype), None
        if fused:
            lstm_fused.release(aux, left, dg_low, spent)
        return (d_x, d_w_ih, d_b, dh if need[3] else None, dc if need[4] else None, d_w, d_delta,
                None, None, None, None, None, None, None)


def _backward_loop(d_hall, d_c, fac, aux, w, delta, s, r, mask, zc, zh, stacked, low):
    """The torch step loop of the backward pass: turns ``fac`` into the gate gradients in place
    and returns ``(dh_0, dc_0)`` (:mod:`lm.nn.lstm_fused` does the same with fused steps)."""
    steps, batch, h4 = fac.shape
    hid = h4 // 4
    fac_steps = fac.unbind(0)
    f3s = list(fac.view(steps, batch, 4, hid)[:, :, :3].unbind(0))
    fos = list(fac.view(steps, batch, 4, hid)[:, :, 3].unbind(0))
    bcs, fts = (list(v.unbind(0)) for v in aux.view(steps, batch, 2, hid).unbind(2))
    s_t, r_t, zc_t, zh_t = (_steps(x, steps) for x in (s, r, zc, zh))
    keep_c = 1 - zc if zc is not None else None
    keep_c_t = _steps(keep_c, steps)
    d_hs = d_hall.unbind(0)
    grad_h = HiddenGrad(w, delta, mask, batch, stacked, low)
    new = lambda: fac.new_empty(batch, hid)  # noqa: E731
    dcn = new()
    dc_bufs, dh_bufs = (new(), new()), (new(), new())
    dh, dc = d_hs[steps], d_c
    for t in range(steps - 1, -1, -1):
        dgt = fac_steps[t]
        fos[t].mul_(dh)  # d o
        torch.mul(dh, bcs[t], out=dcn)
        if zc is None:
            dcn.add_(dc)
        elif isinstance(zc, torch.Tensor):
            dcn.addcmul_(dc, keep_c_t[t])
        else:
            dcn.add_(dc, alpha=keep_c)
        f3s[t].mul_(dcn.unsqueeze(1))  # d i, d f, d g
        dc_prev = torch.mul(dcn, fts[t], out=dc_bufs[t % 2])
        if zc is not None:
            dc_prev.addcmul_(dc, zc_t[t]) if isinstance(zc, torch.Tensor) else dc_prev.add_(dc, alpha=zc)
        dh_prev = grad_h(d_hs[t], dgt, r_t[t], s_t[t], out=dh_bufs[t % 2])
        if zh is not None:
            dh_prev.addcmul_(dh, zh_t[t]) if isinstance(zh, torch.Tensor) else dh_prev.add_(dh, alpha=zh)
        dh, dc = dh_prev, dc_prev
    return dh, dc


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
    the weights' float32 (see the module docstring); outputs and state come back in float32."""
    delta, s, r = _flip_parts(draws.flip)
    device = xproj.device.type
    low = autocast_dtype(device) if weight_hh.dtype == torch.float32 else None
    # under autocast the input projection arrives in `low` and stays so: the fused step reads it
    # directly, the torch step casts it (_window_forward); the gradient goes back in `low`
    if weight_ih is not None and bias is None:
        bias = weight_ih.new_zeros(weight_ih.shape[0])
    args = (xproj, weight_ih, bias, state[0], state[1], weight_hh, delta, s, r, draws.hidden_mask,
            draws.cell_mask, draws.zoneout_c, draws.zoneout_h)
    with autocast_off(device):  # the kernel casts explicitly; autocast would break out=
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            hall, c = _LSTMWindow.apply(*args, low)
        else:
            hall, c = _forward_only(*args, low)
    return hall[1:], (hall[-1], c)


def _forward_only(xin, w_ih, b, h0, c0, w, delta, s, r, mask, cell, zc, zh, low):
    """The window without a graph (evaluation): :func:`_window_forward`, projecting ``xin`` first
    when ``w_ih`` is given."""
    if w_ih is None:
        return _window_forward(xin, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save=False)[:2]
    fused = lstm_fused.usable(w, low)
    xproj = lstm_fused.project(xin, w_ih, low, pooled=fused)[0]
    out = _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save=False, bias=b)[:2]
    if fused:
        lstm_fused.release(xproj)
    return out
