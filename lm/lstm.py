"""The one LSTM layer of the codebase, parameterised by a per-window noise plan.

The extension point for regularizers is :class:`RecurrentNoise`: once per forward call (one
BPTT window) the regularizer hands each layer the weights to use (the mean weights or a
perturbation shared by the batch), optional flipout draws for ``W_ih`` and ``W_hh``, and the
per-window / per-step masks of the recurrence. The layer then picks its kernel:

* fused: nothing per-example or per-step inside the recurrence -> PyTorch's own LSTM kernel
  (cuDNN on GPU, oneDNN on CPU), with the (possibly perturbed) weights passed functionally
  through :func:`torch.func.functional_call` -- the module's parameters are never replaced;
* window kernel (:func:`lstm_window`): the input projection of the whole window is one matmul
  outside the recurrence, all per-step masks are drawn before it starts, and one autograd
  Function runs the recurrence of the whole window forward and backward (see below).

Equations (paper App. D, Eqs. 19-22; PyTorch gate order i, f, g, o), with the noise hooks::

    h̃ = h_{t-1} ∘ m                                   hidden mask m (variational), per window
    [i, f, g, o] = x̂_t + h̃ W_hhᵀ + ((h̃ ∘ s) ΔŴᵀ) ∘ r    x̂_t = W_ih x_t + b (+ its flipout term)
    c̃ = σ(f) ∘ c_{t-1} + σ(i) ∘ (tanh(g) ∘ d_t)         cell mask d_t (semeniuta), per step
    h̃_t = σ(o) ∘ tanh(c̃)
    c_t = lerp(c̃, c_{t-1}, z^c_t),  h_t = lerp(h̃_t, h_{t-1}, z^h_t)   zoneout (1 = keep old)

Layout: inputs ``(T, B, in)``, outputs ``(T, B, H)``, state ``(h, c)`` each ``(B, H)``.

Why a hand-written backward: autograd of a step loop differentiates every step separately,
so it computes one ``(4H, H)`` gradient of ``W_hh`` (and of ``ΔŴ``) per step and adds them up;
that is T large outer products and T passes over a ``4H x H`` buffer. The window kernel keeps
the activated gates of the window (memory linear in T, like autograd would) and computes
``dW_hh = Σ_t dgatesᵀ h̃_{t-1}`` and ``dΔŴ = Σ_t (dgates ∘ r)ᵀ (h̃_{t-1} ∘ s)`` as one matmul each
over the window. The per-step work left is the two unavoidable matmuls (forward ``h̃ W_hhᵀ``,
backward ``dgates W_hh``; twice that with flipout) and a few element-wise ops into
preallocated buffers; the element-wise derivative factors are computed for the whole
window at once before the backward loop. :func:`reference_loop` is the plain autograd loop
it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from lm.flipout import Flip, flipout_linear

State = tuple[torch.Tensor, torch.Tensor]
Zone = torch.Tensor | float | None  # zoneout: (T, B, H) keep-old masks, a probability (eval), or off


@dataclass
class RecurrentNoise:
    """What a regularizer asks one LSTM layer to do for one window.

    Attributes:
        weight_ih: ``(4H, in)`` input weights to use (mean, or perturbed and shared by the batch).
        weight_hh: ``(4H, H)`` recurrent weights to use.
        flip_ih, flip_hh: per-example flipout perturbations of those maps, or None.
        hidden_mask: ``(B, H)`` scaled mask on ``h_{t-1}`` inside the recurrence, held over the window.
        cell_p: dropout probability on the cell update ``g_t``, a new mask every step.
        zoneout_c, zoneout_h: zoneout probabilities of ``c_t`` and ``h_t`` (training: a new
            Bernoulli mask every step; evaluation: the expectation).
        training: whether stochastic parts are active.
    """

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    flip_ih: Flip | None = None
    flip_hh: Flip | None = None
    hidden_mask: torch.Tensor | None = None
    cell_p: float = 0.0
    zoneout_c: float = 0.0
    zoneout_h: float = 0.0
    training: bool = False

    @property
    def fused(self) -> bool:
        """True when PyTorch's fused LSTM computes exactly this window."""
        return (self.flip_ih is None and self.flip_hh is None and self.hidden_mask is None
                and (self.cell_p == 0 or not self.training) and self.zoneout_c == 0 and self.zoneout_h == 0)


