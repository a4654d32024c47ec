"""Window-long buffers kept from one BPTT window for the next (:mod:`lm.nn.lstm_fused`).

A fresh buffer of tens of MB is mapped page by page on its first touch: at the char size
(``(T, B, 4H)`` = 100 x 32 x 4000 float32, 51 MB) filling a fresh buffer took 28 ms on the
development machine and a reused one 8.5 ms, and the window's new buffers cost about as much as
its fused element-wise work. So the window kernel takes its buffers that never leave it from
:data:`POOL` (the cell states, the saved factors ``fac`` and ``aux``, the left operands, the input
projection, the bf16 and the signed gate gradients) and hands each back once its window is done
with it; ``hall``, the layer's output, and any buffer that leaves as a gradient stay fresh.

**Bounded memory under variable window lengths.** A buffer is a flat allocation handed out as a
view of its first ``prod(shape)`` elements, so a buffer kept from a window of length 83 serves
every shorter window (best fit: the smallest kept buffer that is large enough). The bytes kept
never exceed :meth:`Pool.cap`: the most bytes the pool has had out at once (the buffers of the
longest window so far) plus its largest buffer (a window's buffers are not all out at the same
time: without that slack one of them would be dropped and allocated again every window); when a
longer window hands back larger buffers, the smallest kept ones go first. A request larger than
every buffer so far (the first of a longer window) first frees the kept buffers, so that the
longer window's new buffers do not come on top of the shorter windows' ones. So the pool holds
about one window's worth at its longest length, whatever the number of distinct lengths (AWD's
variable BPTT draws dozens), instead of one set per length.

A graph that is dropped without a backward just frees its buffers (the pool holds only weak
references to what it lent). A second backward through a retained graph is refused before it
could read a reused buffer (the forward's ``fac`` changes version, see
:func:`lm.nn.lstm_fused.window_backward`). :func:`clear_pool` empties it (memory benchmarks call
it first).
"""

from __future__ import annotations

import math
import weakref

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pool:
    """Free flat buffers by ``(dtype, device)``, lent out as views of the shape asked for."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self._lent: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.high = 0  # the most bytes out at once
        self.largest = 0  # the largest buffer lent

    def take(self, like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A kept buffer viewed as ``shape`` (``like``'s device, ``dtype`` or ``like``'s), else a new one;
        its contents are whatever its last user left."""
        dtype = dtype or like.dtype
        need = math.prod(shape)
        kept = self.free.get((dtype, like.device), [])
        fits = [i for i, t in enumerate(kept) if t.numel() >= need]
        if fits:
            root = kept.pop(min(fits, key=lambda i: kept[i].numel()))
        else:
            if need * dtype.itemsize > self.largest:  # larger than any buffer yet: a longer window has
                kept.clear()  # begun, and every kept buffer (all smaller) is from shorter ones: free them first
            root = like.new_empty(need, dtype=dtype)
        self._lent[id(root)] = root
        self.high = max(self.high, self.lent_bytes())
        self.largest = max(self.largest, _nbytes(root))
        return root.view(-1)[:need].view(shape)

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Keep ``tensors`` (None skipped) for a later :meth:`take`; the caller no longer reads them.
        A view is kept only if it is one this pool lent (never part of someone else's tensor)."""
        for t in tensors:
            if t is None:
                continue
            root = t._base if t._base is not None else t
            if t._base is not None and self._lent.get(id(root)) is not root:
                continue  # a view of a tensor the pool did not lend, or given back twice
            if not root.is_contiguous():
                continue
            self._lent.pop(id(root), None)
            kept = self.free.setdefault((root.dtype, root.device), [])
            if any(k is root for k in kept):
                continue
            kept.append(root)
        self._trim()

    def cap(self) -> int:
        """The most bytes kept: the most out at once plus the largest buffer."""
        return self.high + self.largest

    def _trim(self) -> None:
        """Drop the smallest kept buffers until the bytes kept are at most :meth:`cap`."""
        excess = self.bytes() - self.cap()
        while excess > 0:
            key, i = min(((k, i) for k, kept in self.free.items() for i in range(len(kept))),
                         key=lambda ki: _nbytes(self.free[ki[0]][ki[1]]))
            excess -= _nbytes(self.free[key].pop(i))

    def lent_bytes(self) -> int:
        return sum(_nbytes(t) for t in list(self._lent.values()))

    def bytes(self) -> int:
        """Bytes of the buffers kept (not those lent out)."""
        return sum(_nbytes(t) for kept in self.free.values() for t in kept)


POOL = Pool()


def clear_pool() -> None:
    POOL.free.clear()
    POOL.high = POOL.lent_bytes()
    POOL.largest = max((_nbytes(t) for t in list(POOL._lent.values())), default=0)
