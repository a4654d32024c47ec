"""The per-step matmuls of the window kernel (:mod:`lm.nn.lstm_kernel`) and the choice of backend.

Every step of a window multiplies a ``B``-row operand by the same weights: forward
``h̃ W_hhᵀ`` (+ ``((h̃ ∘ s) ΔŴᵀ) ∘ r`` with flipout), backward ``dgates W_hh``
(+ ``((dgates ∘ r) ΔŴ) ∘ s``). The weights are fixed for the whole window, so two backends:

* ``packed`` (CPU, float32, oneDNN present): each weight is reordered once per window into
  oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the op inductor uses
  for frozen linear layers) and every step runs ``_linear_pointwise`` on it. Per 4000x1000
  matrix the reorder costs about 2 ms for the forward layout and about 20 ms for the backward
  one, which needs the transpose. It saves the small GEMM from packing the weights on every
  call. Measured with paired, interleaved A/B runs (docs/performance_throughput.md): the flipout
  pair of products is 17-22% faster than the ``bmm``, a plain product about 9% faster.
* ``bmm`` (elsewhere: CUDA, float64, no oneDNN, or ``PACKED = False``): flipout's two products
  ride in one ``torch.bmm`` of ``[W_hh, ΔŴ]``; without flipout, on CPU, the product is split
  into ``GEMM_PARTS`` column (forward) or row (backward) blocks of one ``bmm``, so that each
  thread computes a whole small GEMM.

Both give the same numbers up to float rounding (tests/test_lstm_kernel.py runs every noise
combination through both against the reference loop).

Mixed precision (``dtype`` bfloat16 or float16, :mod:`lm.nn.precision`): the weights are cast
once per window, each step's left operand is cast on the way in, and the product is added into
the float32 gate buffer (forward) or gradient (backward): the matmul accumulates in float32
inside oneDNN / cuBLAS; on CUDA the product is also handed back in float32 (``out_dtype``), on
CPU (no ``out_dtype`` kernel in torch 2.13) it is rounded once to the low dtype before the
float32 add. ``packed`` is used for a low dtype where oneDNN supports it (probed per dtype);
the block split of plain products (``GEMM_PARTS``) is a float32 CPU tuning and is off there.
"""

from __future__ import annotations

import functools

import torch

PACKED: bool | None = None
"""Use the ``packed`` backend on CPU: None (default) when oneDNN's linear ops work, False never."""