@dataclass
class WindowDraws:
    """The noise of one window's recurrence, drawn before the first step.

    Attributes:
        hidden_mask: ``(B, H)`` scaled mask on ``h_{t-1}`` (before both matmuls), or None.
        flip: flipout draw of ``W_hh`` (signs ``(B, ·)`` per window or ``(T, B, ·)`` per step), or None.
        cell_mask: ``(T, B, H)`` scaled masks on ``tanh(g_t)``, or None.
        zoneout_c, zoneout_h: ``(T, B, H)`` Bernoulli masks (1 keeps the previous value), a
            probability used as the expectation (evaluation), or None.
    """

    hidden_mask: torch.Tensor | None = None
    flip: Flip | None = None
    cell_mask: torch.Tensor | None = None
    zoneout_c: Zone = None
    zoneout_h: Zone = None


def _step_masks(p: float, like: torch.Tensor, steps: int, scale: bool) -> torch.Tensor | None:
    """``steps`` Bernoulli(1-p) masks shaped like ``like`` (``(B, H)``), drawn in one call: ``(T, B, H)``."""
    if p == 0:
        return None
    # rand < 1-p is Bernoulli(1-p); it is twice as fast as bernoulli_ on CPU
    keep = torch.rand((steps, *like.shape), dtype=like.dtype, device=like.device).lt_(1 - p)
    return keep.div_(1 - p) if scale else keep


def draw_window(noise: RecurrentNoise, like: torch.Tensor, steps: int) -> WindowDraws:
    """Turn a plan into the tensors of one window (``like``: ``(B, H)``, for shape, dtype, device)."""
    if not noise.training:  # no masks; zoneout uses its expectation
        return WindowDraws(noise.hidden_mask, noise.flip_hh, None, noise.zoneout_c or None, noise.zoneout_h or None)
    cell = _step_masks(noise.cell_p, like, steps, scale=True)
    # Zoneout masks are 1 (keep the previous value) with probability p, i.e. Bernoulli(1 - (1 - p)).
    zc = _step_masks(1 - noise.zoneout_c, like, steps, scale=False) if noise.zoneout_c else None
    zh = _step_masks(1 - noise.zoneout_h, like, steps, scale=False) if noise.zoneout_h else None
    return WindowDraws(noise.hidden_mask, noise.flip_hh, cell, zc, zh)


def _flip_parts(flip: Flip | None):
    if flip is None:
        return None, None, None
    return flip.delta, flip.sign_in, flip.sign_out


