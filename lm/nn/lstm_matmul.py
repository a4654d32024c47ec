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
"""

from __future__ import annotations

import functools

import torch

PACKED: bool | None = None
"""Use the ``packed`` backend on CPU: None (default) when oneDNN's linear ops work, False never."""

GEMM_PARTS: int | None = None
"""Independent blocks the ``bmm`` backend splits a plain product into (1, 2 or 4); None: 2 on CPU, 1 elsewhere."""


@functools.cache
def onednn_linear_available() -> bool:
    """Whether oneDNN's prepacked linear ops exist and agree with ``mm`` here (probed once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(12, 8, generator=g), torch.randn(3, 8, generator=g)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None,
                                               "none", [], "")
        return bool(torch.allclose(y, x @ w.t(), rtol=1e-4, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing or unsupported on this build
        return False


def use_packed(w: torch.Tensor) -> bool:
    """The ``packed`` backend for this weight? (CPU, float32, oneDNN working and not switched off,
    here or by ``torch.backends.mkldnn.enabled = False``)."""
    return (PACKED is not False and w.device.type == "cpu" and w.dtype == torch.float32
            and torch.backends.mkldnn.enabled and onednn_linear_available())


def gemm_parts(w: torch.Tensor) -> int:
    """Blocks of a plain ``bmm`` product: 2 on CPU (one whole small GEMM per thread; on 2 busy
    cores that halved their time), 1 elsewhere, or :data:`GEMM_PARTS` when set."""
    if GEMM_PARTS is not None:
        return GEMM_PARTS
    return 2 if w.device.type == "cpu" else 1


class _Packed:
    """``x ↦ x Aᵀ`` for a matrix ``A`` fixed over the window, reordered once for ``rows``-row operands."""

    def __init__(self, a: torch.Tensor, rows: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(a.contiguous(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class GateMatmul:
    """Per step, the gate pre-activations ``x̂_t + h̃ W_hhᵀ + ((h̃ ∘ s) ΔŴᵀ) ∘ r`` in a reused buffer.

    ``delta`` is ``ΔŴ`` with flipout, else None. :attr:`gates` are the four ``(B, H)`` gate views
    [i, f, g, o] of the buffer, :attr:`if_block` i and f as one view (the ``bmm`` backend without
    flipout lays the buffer out as ``parts`` column blocks).
    """

    def __init__(self, w: torch.Tensor, delta: torch.Tensor | None, batch: int) -> None:
        h4, hid = w.shape
        self.flip, self.packed = delta is not None, use_packed(w)
        self.parts = 1 if self.packed or self.flip else gemm_parts(w)
        self.stacked: torch.Tensor | None = None
        if self.packed:
            self.lin = [_Packed(m, batch) for m in ((w,) if delta is None else (w, delta))]
        elif self.flip:
            self.stacked = torch.stack((w, delta))  # [W_hh, ΔŴ], reused by HiddenGrad
            self.weights = self.stacked.transpose(1, 2)  # (2, H, 4H)
            self.prod = w.new_empty(2, batch, h4)
        elif self.parts > 1:
            self.weights = w.view(self.parts, h4 // self.parts, hid).transpose(1, 2)  # (P, H, 4H/P)
        else:
            self.w_t = w.t()
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
        if self.packed:
            torch.add(xt, self.lin[0](left[0] if self.flip else left), out=self.buf)
            if self.flip:
                self.buf.addcmul_(self.lin[1](left[1]), r)
        elif self.flip:
            torch.bmm(left, self.weights, out=self.prod)
            torch.add(xt, self.prod[0], out=self.buf).addcmul_(self.prod[1], r)
        elif self.parts > 1:
            torch.bmm(left.expand(self.parts, *left.shape), self.weights, out=self.buf)
            self.buf.add_(xt.view(left.size(0), self.parts, -1).transpose(0, 1))
        else:
            torch.addmm(xt, left, self.w_t, out=self.buf)


class HiddenGrad:
    """Per step, ``dh_{t-1} = base + m ∘ (dgates W_hh + ((dgates ∘ r) ΔŴ) ∘ s)`` into ``out``:
    ``base`` is the gradient reaching ``h_{t-1}`` from outside the recurrence, ``m`` the hidden
    mask (``mask``, or 1), ``delta`` as in :class:`GateMatmul`, ``stacked`` the forward's
    :attr:`GateMatmul.stacked` when it made one (else it is stacked here)."""

    def __init__(self, w: torch.Tensor, delta: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                 stacked: torch.Tensor | None = None) -> None:
        h4, hid = w.shape
        self.flip, self.packed, self.mask = delta is not None, use_packed(w), mask
        self.parts = 1 if self.packed or self.flip else gemm_parts(w)
        self.w, self.tmp = w, w.new_empty(batch, hid)
        if self.packed:  # x ↦ x W is a linear map by Wᵀ: reorder the transposes
            self.lin = [_Packed(m.t(), batch) for m in ((w,) if delta is None else (w, delta))]
            self.signed = w.new_empty(batch, h4) if self.flip else None
        elif self.flip:
            self.stacked = stacked if stacked is not None else torch.stack((w, delta))
            self.left, self.prod = w.new_empty(2, batch, h4), w.new_empty(2, batch, hid)
        elif self.parts > 1:
            self.blocks = w.view(self.parts, h4 // self.parts, hid)
            self.prod = w.new_empty(self.parts, batch, hid)

    def __call__(self, base: torch.Tensor, dgt: torch.Tensor, r: torch.Tensor | None, s: torch.Tensor | None,
                 out: torch.Tensor) -> torch.Tensor:
        if self.mask is None and not (self.packed or self.flip) and self.parts == 1:
            return torch.addmm(base, dgt, self.w, out=out)
        prod = self._product(dgt, r, s)
        return torch.add(base, prod, out=out) if self.mask is None else torch.addcmul(base, prod, self.mask, out=out)

    def _product(self, dgt: torch.Tensor, r: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        if self.packed:
            prod = self.lin[0](dgt)
            if self.flip:
                prod.addcmul_(self.lin[1](torch.mul(dgt, r, out=self.signed)), s)
            return prod
        if self.flip:
            self.left[0].copy_(dgt)
            torch.mul(dgt, r, out=self.left[1])
            torch.bmm(self.left, self.stacked, out=self.prod)
            return torch.addcmul(self.prod[0], self.prod[1], s, out=self.tmp)
        if self.parts > 1:
            torch.bmm(dgt.view(dgt.size(0), self.parts, -1).transpose(0, 1), self.blocks, out=self.prod)
            return torch.sum(self.prod, 0, out=self.tmp)
        return torch.mm(dgt, self.w, out=self.tmp)
