"""The window buffer pool (lm/nn/pool.py): reuse across windows, bounded bytes under variable lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm.config import ModelConfig, RegularizerConfig
from lm.nn import lstm_fused, lstm_matmul
from lm.nn.model import LanguageModel, detach_state
from lm.nn.pool import Pool

B, H = 4, 8


def window(pool: Pool, like: torch.Tensor, steps: int, layers: int = 3) -> None:
    """The take/give pattern of one window of the fused step over ``layers`` layers: each forward
    takes the cell states (handed back at once) and keeps its saved factors until its backward,
    which takes gate-gradient buffers and hands everything back."""
    held = []
    for _ in range(layers):
        call = pool.take(like, steps + 1, B, H)
        held.append([pool.take(like, steps, B, 4 * H), pool.take(like, steps, B, 2 * H),
                     pool.take(like, 2, steps, B, H)])
        pool.give(call)
    for saved in reversed(held):
        signed = pool.take(like, steps, B, 4 * H)
        pool.give(*saved, signed)


def test_a_buffer_is_reused_across_windows_of_one_length():
    pool, like = Pool(), torch.empty(0)
    window(pool, like, 10)
    kept = {t.data_ptr() for ts in pool.free.values() for t in ts}
    window(pool, like, 10)
    assert {t.data_ptr() for ts in pool.free.values() for t in ts} == kept and pool.bytes() > 0


def test_bytes_stay_bounded_over_many_variable_length_windows():
    """200 windows of 31 lengths (AWD's variable BPTT draws about that many): the pool keeps at
    1.5x what a window of the longest length leaves in it (a shorter window may take a larger kept
    buffer than it needs, so the bytes out at once can exceed the longest window's), not one set of
    buffers per length (31 sets here)."""
    pool, like = Pool(), torch.empty(0)
    longest = Pool()
    window(longest, like, 40)
    one_window = longest.bytes()  # what a window of the longest length leaves in the pool
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 41, (200,), generator=g).tolist()
    assert len(set(lengths)) == 31
    for steps in lengths:
        window(pool, like, steps)
        assert pool.bytes() <= 1.5 * one_window


def test_views_of_foreign_tensors_and_double_gives_are_not_kept():
    pool, like = Pool(), torch.empty(0)
    big = torch.zeros(100)
    pool.give(big[:50])  # part of someone else's tensor: never lent out again
    assert pool.bytes() == 0
    t = pool.take(like, 5, 4)
    pool.give(t)
    pool.give(t)  # a second give must not hand the same memory to two users
    a, b = pool.take(like, 5, 4), pool.take(like, 5, 4)
    assert a.data_ptr() != b.data_ptr()


@pytest.mark.skipif(lstm_fused.library() is None or not lstm_matmul.onednn_linear_available(),
                    reason="fused step unavailable")
def test_training_windows_of_variable_length_keep_the_pool_bounded(one_thread):
    """A 3-layer wd_flipout model on the fused step, 60 windows of 20 lengths: the pool's bytes
    stay within 1.5x what one window of the longest length leaves."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(emb_size=16, hidden_size=32, num_layers=3, tie_weights=True),
                          RegularizerConfig(name="wd_flipout", weight_p=0.5), 50)
    state = model.init_state(B)

    def step(steps):
        nonlocal state
        x, y = torch.randint(0, 50, (steps, B)), torch.randint(0, 50, (steps, B))
        logits, state = model(x, state)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        state = detach_state(state)

    lstm_fused.clear_pool()
    step(30)
    bound = lstm_fused.POOL.bytes()
    g = torch.Generator().manual_seed(1)
    for steps in torch.randint(11, 31, (60,), generator=g).tolist():
        step(steps)
        assert lstm_fused.POOL.bytes() <= 1.5 * bound
    lstm_fused.clear_pool()


class _Traced(Pool):
    """A pool that records the most bytes it held (kept and lent) at any take."""

    most = 0

    def take(self, like, *shape, dtype=None):
        out = super().take(like, *shape, dtype=dtype)
        self.most = max(self.most, self.bytes() + self.lent_bytes())
        return out


def test_a_longer_window_does_not_add_its_buffers_on_top_of_the_shorter_ones():
    """The first window longer than all before frees the shorter windows' kept buffers before it
    allocates its own: its peak is within 10% of a window of its length on a fresh pool."""
    like = torch.empty(0)
    fresh = _Traced()
    window(fresh, like, 40)
    pool = _Traced()
    window(pool, like, 20)
    pool.most = 0
    window(pool, like, 40)
    assert pool.most <= 1.1 * fresh.most  # (a smaller first request may still take an old, larger buffer)
