"""The Philox draws of the training noise (lm.nn.fastrand, lm/nn/csrc/philox.c).

Statistical checks use a fixed seed and tolerances from the sample size: a mean is within
5 standard errors, a Kolmogorov-Smirnov distance within 1.95/√n (its 0.1% critical value), so a
correct generator fails none of them with any practical probability and a wrong transform
(a shifted, scaled or lumpy distribution) fails by many standard errors.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from lm.nn import fastrand

needs_lib = pytest.mark.skipif(fastrand.library() is None, reason="Philox library not built (no compiler?)")
N = 1 << 20
KS = 1.95 / math.sqrt(N)


def _ks(sample: torch.Tensor, cdf) -> float:
    x, _ = sample.double().sort()
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((upper - f).max().item(), (f - (upper - 1 / n)).max().item())


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


@needs_lib
@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    """Random123's known-answer vectors for Philox4x32-10 (kat_vectors)."""
    out = (ctypes.c_uint32 * 4)()
    fastrand.library().philox_kat((ctypes.c_uint32 * 4)(*ctr), (ctypes.c_uint32 * 2)(*key), out)
    assert tuple(out) == expected


@needs_lib
@pytest.mark.parametrize("n", [4 * 256 + 2, 70_001])
def test_element_order_is_word_j_of_block_b(n):
    """Element ``4b + j`` of a draw is word ``j`` of Philox block ``b`` (counter ``(b, 0, 0)``, the
    seed as key): in whole units of work, across the threads' split (``n`` ≥ 65536) and in the last
    unit cut short at ``n``. A wrong interleave would pass every distribution test."""
    lib, seed = fastrand.library(), 0x1234_5678_9ABC_DEF
    out = torch.empty(n)
    lib.philox_uniform(out.data_ptr(), n, seed, 2)
    blocks = (n + 3) // 4
    for b in sorted({0, 1, 255, 256, 257, blocks // 2, blocks - 2, blocks - 1}):
        words = (ctypes.c_uint32 * 4)()
        lib.philox_kat((ctypes.c_uint32 * 4)(b & 0xFFFFFFFF, b >> 32, 0, 0),
                       (ctypes.c_uint32 * 2)(seed & 0xFFFFFFFF, seed >> 32), words)
        for j in range(4):
            if 4 * b + j < n:
                assert out[4 * b + j].item() == (words[j] >> 8) * 2.0 ** -24, (b, j)


@needs_lib
def test_uniform_distribution():
    torch.manual_seed(0)
    u = fastrand.uniform((N,), torch.empty(0))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # multiples of 2^-24, as torch.rand
    assert abs(u.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert _ks(u, lambda x: x) < KS
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]).double())[0, 1].item()
    assert abs(lag) < 5 / math.sqrt(N)  # neighbours (words of one block, and across blocks) uncorrelated


@needs_lib
def test_normal_distribution():
    torch.manual_seed(1)
    z = fastrand.normal((N,), torch.empty(0)).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(N)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / N)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / N)  # kurtosis; var of z^4 is 105 - 9
    assert _ks(z, _normal_cdf) < KS
    assert z.abs().max() <= 6.67
    pairs = z.view(-1, 2)  # Box-Muller's two outputs of one pair of uniforms are independent
    assert abs(torch.corrcoef(pairs.t())[0, 1].item()) < 5 / math.sqrt(N / 2)


@needs_lib
@pytest.mark.parametrize("p", [0.05, 0.5, 0.75])
def test_two_valued_rate(p):
    torch.manual_seed(2)
    m = fastrand.two_valued((N,), torch.empty(0), p, -1.0, 3.0)
    assert set(m.unique().tolist()) == {-1.0, 3.0}
    rate = (m == -1).double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / N)


@needs_lib
def test_draws_follow_the_generator_and_not_the_threads():
    """Same generator state, same draw (whatever the thread count); one draw advances the
    generator by exactly one number; another seed or the next draw differs."""
    like, shape = torch.empty(0), (3, 70_001)  # odd length: the last Philox block is cut
    g = torch.Generator().manual_seed(5)
    a = fastrand.normal(shape, like, g)
    after = g.get_state()
    before_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = fastrand.normal(shape, like, torch.Generator().manual_seed(5))
    finally:
        torch.set_num_threads(before_threads)
    assert torch.equal(a, b)
    g2 = torch.Generator().manual_seed(5)
    torch.randint(0, 2**63 - 1, (), generator=g2)
    assert torch.equal(after, g2.get_state())
    assert not torch.equal(a, fastrand.normal(shape, like, g))
    assert not torch.equal(a, fastrand.normal(shape, like, torch.Generator().manual_seed(6)))
    torch.manual_seed(3)
    c = fastrand.uniform(shape, like)
    torch.manual_seed(3)
    assert torch.equal(c, fastrand.uniform(shape, like))  # None: the default generator


def test_fallback_draws_with_torch(monkeypatch):
    """FAST = False (as on CUDA, for other dtypes, or without a compiler): torch's own draws."""
    monkeypatch.setattr(fastrand, "FAST", False)
    like = torch.empty(0)
    for draw, ref in ((lambda g: fastrand.uniform((5, 7), like, g), lambda g: torch.rand(5, 7, generator=g)),
                      (lambda g: fastrand.normal((5, 7), like, g), lambda g: torch.randn(5, 7, generator=g))):
        assert torch.equal(draw(torch.Generator().manual_seed(4)), ref(torch.Generator().manual_seed(4)))
    m = fastrand.two_valued((N,), like, 0.25, 2.0, 0.0, torch.Generator().manual_seed(4))
    assert abs((m == 2).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)
    d = fastrand.uniform((2, 3), like.double(), None)  # float64 always takes torch
    assert d.dtype == torch.float64


@needs_lib
def test_two_valued_for_low_precision_activations():
    """Under autocast, dropout masks for bf16 activations come from Philox too, cast to bf16."""
    g = torch.Generator().manual_seed(7)
    m = fastrand.two_valued((N,), torch.empty(0, dtype=torch.bfloat16), 0.25, 0.0, 1 / 0.75, g)
    assert m.dtype == torch.bfloat16
    assert set(m.float().unique().tolist()) == {0.0, float(torch.tensor(1 / 0.75).bfloat16())}
    assert abs((m == 0).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)
    g2 = torch.Generator().manual_seed(7)
    assert torch.equal(m, fastrand.two_valued((N,), torch.empty(0), 0.25, 0.0, 1 / 0.75, g2).bfloat16())
