"""The window kernel's recurrence as a loop of torch ops: the step wherever the fused C step of
:mod:`lm.nn.lstm_fused` does not run (CUDA, float64, fp16, no compiler, ``FLIPOUT_LM_FUSED=0``).

:func:`window_forward` and :func:`window_backward` take the arguments of
:func:`lm.nn.lstm_kernel._window_forward` and ``_LSTMWindow._backward`` and give the same
results as their C counterparts up to float rounding (tests/test_lstm_kernel.py runs both against
``reference_loop``). Every op writes into a preallocated ``(B, H)`` or ``(B, 4H)`` buffer; the
matmuls are :mod:`lm.nn.lstm_matmul`'s.
"""

from __future__ import annotations

import torch

from lm.nn.lstm_matmul import GateMatmul, HiddenGrad


def _steps(x, steps: int) -> list:
    """Per-step views of a per-step tensor ``(T, ...)``; a per-window tensor, a float or None repeated."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return list(x.unbind(0))
    return [x] * steps


def window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, low, save: bool, bias=None):
    """:func:`lm.nn.lstm_kernel._window_forward` as torch ops (same arguments and results)."""
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


def window_backward(d_out, d_h, d_c, fac, aux, w, delta, s, r, mask, zc, zh, stacked, low):
    """The torch step loop of the backward pass: from the gradients of the window's output
    ``(T, B, H)`` and final state, turns ``fac`` into the gate gradients in place and returns
    ``(dh_0, dc_0)`` (:mod:`lm.nn.lstm_fused` does the same with fused steps)."""
    steps, batch, h4 = fac.shape
    hid = h4 // 4
    fac_steps = fac.unbind(0)
    f3s = list(fac.view(steps, batch, 4, hid)[:, :, :3].unbind(0))
    fos = list(fac.view(steps, batch, 4, hid)[:, :, 3].unbind(0))
    bcs, fts = (list(v.unbind(0)) for v in aux.view(steps, batch, 2, hid).unbind(2))
    s_t, r_t, zc_t, zh_t = (_steps(x, steps) for x in (s, r, zc, zh))
    keep_c = 1 - zc if zc is not None else None
    keep_c_t = _steps(keep_c, steps)
    d_hs = (fac.new_zeros(batch, hid), *d_out.to(fac.dtype).unbind(0))  # the gradient of h_t, t = 0..T
    grad_h = HiddenGrad(w, delta, mask, batch, stacked, low)
    new = lambda: fac.new_empty(batch, hid)  # noqa: E731
    dcn = new()
    dc_bufs, dh_bufs = (new(), new()), (new(), new())
    dh, dc = d_hs[steps] + d_h, d_c
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
