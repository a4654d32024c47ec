"""The Triton kernels of the window kernel's element-wise step: one launch per forward step and
one per backward step (:mod:`lm.nn.lstm_triton` drives them; ``csrc/lstm_step.c`` is the CPU
counterpart, with the same maths and saved factors).

Each program owns a ``BB x BH`` block of ``(B, H)`` (rows of the batch, columns of the hidden
units) and, for gate-shaped operands ``(B, 4H)``, the same columns of all four gates (gate ``j``
at column ``j*H``). Every operand is contiguous: per-step tensors ``(T, B, X)`` at ``t*B*X``,
per-window ones ``(B, X)`` with a step stride of 0 (the ``*_T`` arguments). Element-wise state,
gates and saved factors are float32; the products ``P0``/``P1``, the input projection ``X`` and
the copies made for the products (left operands, ``DGL``, ``SG``) are whatever dtype their
tensors have (float32, bfloat16 or float16): loads convert to float32, stores to the pointee's
dtype. Optional operands come as a constexpr flag and a placeholder pointer.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through numpy (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

Z_NONE, Z_MASK, Z_SCALAR = 0, 1, 2  # zoneout: off, (T, B, H) keep-old masks, a probability (eval)


@triton.jit
def _tanh(x):
    # tl has no tanh on every backend (the interpreter included): (1 - e^{-2|x|}) / (1 + e^{-2|x|}),
    # signed; no overflow for any x, absolute error a few 1e-8 near 0
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def _sigmoid(x):
    # written out rather than tl.sigmoid: tl's library functions are jitted when triton is imported,
    # so with TRITON_INTERPRET=1 set later (a test) they would not be interpreted; exp(-x) = inf gives 0
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _lerp(a, b, w):
    # torch.lerp's two branches: exact at both ends, so a zoned-out unit (w = 1) keeps its value bit for bit
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _zone(Z, z_val, off, m, MODE: tl.constexpr):
    if MODE == 1:
        return tl.load(Z + off, mask=m, other=0.0)
    else:
        return z_val  # the expectation, or 0 when zoneout is off


@triton.jit
def forward_step(X, BIAS, P0, P1, R, R_T, HALL, CALL, CELL, ZC, ZH, zc_val, zh_val, FAC, AUX,
                 MASK, S, S_T, L0, L1, L_T, t, B, H,
                 HAS_BIAS: tl.constexpr, HAS_P1: tl.constexpr, HAS_CELL: tl.constexpr, ZC_MODE: tl.constexpr,
                 ZH_MODE: tl.constexpr, SAVE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_L0: tl.constexpr,
                 HAS_L1: tl.constexpr, MORE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step ``t``: gates ``X_t (+ BIAS) + P0 + P1 ∘ r``, the cell and hidden updates (cell mask,
    zoneout) into ``CALL[t+1]``, ``HALL[t+1]``, with ``SAVE`` the factors ``FAC[t]`` ``(B, 4H)``,
    ``AUX[t]`` ``(B, 2H)`` (lm.nn.lstm_kernel._window_forward), and with ``MORE`` step ``t+1``'s
    left operands ``L0 = h ∘ m`` and ``L1 = L0 ∘ s``."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)[:, None]
    cols = tl.program_id(1) * BH + tl.arange(0, BH)[None, :]
    m = (rows < B) & (cols < H)
    hb = rows * H + cols  # (B, H) offset
    gb = rows * (4 * H) + cols  # gate i's offset in (B, 4H)
    xo = t * B * 4 * H + gb
    a_i = tl.load(X + xo, mask=m, other=0.0).to(tl.float32)
    a_f = tl.load(X + xo + H, mask=m, other=0.0).to(tl.float32)
    a_g = tl.load(X + xo + 2 * H, mask=m, other=0.0).to(tl.float32)
    a_o = tl.load(X + xo + 3 * H, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a_i += tl.load(BIAS + cols, mask=cols < H, other=0.0)
        a_f += tl.load(BIAS + H + cols, mask=cols < H, other=0.0)
        a_g += tl.load(BIAS + 2 * H + cols, mask=cols < H, other=0.0)
        a_o += tl.load(BIAS + 3 * H + cols, mask=cols < H, other=0.0)
    a_i += tl.load(P0 + gb, mask=m, other=0.0).to(tl.float32)
    a_f += tl.load(P0 + gb + H, mask=m, other=0.0).to(tl.float32)
    a_g += tl.load(P0 + gb + 2 * H, mask=m, other=0.0).to(tl.float32)
    a_o += tl.load(P0 + gb + 3 * H, mask=m, other=0.0).to(tl.float32)
    if HAS_P1:
        ro = t * R_T + gb
        a_i += tl.load(P1 + gb, mask=m, other=0.0).to(tl.float32) * tl.load(R + ro, mask=m, other=0.0)
        a_f += tl.load(P1 + gb + H, mask=m, other=0.0).to(tl.float32) * tl.load(R + ro + H, mask=m, other=0.0)
        a_g += tl.load(P1 + gb + 2 * H, mask=m, other=0.0).to(tl.float32) * tl.load(R + ro + 2 * H, mask=m, other=0.0)
        a_o += tl.load(P1 + gb + 3 * H, mask=m, other=0.0).to(tl.float32) * tl.load(R + ro + 3 * H, mask=m, other=0.0)
    gi, gf, gg, go = _sigmoid(a_i), _sigmoid(a_f), _tanh(a_g), _sigmoid(a_o)
    so = t * B * H + hb
    c = tl.load(CALL + so, mask=m, other=0.0)
    h = tl.load(HALL + so, mask=m, other=0.0)
    d = 1.0
    if HAS_CELL:
        d = tl.load(CELL + so, mask=m, other=0.0)
    zc = _zone(ZC, zc_val, so, m, ZC_MODE)
    zh = _zone(ZH, zh_val, so, m, ZH_MODE)
    u = gi * gg * d
    v = gf * c
    cc = u + v
    tc = _tanh(cc)
    hh = go * tc
    hn = _lerp(hh, h, zh)
    tl.store(CALL + so + B * H, _lerp(cc, c, zc), mask=m)
    tl.store(HALL + so + B * H, hn, mask=m)
    if SAVE:
        keep = 1.0 - zh
        fo = t * B * 4 * H + gb
        tl.store(FAC + fo, u - u * gi, mask=m)  # σ'(i) g̃
        tl.store(FAC + fo + H, v - v * gf, mask=m)  # σ'(f) c_{t-1}
        tl.store(FAC + fo + 2 * H, (gi - gi * gg * gg) * d, mask=m)  # σ(i) tanh'(g) d
        tl.store(FAC + fo + 3 * H, (hh - hh * go) * keep, mask=m)  # σ'(o) tanh(c̃) (1 - z^h)
        ao = t * B * 2 * H + rows * (2 * H) + cols
        tl.store(AUX + ao, (go - hh * tc) * keep, mask=m)  # σ(o) tanh'(c̃) (1 - z^h)
        tl.store(AUX + ao + H, gf, mask=m)
    if MORE:
        lt = hn
        if HAS_MASK:
            lt = lt * tl.load(MASK + hb, mask=m, other=0.0)
        lo = (t + 1) * L_T + hb
        if HAS_L0:
            tl.store(L0 + lo, lt.to(L0.dtype.element_ty), mask=m)
        if HAS_L1:
            s = tl.load(S + (t + 1) * S_T + hb, mask=m, other=0.0)
            tl.store(L1 + lo, (lt * s).to(L1.dtype.element_ty), mask=m)


@triton.jit
def _gate_grad(FAC, off, by, m, DGL, SG, R, ro, SG_off, DB, dbo, j: tl.constexpr, KEEP: tl.constexpr,
               HAS_DGL: tl.constexpr, HAS_SG: tl.constexpr, HAS_DB: tl.constexpr, H):
    """Gate ``j``'s gradient ``fac ∘ by`` handed on: in place (``KEEP``), to the products' dtype
    (``DGL``), signed by ``r`` (``SG``), and added to the per-row bias sums ``DB`` ``(B, 4H)``."""
    dg = tl.load(FAC + off + j * H, mask=m, other=0.0) * by
    if KEEP:
        tl.store(FAC + off + j * H, dg, mask=m)
    if HAS_DGL:
        tl.store(DGL + off + j * H, dg.to(DGL.dtype.element_ty), mask=m)
    if HAS_SG:
        r = tl.load(R + ro + j * H, mask=m, other=0.0)
        tl.store(SG + SG_off + j * H, (dg * r).to(SG.dtype.element_ty), mask=m)
    if HAS_DB:  # one sum per element, owned by this program: no reduction, no atomics
        tl.store(DB + dbo + j * H, tl.load(DB + dbo + j * H, mask=m, other=0.0) + dg, mask=m)


@triton.jit
def backward_step(FAC, AUX, DOUT, DH, DC, P0, P1, MASK, S, S_T, ZC, ZH, zc_val, zh_val, R, R_T,
                  DGL, SG, SG_T, DB, t, B, H,
                  HIDDEN: tl.constexpr, GATES: tl.constexpr, HAS_P1: tl.constexpr, HAS_MASK: tl.constexpr,
                  ZC_MODE: tl.constexpr, ZH_MODE: tl.constexpr, KEEP: tl.constexpr, HAS_DGL: tl.constexpr,
                  HAS_SG: tl.constexpr, HAS_DB: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Backward step ``t`` in one launch.

    With ``HIDDEN``, first the hidden half of step ``t+1``: ``dh_t = dout_t + m ∘ (P0 + P1 ∘ s_{t+1})
    + dh_{t+1} ∘ z^h_{t+1}`` (``P0 = dgates_{t+1} W_hh``, ``P1 = (dgates_{t+1} ∘ r) ΔŴ``; no
    ``dout`` for ``t = -1``, whose ``dh`` is the initial state's), in place in ``DH`` ``(B, H)``.
    With ``GATES``, then step ``t``'s gate gradients from ``dh_t`` and ``dc_t`` (``DC``, turned into
    ``dc_{t-1}`` in place), handed on as :func:`_gate_grad` says; ``DB`` ``(B, 4H)`` sums the gate
    gradients over the steps per row (the caller sums its rows once per window): every program
    adds only into its own elements, so the sums need no atomics and are deterministic."""
    pb = tl.program_id(0)
    rows = pb * BB + tl.arange(0, BB)[:, None]
    cols = tl.program_id(1) * BH + tl.arange(0, BH)[None, :]
    m = (rows < B) & (cols < H)
    hb = rows * H + cols
    dh = tl.load(DH + hb, mask=m, other=0.0)
    if HIDDEN:
        p = tl.load(P0 + rows * H + cols, mask=m, other=0.0).to(tl.float32)
        nxt = (t + 1) * B * H + hb
        if HAS_P1:
            s = tl.load(S + (t + 1) * S_T + hb, mask=m, other=0.0)
            p += tl.load(P1 + rows * H + cols, mask=m, other=0.0).to(tl.float32) * s
        if HAS_MASK:
            p = p * tl.load(MASK + hb, mask=m, other=0.0)
        zh = _zone(ZH, zh_val, nxt, m, ZH_MODE)
        dh = p + dh * zh
        if GATES:
            dh += tl.load(DOUT + t * B * H + hb, mask=m, other=0.0)
        tl.store(DH + hb, dh, mask=m)
    if GATES:
        so = t * B * H + hb
        ao = t * B * 2 * H + rows * (2 * H) + cols
        bc = tl.load(AUX + ao, mask=m, other=0.0)
        ft = tl.load(AUX + ao + H, mask=m, other=0.0)
        dc = tl.load(DC + hb, mask=m, other=0.0)
        zc = _zone(ZC, zc_val, so, m, ZC_MODE)
        dcn = dh * bc + dc * (1.0 - zc)
        tl.store(DC + hb, dcn * ft + dc * zc, mask=m)
        off = t * B * 4 * H + rows * (4 * H) + cols
        ro = t * R_T + rows * (4 * H) + cols
        sgo = t * SG_T + rows * (4 * H) + cols
        dbo = rows * (4 * H) + cols
        _gate_grad(FAC, off, dcn, m, DGL, SG, R, ro, sgo, DB, dbo, 0, KEEP, HAS_DGL, HAS_SG, HAS_DB, H)
        _gate_grad(FAC, off, dcn, m, DGL, SG, R, ro, sgo, DB, dbo, 1, KEEP, HAS_DGL, HAS_SG, HAS_DB, H)
        _gate_grad(FAC, off, dcn, m, DGL, SG, R, ro, sgo, DB, dbo, 2, KEEP, HAS_DGL, HAS_SG, HAS_DB, H)
        _gate_grad(FAC, off, dh, m, DGL, SG, R, ro, sgo, DB, dbo, 3, KEEP, HAS_DGL, HAS_SG, HAS_DB, H)