GEMM_PARTS: int | None = None
"""Independent blocks the ``bmm`` backend splits a plain product into (1, 2 or 4); None: 2 on CPU, 1 elsewhere."""


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked linear ops exist for ``dtype`` and agree with a float32 ``mm`` of
    the same (rounded) operands up to ``dtype``'s rounding of the result (probed once per dtype).

    The probe runs with autocast switched off: called first inside ``torch.autocast``, the
    reference product would otherwise run in bf16 and the answer (cached) would be wrong."""
    if dtype not in _UNIT_ROUNDOFF or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.autocast("cpu", enabled=False):
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(12, 8, generator=g).to(dtype), torch.randn(3, 8, generator=g).to(dtype)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None,
                                                   "none", [], "")
            ref = x.float() @ w.float().t()
            # the result is rounded once to dtype (relative u), float32 sums of 8 terms add ~8 u_32
            u = _UNIT_ROUNDOFF[dtype]
            scale = (x.float().abs() @ w.float().abs().t()).max()
            atol = float(16 * _UNIT_ROUNDOFF[torch.float32] * scale)
            return bool(y.dtype == dtype and torch.allclose(y.float(), ref, rtol=2 * u, atol=atol))
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing or unsupported on this build
        return False


def use_packed(w: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """The ``packed`` backend for this weight, multiplied in ``dtype`` (default: its own)? (CPU,
    float32 weights, oneDNN working for ``dtype`` and not switched off, here or by
    ``torch.backends.mkldnn.enabled = False``)."""
    dtype = dtype or w.dtype
    return (PACKED is not False and w.device.type == "cpu" and w.dtype == torch.float32
            and torch.backends.mkldnn.enabled and onednn_linear_available(dtype))


@functools.cache
def _cuda_out_dtype() -> bool:
    """Whether CUDA matmuls of low-precision operands can hand back float32 (``out_dtype``)."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        return (torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
                and torch.bmm(a[None], a[None], out_dtype=torch.float32).dtype == torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def low_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``a @ b`` (``bmm`` for 3-d operands) with both operands in ``dtype`` (None: as they are),
    float32 accumulation; the result is float32 where the device offers it, else ``dtype``."""
    op = torch.bmm if a.dim() == 3 else torch.mm
    if dtype is None:
        return op(a, b)
    a, b = a.to(dtype), b.to(dtype)
    if a.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _cuda_out_dtype():
        return op(a, b, out_dtype=torch.float32)
    return op(a, b)


def gemm_parts(w: torch.Tensor) -> int:
    """Blocks of a plain ``bmm`` product: 2 on CPU (one whole small GEMM per thread; on 2 busy
    cores that halved their time), 1 elsewhere, or :data:`GEMM_PARTS` when set."""
    if GEMM_PARTS is not None:
        return GEMM_PARTS
    return 2 if w.device.type == "cpu" else 1


class Packed:
    """``x ↦ x Aᵀ`` for a matrix ``A`` fixed over the window, reordered once for ``rows``-row operands."""

    def __init__(self, a: torch.Tensor, rows: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(a.contiguous(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class GateMatmul:
    """Per step, the gate pre-activations ``x̂_t + h̃ W_hhᵀ + ((h̃ ∘ s) ΔŴᵀ) ∘ r`` in a reused buffer.

    ``delta`` is ``ΔŴ`` with flipout, else None; ``dtype`` the dtype of the products (None: the
    weights' own; bfloat16/float16 under mixed precision, the buffer stays in the weights' dtype).
    :attr:`gates` are the four ``(B, H)`` gate views [i, f, g, o] of the buffer, :attr:`if_block`
    i and f as one view (the ``bmm`` backend without flipout lays the buffer out as ``parts``
    column blocks).
    """

    def __init__(self, w: torch.Tensor, delta: torch.Tensor | None, batch: int,
                 dtype: torch.dtype | None = None) -> None:
        h4, hid = w.shape
        self.low = dtype if dtype is not None and dtype != w.dtype else None
        self.flip, self.packed = delta is not None, use_packed(w, dtype)
        self.parts = 1 if self.packed or self.flip or self.low else gemm_parts(w)
        self.stacked: torch.Tensor | None = None
        cast = (lambda m: m) if self.low is None else (lambda m: m.to(self.low))  # noqa: E731
        if self.packed:
            self.lin = [Packed(cast(m), batch) for m in ((w,) if delta is None else (w, delta))]
        elif self.flip:
            self.stacked = cast(torch.stack((w, delta)))  # [W_hh, ΔŴ], reused by HiddenGrad
            self.weights = self.stacked.transpose(1, 2)  # (2, H, 4H)
            self.prod = w.new_empty(2, batch, h4)
        elif self.parts > 1:
            self.weights = w.view(self.parts, h4 // self.parts, hid).transpose(1, 2)  # (P, H, 4H/P)
        else:
            self.w_t = cast(w).t()
        if self.parts > 1:
            self.buf = w.new_empty(self.parts, batch, h4 // self.parts)
            v = self.buf.view(self.parts, batch, 4 // self.parts, hid)
            per = 4 // self.parts
            self.gates = tuple(v[j // per, :, j % per] for j in range(4))
            self.if_block = v[0] if self.parts == 2 else v[:2, :, 0]
        else:
            self.buf = w.new_empty(batch, h4)
            v = self.buf.view(batch, 4, hid)
            self.gates, self.if_block = v.unbind(1), v[:, :2]

    def __call__(self, xt: torch.Tensor, left: torch.Tensor, r: torch.Tensor | None) -> None:
        """``left``: ``h̃`` ``(B, H)``, or ``[h̃, h̃ ∘ s]`` ``(2, B, H)`` with flipout."""
        if self.low is not None:
            left = left.to(self.low)
        if self.packed:
            torch.add(xt, self.lin[0](left[0] if self.flip else left), out=self.buf)
            if self.flip:
                self.buf.addcmul_(self.lin[1](left[1]), r)
        elif self.flip:
            prod = low_mm(left, self.weights, self.low) if self.low else torch.bmm(left, self.weights, out=self.prod)
            torch.add(xt, prod[0], out=self.buf).addcmul_(prod[1], r)
        elif self.parts > 1:
            torch.bmm(left.expand(self.parts, *left.shape), self.weights, out=self.buf)
            self.buf.add_(xt.view(left.size(0), self.parts, -1).transpose(0, 1))
        elif self.low is not None:
            torch.add(xt, low_mm(left, self.w_t, self.low), out=self.buf)
        else:
            torch.addmm(xt, left, self.w_t, out=self.buf)


class HiddenGrad:
    """Per step, ``dh_{t-1} = base + m ∘ (dgates W_hh + ((dgates ∘ r) ΔŴ) ∘ s)`` into ``out``:
    ``base`` is the gradient reaching ``h_{t-1}`` from outside the recurrence, ``m`` the hidden
    mask (``mask``, or 1), ``delta`` and ``dtype`` as in :class:`GateMatmul`, ``stacked`` the
    forward's :attr:`GateMatmul.stacked` when it made one (else it is stacked here)."""

    def __init__(self, w: torch.Tensor, delta: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                 stacked: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
        h4, hid = w.shape
        self.low = dtype if dtype is not None and dtype != w.dtype else None
        self.flip, self.packed, self.mask = delta is not None, use_packed(w, dtype), mask
        self.parts = 1 if self.packed or self.flip or self.low else gemm_parts(w)
        cast = (lambda m: m) if self.low is None else (lambda m: m.to(self.low))  # noqa: E731
        self.w, self.tmp = cast(w), w.new_empty(batch, hid)
        if self.packed:  # x ↦ x W is a linear map by Wᵀ: reorder the transposes
            self.lin = [Packed(cast(m).t(), batch) for m in ((w,) if delta is None else (w, delta))]
            self.signed = w.new_empty(batch, h4) if self.flip else None
        elif self.flip:
            self.stacked = stacked if stacked is not None else cast(torch.stack((w, delta)))
            self.left = w.new_empty(2, batch, h4, dtype=self.low or w.dtype)
            self.prod = w.new_empty(2, batch, hid)
        elif self.parts > 1:
            self.blocks = w.view(self.parts, h4 // self.parts, hid)
            self.prod = w.new_empty(self.parts, batch, hid)

    def __call__(self, base: torch.Tensor, dgt: torch.Tensor, r: torch.Tensor | None, s: torch.Tensor | None,
                 out: torch.Tensor) -> torch.Tensor:
        if self.mask is None and not (self.packed or self.flip or self.low) and self.parts == 1:
            return torch.addmm(base, dgt, self.w, out=out)
        prod = self._product(dgt, r, s)
        return torch.add(base, prod, out=out) if self.mask is None else torch.addcmul(base, prod, self.mask, out=out)

    def _product(self, dgt: torch.Tensor, r: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        low = self.low
        if self.packed:
            prod = self.lin[0](dgt if low is None else dgt.to(low))
            if self.flip:
                signed = torch.mul(dgt, r, out=self.signed)
                other = self.lin[1](signed if low is None else signed.to(low))
                if low is None:
                    prod.addcmul_(other, s)
                else:  # add in float32: the two products are rounded once each, not their sum
                    prod = torch.addcmul(prod, other, s, out=self.tmp)
            return prod
        if self.flip:
            self.left[0].copy_(dgt)
            torch.mul(dgt, r, out=self.left[1])
            prod = low_mm(self.left, self.stacked, low) if low else torch.bmm(self.left, self.stacked, out=self.prod)
            return torch.addcmul(prod[0], prod[1], s, out=self.tmp)
        if self.parts > 1:
            torch.bmm(dgt.view(dgt.size(0), self.parts, -1).transpose(0, 1), self.blocks, out=self.prod)
            return torch.sum(self.prod, 0, out=self.tmp)
        if low is not None:
            return low_mm(dgt, self.w, low)
        return torch.mm(dgt, self.w, out=self.tmp)
