"""Flipout (Wen et al. 2018): the vectorised function, the two flipout regularizers, and the
estimator's statistics (unbiasedness, variance reduction; paper Sec. 3.1-3.2 and 4.1).

Statistical tests use fixed seeds; each tolerance is derived from its sample size in a comment
(``z`` values are standard-normal quantiles for the stated false-alarm rate).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.nn.flipout import Flip, flipout_linear, sample_signs
from lm.nn.lstm import LSTMLayer
from lm.regularizers import build_regularizer

FLIPOUT = ("wd_flipout", "gauss_flipout")
RATE = {"wd_flipout": dict(weight_p=0.5), "gauss_flipout": dict(sigma=0.7)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _reg(name: str, **options):
    return build_regularizer(RegularizerConfig(name=name, **options)).train()


def _explicit_weight(weight: torch.Tensor, flip: Flip | None, n: int, t: int) -> torch.Tensor:
    """Example ``n``'s weight at step ``t``, ``W + ΔŴ ∘ (r_n s_nᵀ)``, built here from the draw's fields."""
    if flip is None:
        return weight
    s = flip.sign_in[t, n] if flip.per_step else flip.sign_in[n]
    r = flip.sign_out[t, n] if flip.per_step else flip.sign_out[n]
    return weight + flip.delta * r[:, None] * s[None, :]


def reference_lstm(layer: LSTMLayer, x: torch.Tensor, state, weight_ih_of, weight_hh_of):
    """Plain per-example, per-step LSTM (PyTorch gate order i, f, g, o) with explicit weights
    ``weight_ih_of(n, t)`` ``(4H, in)`` and ``weight_hh_of(n, t)`` ``(4H, H)``."""
    bias = layer.rnn.bias_ih_l0 + layer.rnn.bias_hh_l0
    h, c = [list(s.unbind(0)) for s in state]
    outputs = []
    for t in range(x.size(0)):
        for n in range(x.size(1)):
            gates = weight_ih_of(n, t) @ x[t, n] + weight_hh_of(n, t) @ h[n] + bias
            i, f, g, o = gates.chunk(4)
            c[n] = torch.sigmoid(f) * c[n] + torch.sigmoid(i) * torch.tanh(g)
            h[n] = torch.sigmoid(o) * torch.tanh(c[n])
        outputs.append(torch.stack(h))
    return torch.stack(outputs), (torch.stack(h), torch.stack(c))


# -- the flipout function (Eq. 4) ----------------------------------------------------------

def test_sample_signs_are_fair_coins():
    torch.manual_seed(0)
    like = torch.empty(0, dtype=torch.float64)
    signs = sample_signs((200, 50), like)
    assert signs.dtype == torch.float64 and signs.shape == (200, 50)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    # n = 10,000 fair ±1 draws: the mean has sd 1/sqrt(n) = 0.01; 4 sd (false alarm 6e-5).
    assert abs(signs.mean().item()) < 4 / math.sqrt(signs.numel())
    gen = torch.Generator().manual_seed(3)
    again = torch.Generator().manual_seed(3)
    assert torch.equal(sample_signs((7, 5), like, gen), sample_signs((7, 5), like, again))


@pytest.mark.parametrize("per_step", [False, True], ids=["per_window_signs", "per_step_signs"])
def test_flipout_linear_equals_per_example_matmul(per_step):
    torch.manual_seed(1)
    steps, batch, d_in, d_out = 5, 6, 7, 3
    x = torch.randn(steps, batch, d_in, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64)
    flip = Flip.sample(torch.randn(d_out, d_in, dtype=torch.float64), batch, steps if per_step else None)
    assert flip.per_step == per_step
    assert flip.sign_in.shape == ((steps, batch, d_in) if per_step else (batch, d_in))
    assert flip.sign_out.shape == ((steps, batch, d_out) if per_step else (batch, d_out))
    y = flipout_linear(x, weight, flip, bias)
    expected = torch.stack([torch.stack([_explicit_weight(weight, flip, n, t) @ x[t, n] + bias
                                         for n in range(batch)]) for t in range(steps)])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # Flip.example_weight (the tests' hook) is the same explicit weight.
    for n in range(batch):
        for t in range(steps):
            torch.testing.assert_close(flip.example_weight(weight, n, t), _explicit_weight(weight, flip, n, t))
    # Per-window signs: one weight per example for the whole window; per-step: a new one each step.
    same_over_time = all(torch.equal(flip.example_weight(weight, 0, t), flip.example_weight(weight, 0, 0))
                         for t in range(steps))
    assert same_over_time != per_step
    assert not torch.equal(flip.example_weight(weight, 0), flip.example_weight(weight, 1))


def test_flipout_linear_without_flip_is_plain_linear():
    torch.manual_seed(2)
    x, weight, bias = torch.randn(4, 3, 5), torch.randn(2, 5), torch.randn(2)
    torch.testing.assert_close(flipout_linear(x, weight, None, bias), F.linear(x, weight, bias), rtol=0, atol=0)


# -- the flipout regularizers in the LSTM --------------------------------------------------

@pytest.mark.parametrize("perturb_ih", [False, True], ids=["hh", "hh+ih"])
@pytest.mark.parametrize("per_step", [False, True], ids=["per_window", "per_step"])
@pytest.mark.parametrize("name", FLIPOUT)
def test_vectorised_lstm_equals_explicit_per_example_weights(name, per_step, perturb_ih):
    torch.manual_seed(3)
    steps, batch, d_in, hidden = 5, 4, 3, 6
    layer = LSTMLayer(d_in, hidden)
    x = torch.randn(steps, batch, d_in)
    state = (torch.randn(batch, hidden), torch.randn(batch, hidden))
    reg = _reg(name, perturb_ih=perturb_ih, resample_per_step=per_step, **RATE[name])
    noise = reg.layer_noise(layer, batch, steps)  # the draw the layer will use
    # Flipout keeps the mean weights and hands the per-example part to the layer.
    assert noise.weight_hh is layer.weight_hh and noise.weight_ih is layer.weight_ih
    assert noise.flip_hh is not None and noise.flip_hh.per_step == per_step
    assert (noise.flip_ih is not None) == perturb_ih
    out, (h, c) = layer(x, state, noise)
    ref_out, (ref_h, ref_c) = reference_lstm(
        layer, x, state,
        lambda n, t: _explicit_weight(noise.weight_ih, noise.flip_ih, n, t),
        lambda n, t: _explicit_weight(noise.weight_hh, noise.flip_hh, n, t))
    for got, want in ((out, ref_out), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The check has teeth: the perturbation moves the output well beyond the tolerance.
    plain, _ = reference_lstm(layer, x, state, lambda n, t: layer.weight_ih, lambda n, t: layer.weight_hh)
    assert (out - plain).abs().max() > 1e-2


def test_wd_flipout_example_weight_is_exact_dropconnect_with_keep_rate_half():
    torch.manual_seed(4)
    batch, hidden = 8, 16
    layer = LSTMLayer(5, hidden)
    w = layer.weight_hh.detach()
    flip = _reg("wd_flipout", weight_p=0.5).layer_noise(layer, batch, 3).flip_hh
    keeps = []
    for n in range(batch):
        wn = flip.example_weight(w, n).detach()
        # W + (±W) ∘ (±1): every entry is exactly 0 (dropped) or 2W (kept, scaled by 1/(1-p)).
        assert torch.all((wn == 0) | (wn == 2 * w))
        keeps.append((wn != 0).float())
    keeps = torch.stack(keeps)
    # Per example: P = 4H*H = 1024 independent Bernoulli(0.5) keeps, sd of the rate 0.5/sqrt(P) =
    # 0.016; 4.5 sd (two-sided false alarm 7e-6 per example, < 1e-4 for the 8 examples).
    tol = 4.5 * 0.5 / math.sqrt(w.numel())
    for n in range(batch):
        assert abs(keeps[n].mean().item() - 0.5) < tol
    # Different examples get different masks (a shared mask would make every row equal).
    assert all(not torch.equal(keeps[0], keeps[n]) for n in range(1, batch))


@pytest.mark.parametrize("weight_p", [0.3, 0.6])
def test_wd_flipout_rejects_asymmetric_rates(weight_p):
    with pytest.raises(UserError, match="symmetric"):
        _reg("wd_flipout", weight_p=weight_p)
    _reg("wd_flipout", weight_p=0.5)
    _reg("wd_flipout", weight_p=0.0)


def test_gauss_flipout_per_example_perturbation_has_mean_zero_and_variance_sigma2_w2():
    torch.manual_seed(5)
    sigma, draws, batch = 0.7, 100, 4
    layer = LSTMLayer(3, 8)
    w = layer.weight_hh.detach()
    reg = _reg("gauss_flipout", sigma=sigma)
    z = []
    for d in range(draws):
        flip = reg.layer_noise(layer, batch, 2).flip_hh
        deltas = torch.stack([flip.example_weight(w, n).detach() - w for n in range(batch)])
        # Flipout only flips signs of the shared ΔŴ: every example has the same |ΔW_n|.
        torch.testing.assert_close(deltas.abs(), deltas[:1].abs().expand_as(deltas), rtol=1e-5, atol=1e-6)
        z.append(deltas[d % batch] / (sigma * w))  # one example per draw: independent samples
    z = torch.cat(z).flatten()
    n = z.numel()  # 100 draws x 256 entries; entries are independent N(0, 1) after normalising
    # mean: sd 1/sqrt(n) = 0.006; variance: sd sqrt(2/n) = 0.009 (Gaussian 4th moment); 4.5 sd each
    # (two-sided false alarm 7e-6). Normalising by σW tests the per-entry variance σ²W²_ij: a
    # variance not proportional to W²_ij would make the normalised variance far from 1.
    assert abs(z.mean().item()) < 4.5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4.5 * math.sqrt(2 / n)


@pytest.mark.parametrize("name", FLIPOUT)
def test_flipout_signs_are_per_window_by_default_and_per_step_on_request(name):
    torch.manual_seed(6)
    steps, batch = 4, 6
    layer = LSTMLayer(3, 5)
    w = layer.weight_hh
    window = _reg(name, **RATE[name]).layer_noise(layer, batch, steps).flip_hh
    assert window.sign_in.shape == (batch, 5) and window.sign_out.shape == (batch, 20)
    # Per window: example_weight does not depend on t; examples differ.
    assert torch.equal(window.example_weight(w, 2, 0), window.example_weight(w, 2, steps - 1))
    assert not torch.equal(window.example_weight(w, 0), window.example_weight(w, 1))
    step = _reg(name, resample_per_step=True, **RATE[name]).layer_noise(layer, batch, steps).flip_hh
    assert step.sign_in.shape == (steps, batch, 5) and step.sign_out.shape == (steps, batch, 20)
    assert all(not torch.equal(step.example_weight(w, 0, 0), step.example_weight(w, 0, t)) for t in range(1, steps))


# -- estimator statistics: unbiasedness and variance (Sec. 3.2, Eqs. 10-12; Sec. 4.1) -----

PAIRS = {"gauss": ("gauss", "gauss_flipout", dict(sigma=1.0)),
         "weight_drop": ("weight_drop", "wd_flipout", dict(weight_p=0.5))}
STAT_N, STAT_DRAWS, STAT_PER_EXAMPLE = 32, 400, 12
Z_ONE_SIDED = NormalDist().inv_cdf(1 - 5e-4)  # 3.29: false alarm 5e-4 per one-sided assertion


def _aggregate_variance(grads: torch.Tensor, dof: int) -> tuple[float, float]:
    """Total variance over the W_hh entries (trace of the covariance) from ``(draws, P)``
    gradients, and its relative standard error.

    Per draw q_d = ||g_d - ḡ||²; the estimate is Σq_d/(D-1) and its measured se is sd(q)/sqrt(D)
    (this includes non-Gaussian tails and correlations between entries). Under a Gaussian model
    one variance estimate with ``dof`` degrees of freedom is σ²χ²_dof/dof, relative sd
    sqrt(2/dof), and by Cauchy-Schwarz a sum of correlated such estimates has at most that
    relative sd; we use the larger of the two so a lucky small measured se cannot tighten the test.
    """
    q = ((grads - grads.mean(0)) ** 2).sum(1)
    var = q.sum().item() / (len(q) - 1)
    rel_se = max(q.std().item() / math.sqrt(len(q)) / var, math.sqrt(2 / dof))
    return var, rel_se


@pytest.fixture(scope="module", params=list(PAIRS))
def gradient_draws(request):
    """W_hh gradients of a small LSTM over many noise draws: shared perturbation and flipout at
    batch N, and the shared perturbation at batch 1 (one example at a time).

    The batch is one random sequence plus small per-example input jitter, with the same targets:
    examples that respond alike to a weight perturbation, as in a trained LM (paper: α ≫ β ≫ γ).
    There, sharing ΔŴ correlates the examples' gradients (large β in Eq. 11) and flipout removes
    that correlation (Eq. 12). (With unrelated random examples and random targets the examples
    can respond in opposite directions, β < 0, and the shared perturbation is then not the worse
    one; that is the theorem, not a flaw of flipout.)
    """
    shared_name, flip_name, options = PAIRS[request.param]
    torch.manual_seed(7)
    steps, d_in, hidden, classes, n = 4, 4, 8, 5, STAT_N
    layer = LSTMLayer(d_in, hidden)
    x = torch.randn(steps, 1, d_in) + 0.5 * torch.randn(steps, n, d_in)
    y = torch.randint(0, classes, (steps, 1)).expand(steps, n)
    readout = torch.randn(classes, hidden)

    def grad(reg, cols) -> torch.Tensor:
        xb, yb = x[:, cols], y[:, cols]
        batch = xb.size(1)
        state = (torch.zeros(batch, hidden), torch.zeros(batch, hidden))
        out, _ = layer(xb, state, reg.layer_noise(layer, batch, steps))
        # Mean over T*B, so the batch gradient is the mean of the batch-1 gradients.
        loss = F.cross_entropy((out @ readout.t()).reshape(-1, classes), yb.reshape(-1))
        return torch.autograd.grad(loss, layer.weight_hh)[0].flatten()

    shared, flip = _reg(shared_name, **options), _reg(flip_name, **options)
    everyone = slice(None)
    g_shared = torch.stack([grad(shared, everyone) for _ in range(STAT_DRAWS)])
    g_flip = torch.stack([grad(flip, everyone) for _ in range(STAT_DRAWS)])
    # Batch 1: k draws for each example (its own mean), so the pooled within-example spread is
    # mean_n Var(g_n), the α of Eq. 10; the ideal (independent perturbations) batch-N variance
    # is that divided by N.
    k = STAT_PER_EXAMPLE
    g_one = torch.stack([torch.stack([grad(shared, slice(m, m + 1)) for _ in range(k)]) for m in range(n)])
    q_one = ((g_one - g_one.mean(1, keepdim=True)) ** 2).sum(2) * k / (k - 1)
    dof_one = n * (k - 1)
    var_one = q_one.mean().item()
    rel_se_one = max(q_one.std().item() / math.sqrt(q_one.numel()) / var_one, math.sqrt(2 / dof_one))
    return dict(shared=g_shared, flip=g_flip, var_one=var_one, rel_se_one=rel_se_one)


def test_flipout_gradient_is_unbiased(gradient_draws):
    """Mean W_hh gradient over noise draws: flipout == shared perturbation (Sec. 3.1, Obs. 1)."""
    g_shared, g_flip = gradient_draws["shared"], gradient_draws["flip"]
    draws, entries = g_shared.shape
    se = (g_shared.var(0) / draws + g_flip.var(0) / draws).sqrt()
    z = ((g_shared.mean(0) - g_flip.mean(0)) / se).abs()
    # Each z is ~N(0, 1) under unbiasedness (CLT over 400 draws). Bonferroni over the P = 256
    # entries bounds the family-wise false alarm at 1e-3 whatever their correlation:
    # |z| <= Φ⁻¹(1 - 1e-3 / (2P)) = 4.62.
    bound = NormalDist().inv_cdf(1 - 1e-3 / (2 * entries))
    assert z.max().item() <= bound, f"max |z| = {z.max().item():.2f} over {entries} entries"


def test_flipout_gradient_variance_is_below_shared_and_near_ideal(gradient_draws):
    """Sec. 3.2 / 4.1: Var_shared = α/N + (N-1)/N (β+γ), Var_flipout = α/N + (N-1)/N γ, and
    flipout is ≈ α/N (ideal 1/N scaling) when γ is small."""
    n = STAT_N
    var_shared, rel_shared = _aggregate_variance(gradient_draws["shared"], STAT_DRAWS - 1)
    var_flip, rel_flip = _aggregate_variance(gradient_draws["flip"], STAT_DRAWS - 1)
    var_one, rel_one = gradient_draws["var_one"], gradient_draws["rel_se_one"]
    # Ratios are compared on the log scale, where the se of log(a/b) is sqrt(rel_a² + rel_b²)
    # (delta method); each one-sided assertion fails by chance with probability 5e-4. With
    # 399 dof the Gaussian floor is rel se 0.071, so the margin z*se is at most ~0.33 (x1.4).
    # (1) Clearly below shared: for these alike examples sharing ΔŴ keeps the examples' gradients
    # almost fully correlated, so Var_shared stays near α while flipout is near α/N, a factor
    # ≈ N apart (measured ≈ 20-30 at N = 32). We require at least N/4 = 8.
    log_ratio = math.log(var_shared / var_flip)
    assert log_ratio >= math.log(n / 4) - Z_ONE_SIDED * math.hypot(rel_shared, rel_flip), \
        f"Var_shared / Var_flipout = {math.exp(log_ratio):.2f}, want >= {n / 4}"
    # (2) Ideal scaling: Var_flipout(N) ≈ Var(1) / N within a factor 1.5, the allowance for the
    # (N-1)/N γ term of Eq. 12 that the theory does not bound (measured ratio ≈ 1.0-1.1).
    log_ideal = math.log(var_flip / (var_one / n))
    assert abs(log_ideal) <= math.log(1.5) + Z_ONE_SIDED * math.hypot(rel_flip, rel_one), \
        f"Var_flipout(N) / (Var(1)/N) = {math.exp(log_ideal):.2f}, want within x1.5 of 1"