def reference_loop(xproj: torch.Tensor, state: State, weight_hh: torch.Tensor,
                   draws: WindowDraws) -> tuple[torch.Tensor, State]:
    """The recurrence written step by step and differentiated by autograd (the specification).

    Args:
        xproj: ``(T, B, 4H)`` input projection ``W_ih x_t + b_ih + b_hh`` (plus its flipout term).
        state: ``(h, c)`` each ``(B, H)``.
        weight_hh: ``(4H, H)``.
        draws: the window's noise.
    Returns:
        outputs ``(T, B, H)`` and the final ``(h, c)``.
    """
    h, c = state
    w_hh_t = weight_hh.t()
    flip = draws.flip
    outputs = []
    for t, xt in enumerate(xproj.unbind(0)):
        hr = h if draws.hidden_mask is None else h * draws.hidden_mask
        gates = torch.addmm(xt, hr, w_hh_t)
        if flip is not None:
            s = flip.sign_in[t] if flip.per_step else flip.sign_in
            r = flip.sign_out[t] if flip.per_step else flip.sign_out
            gates = torch.addcmul(gates, (hr * s).mm(flip.delta.t()), r)
        i, f, g, o = gates.chunk(4, 1)
        g = torch.tanh(g)
        if draws.cell_mask is not None:
            g = g * draws.cell_mask[t]
        c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        # Zoneout keeps the previous value where the mask is 1: lerp(new, old, z); eval uses z = p.
        zc, zh = draws.zoneout_c, draws.zoneout_h
        if zc is not None:
            c_new = torch.lerp(c_new, c, zc[t] if isinstance(zc, torch.Tensor) else zc)
        if zh is not None:
            h_new = torch.lerp(h_new, h, zh[t] if isinstance(zh, torch.Tensor) else zh)
        h, c = h_new, c_new
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def _steps(x, steps: int) -> list:
    """Per-step views of a per-step tensor ``(T, ...)``; a per-window tensor, a float or None repeated."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return list(x.unbind(0))
    return [x] * steps


def _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh, save: bool):
    """The forward recurrence of one window.

    Returns ``hall`` ``(T+1, B, H)`` (``h0``, then every ``h_t``), ``c_T``, and, when ``save``,
    what backward needs (else None): ``fac`` ``(T, B, 4H)``, the derivative factors of the four
    gate pre-activations, which backward turns into ``dgates`` in place::

        [σ'(i) g̃,  σ'(f) c_{t-1},  σ(i) tanh'(g) d_t,  σ'(o) tanh(c̃) (1 - z^h)]   (g̃ = tanh(g) d_t)

    ``aux`` ``(T, B, 2H)`` = ``[σ(o) tanh'(c̃) (1 - z^h),  σ(f)]``, ``hr`` ``(T, B, H)`` the masked
    ``h_{t-1}`` (when there is a hidden mask) and ``hrs`` = ``hr ∘ s`` (flipout), else None.
    """
    steps, batch, h4 = xproj.shape
    hid = h4 // 4
    new = lambda *shape: xproj.new_empty(*shape)  # noqa: E731
    hall = new(steps + 1, batch, hid)
    hall[0] = h0
    hs, xs = hall.unbind(0), xproj.unbind(0)
    fac = aux = hr_all = hrs_all = None
    if save:
        fac, aux = new(steps, batch, h4), new(steps, batch, 2 * hid)
        fis, ffs, fgs, fos = (list(v.unbind(0)) for v in fac.view(steps, batch, 4, hid).unbind(2))
        bcs, fts = (list(v.unbind(0)) for v in aux.view(steps, batch, 2, hid).unbind(2))
        if mask is not None:
            hr_all = new(steps, batch, hid)
        if delta is not None:
            hrs_all = new(steps, batch, hid)
    hr_bufs = hr_all.unbind(0) if hr_all is not None else [new(batch, hid)] * steps if mask is not None else None
    hrs_bufs = hrs_all.unbind(0) if hrs_all is not None else [new(batch, hid)] * steps if delta is not None else None
    s_t, r_t, cell_t = _steps(s, steps), _steps(r, steps), _steps(cell, steps)
    zc_t, zh_t = _steps(zc, steps), _steps(zh, steps)
    w_t = w.t()
    delta_t = delta.t() if delta is not None else None
    g_buf = new(batch, h4)
    gi, gf, gg, go = g_buf.view(batch, 4, hid).unbind(1)
    fl_buf = new(batch, h4) if delta is not None else None
    u, v, tc, gp_buf, w_buf = (new(batch, hid) for _ in range(5))
    c_bufs = (new(batch, hid), new(batch, hid))
    cn_buf = new(batch, hid) if zc is not None else None
    hn_buf = new(batch, hid) if zh is not None else None
    c = c0
    for t in range(steps):
        h = hs[t]
        hr = h if mask is None else torch.mul(h, mask, out=hr_bufs[t])
        g = torch.addmm(xs[t], hr, w_t, out=g_buf)
        if delta is not None:
            torch.mm(torch.mul(hr, s_t[t], out=hrs_bufs[t]), delta_t, out=fl_buf)
            g.addcmul_(fl_buf, r_t[t])
        g[:, :2 * hid].sigmoid_()
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
    return hall, c, fac, aux, hr_all, hrs_all


class _LSTMWindow(torch.autograd.Function):
    """The recurrence of one window with a hand-written backward (see the module docstring).

    Backward overwrites its saved factors with the gate gradients (saving a fresh ``(T, B, 4H)``
    buffer), so a second backward through the same graph (``retain_graph=True``) is refused with
    an error. Flipout signs must be exactly ±1 (as :meth:`Flip.sample` draws them): ``dΔ`` flips
    the signs of the gate gradients in place and back.
    """

    @staticmethod
    def forward(ctx, xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh):
        hall, c, fac, aux, hr_all, hrs_all = _window_forward(xproj, h0, c0, w, delta, s, r, mask, cell, zc, zh,
                                                             save=True)
        zc_t, zh_t = (z if isinstance(z, torch.Tensor) else None for z in (zc, zh))
        ctx.save_for_backward(hall, fac, aux, hr_all, hrs_all, w, delta, s, r, mask, zc_t, zh_t)
        ctx.zone = (zc, zh) if zc_t is None or zh_t is None else None  # floats (eval expectation) or None
        return hall, c

    @staticmethod
    def backward(ctx, d_hall, d_c):
        try:
            hall, fac, aux, hr_all, hrs_all, w, delta, s, r, mask, zc, zh = ctx.saved_tensors
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
            raise RuntimeError("the LSTM window kernel supports one backward pass per forward (its backward "
                               "reuses the saved buffers): run the forward again instead of retain_graph=True"
                               ) from e
        if ctx.zone is not None:
            zc = zc if zc is not None else ctx.zone[0]
            zh = zh if zh is not None else ctx.zone[1]
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
        new = lambda: fac.new_empty(batch, hid)  # noqa: E731
        dcn, dr_buf = new(), new()
        if delta is not None:
            dfl_buf, dfl_h = fac.new_empty(batch, h4), new()
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
            dh_prev = dh_bufs[t % 2]
            if mask is None and delta is None:
                torch.addmm(d_hs[t], dgt, w, out=dh_prev)
            else:
                dhr = torch.mm(dgt, w, out=dr_buf)
                if delta is not None:
                    torch.mm(torch.mul(dgt, r_t[t], out=dfl_buf), delta, out=dfl_h)
                    dhr.addcmul_(dfl_h, s_t[t])
                if mask is None:
                    torch.add(d_hs[t], dhr, out=dh_prev)
                else:
                    torch.addcmul(d_hs[t], dhr, mask, out=dh_prev)
            if zh is not None:
                dh_prev.addcmul_(dh, zh_t[t]) if isinstance(zh, torch.Tensor) else dh_prev.add_(dh, alpha=zh)
            dh, dc = dh_prev, dc_prev

        need = ctx.needs_input_grad
        d_gates = fac.view(-1, h4)
        hr = hall[:-1] if hr_all is None else hr_all
        d_w = d_gates.t().mm(hr.reshape(-1, hid)) if need[3] else None
        d_delta = None
        if delta is not None and need[4]:
            # dΔ = Σ_t (dgates ∘ r)ᵀ (h̃ ∘ s): flip the signs of dgates in place and back (r ∘ r = 1 exactly)
            fac.mul_(r)
            d_delta = d_gates.t().mm(hrs_all.view(-1, hid))
            fac.mul_(r)
        return (fac, dh if need[1] else None, dc if need[2] else None, d_w, d_delta,
                None, None, None, None, None, None)


def lstm_window(xproj: torch.Tensor, state: State, weight_hh: torch.Tensor,
                draws: WindowDraws) -> tuple[torch.Tensor, State]:
    """The fast recurrence of one window; same arguments and results as :func:`reference_loop`."""
    delta, s, r = _flip_parts(draws.flip)
    args = (xproj, state[0], state[1], weight_hh, delta, s, r, draws.hidden_mask, draws.cell_mask,
            draws.zoneout_c, draws.zoneout_h)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        hall, c = _LSTMWindow.apply(*args)
    else:
        hall, c = _window_forward(*args, save=False)[:2]
    return hall[1:], (hall[-1], c)


class LSTMLayer(nn.Module):
    """One LSTM layer whose weights live in an ``nn.LSTM`` (names ``weight_ih_l0`` etc.).

    Args:
        input_size: features of ``x_t``.
        hidden_size: ``H``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers=1)

    @property
    def weight_ih(self) -> torch.Tensor:
        return self.rnn.weight_ih_l0

    @property
    def weight_hh(self) -> torch.Tensor:
        return self.rnn.weight_hh_l0

    def forward(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        """Run one window. ``x``: ``(T, B, in)``; ``state``: ``(h, c)`` each ``(B, H)``."""
        if noise.fused:
            return self._fused(x, state, noise)
        return self._loop(x, state, noise)

    def _fused(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        h0, c0 = state[0].unsqueeze(0), state[1].unsqueeze(0)
        if noise.weight_ih is self.weight_ih and noise.weight_hh is self.weight_hh:
            out, (h, c) = self.rnn(x, (h0, c0))
        else:
            weights = {"weight_ih_l0": noise.weight_ih, "weight_hh_l0": noise.weight_hh}
            out, (h, c) = functional_call(self.rnn, weights, (x, (h0, c0)))
        return out, (h.squeeze(0), c.squeeze(0))

    def _loop(self, x: torch.Tensor, state: State, noise: RecurrentNoise) -> tuple[torch.Tensor, State]:
        bias = self.rnn.bias_ih_l0 + self.rnn.bias_hh_l0
        # One matmul for the whole window's input projection (flipout signs broadcast over T).
        xproj = flipout_linear(x, noise.weight_ih, noise.flip_ih, bias)
        draws = draw_window(noise, state[0], x.size(0))
        return lstm_window(xproj, state, noise.weight_hh, draws)
