"""Window-long buffers kept from one BPTT window for the next (:mod:`lm.nn.lstm_fused`).

A fresh buffer of tens of MB is mapped page by page on its first touch: at the char size
(``(T, B, 4H)`` = 100 x 32 x 4000 float32, 51 MB) filling a fresh buffer took 28 ms on the
development machine and a reused one 8.5 ms, and the window's new buffers cost about as much as
its fused element-wise work. So the window kernel takes its buffers that never leave it from
:data:`POOL` (the cell states, the saved factors ``fac`` and ``aux``, the left operands, the input
projection, the bf16 and the signed gate gradients) and hands each back once its window is done
with it; ``hall``, the layer's output, and any buffer that leaves as a gradient stay fresh.

A graph that is dropped without a backward just frees its buffers. A second backward through a
retained graph is refused before it could read a reused buffer (the forward's ``fac`` changes
version, see :func:`lm.nn.lstm_fused.window_backward`). At most ``per_key`` buffers per shape
and dtype are kept (the layers of one model); :func:`clear_pool` empties it (memory benchmarks
call it first).
"""

from __future__ import annotations

import torch


class Pool:
    """Free buffers by ``(shape, dtype, device)``."""

    def __init__(self, per_key: int = 4) -> None:
        self.per_key, self.free = per_key, {}

    def take(self, like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A kept buffer of ``shape`` (``like``'s device, ``dtype`` or ``like``'s), else a new one;
        its contents are whatever its last user left."""
        dtype = dtype or like.dtype
        got = self.free.get((shape, dtype, like.device))
        return got.pop() if got else like.new_empty(*shape, dtype=dtype)

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Keep ``tensors`` (None skipped) for a later :meth:`take`; the caller no longer reads them."""
        for t in tensors:
            if t is not None:
                kept = self.free.setdefault((tuple(t.shape), t.dtype, t.device), [])
                if len(kept) < self.per_key:
                    kept.append(t)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self.free.values() for t in kept)


POOL = Pool()


def clear_pool() -> None:
    POOL.free.clear()
