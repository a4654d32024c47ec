"""Bayes by Backprop (``bbb``, ``bbb_flipout``; lm/regularizers/bayes.py): the KL term against
torch.distributions, unbiased gradients of μ and ρ, flipout's per-example marginal, the window
granularity of both variants, configuration errors, and training on the paper's sizes.

Statistical tests use fixed seeds; each tolerance is derived from its sample size in a comment.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import evaluate as evaluate_script
import train as train_script
from lm.config import ModelConfig, RegularizerConfig, load_config
from lm.errors import UserError
from lm.nn.lstm import LSTMLayer
from lm.nn.model import LanguageModel, count_parameters
from lm.nn.rng import shared_noise
from lm.regularizers import build_regularizer
from lm.regularizers.bayes import inverse_softplus

BBB = ("bbb", "bbb_flipout")

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, hidden: int = 6, layers: int = 2, **options) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(input="embedding", emb_size=5, hidden_size=hidden, num_layers=layers)
    return LanguageModel(cfg, RegularizerConfig(name=name, **options), 11)


def _randomise_rho(model: LanguageModel) -> None:
    """ρ away from its constant init, so per-element mistakes (a transposed σ, a wrong broadcast) show."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for rho in model.regularizer.parameters():
            rho.copy_(torch.randn(rho.shape, generator=g) * 0.5 - 2.0)


# -- the KL term ----------------------------------------------------------------------------

@pytest.mark.parametrize("perturb_ih", [False, True], ids=["hh", "hh+ih"])
@pytest.mark.parametrize("name", BBB)
def test_kl_equals_torch_distributions(name, perturb_ih):
    model = _model(name, perturb_ih=perturb_ih, prior_sigma=0.3)
    _randomise_rho(model)
    reg = model.regularizer
    expected = torch.zeros((), dtype=torch.float64)
    for i, layer in enumerate(model.layers):
        weights = [(layer.weight_hh, reg.rho_hh[i])] + ([(layer.weight_ih, reg.rho_ih[i])] if perturb_ih else [])
        for mu, rho in weights:
            q = Normal(mu.double(), F.softplus(rho.double()))
            expected = expected + kl_divergence(q, Normal(torch.zeros_like(mu.double()), 0.3)).sum()
    torch.testing.assert_close(reg.kl().double(), expected, rtol=1e-5, atol=0)
    # μ and ρ of every perturbed weight are counted: W_ih only with perturb_ih.
    assert len(reg.pairs()) == len(model.layers) * (2 if perturb_ih else 1)
    # Its gradient is autograd's of the closed form (a sanity check of differentiability in μ and ρ).
    rho = reg.rho_hh[0]
    (g_ours,) = torch.autograd.grad(reg.kl(), rho)
    mu = model.layers[0].weight_hh
    (g_ref,) = torch.autograd.grad(kl_divergence(Normal(mu, F.softplus(rho)), Normal(0.0, 0.3)).sum(), rho)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_initial_sigma_and_extra_loss_with_scale_and_warmup():
    model = _model("bbb", init_sigma=0.07, kl_scale=0.5, kl_warmup_steps=4)
    reg = model.regularizer
    assert abs(inverse_softplus(0.07) - math.log(math.expm1(0.07))) < 1e-12
    for _, rho in reg.pairs():
        torch.testing.assert_close(F.softplus(rho), torch.full_like(rho, 0.07))
    assert abs(reg.sigma_mean() - 0.07) < 1e-6
    kl = reg.kl().item()
    tokens = 1000
    weights = [reg.extra_loss(step, tokens).item() / (kl / tokens) for step in range(6)]
    assert weights == pytest.approx([0.5 * 0.25, 0.5 * 0.5, 0.5 * 0.75, 0.5, 0.5, 0.5], rel=1e-5)
    stats = reg.log_stats()
    assert stats["kl"] == pytest.approx(kl / tokens, rel=1e-5) and stats["kl_weight"] == 0.5
    assert stats["sigma_mean"] == pytest.approx(0.07, rel=1e-5)
    assert math.isnan(reg.log_stats()["kl"])  # accumulators reset: no steps since the last call


# -- window granularity ---------------------------------------------------------------------

def test_bbb_draws_one_weight_per_window_shared_by_batch_and_time():
    torch.manual_seed(1)
    model = _model("bbb", init_sigma=0.3).train()
    layer, reg = model.layers[0], model.regularizer
    steps, batch = 5, 4
    with shared_noise(seed=3, step=7):
        first = reg.layer_noise(layer, batch, steps)
    # One (4H, H) weight for the window: no flipout, no per-step draws, so every example and
    # every time step of the window uses this one matrix (and the fused kernel runs it).
    assert first.flip_hh is None and first.flip_ih is None and first.fused
    assert first.weight_hh.shape == layer.weight_hh.shape
    assert (first.weight_hh - layer.weight_hh).abs().max() > 0.05
    x, state = torch.randn(steps, batch, 5), (torch.zeros(batch, 6), torch.zeros(batch, 6))
    out, _ = layer(x, state, first)
    ref, _ = torch.func.functional_call(layer.rnn, {"weight_hh_l0": first.weight_hh}, (x,))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # The keyed stream: the same (seed, step) gives the same draw, the next window a new one.
    with shared_noise(seed=3, step=7):
        again = reg.layer_noise(layer, batch, steps)
    with shared_noise(seed=3, step=8):
        nxt = reg.layer_noise(layer, batch, steps)
    assert torch.equal(first.weight_hh, again.weight_hh)
    assert not torch.equal(first.weight_hh, nxt.weight_hh)


def test_bbb_flipout_signs_per_example_held_over_window():
    torch.manual_seed(2)
    model = _model("bbb_flipout", init_sigma=0.3, perturb_ih=True).train()
    layer, reg = model.layers[0], model.regularizer
    steps, batch = 5, 4
    w = layer.weight_hh
    noise = reg.layer_noise(layer, batch, steps)
    assert noise.weight_hh is w and noise.weight_ih is layer.weight_ih  # the mean; the rest per example
    flip = noise.flip_hh
    assert flip.sign_in.shape == (batch, 6) and flip.sign_out.shape == (batch, 24)  # per window, not per step
    assert noise.flip_ih is not None and noise.flip_ih.sign_in.shape == (batch, 5)
    assert torch.equal(flip.example_weight(w, 1, 0), flip.example_weight(w, 1, steps - 1))
    assert all(not torch.equal(flip.example_weight(w, 0), flip.example_weight(w, n)) for n in range(1, batch))
    # ΔŴ is σ ∘ ε: |ΔŴ| / σ is the same for every example (signs only) and the next window is new.
    sigma = F.softplus(reg.rho_hh[0])
    torch.testing.assert_close((flip.example_weight(w, 2) - w).abs(), flip.delta.abs())
    nxt = reg.layer_noise(layer, batch, steps).flip_hh
    assert not torch.equal(nxt.delta, flip.delta) and not torch.equal(nxt.sign_in, flip.sign_in)
    assert (flip.delta / sigma).abs().max() > 0.5
    # The layer runs example n with W_n = μ + ΔŴ ∘ r_n s_nᵀ at every step of the window.
    x, state = torch.randn(steps, batch, 5), (torch.zeros(batch, 6), torch.zeros(batch, 6))
    out, _ = layer(x, state, noise)
    for n in range(batch):
        weights = {"weight_hh_l0": flip.example_weight(w, n), "weight_ih_l0": noise.flip_ih.example_weight(
            layer.weight_ih, n)}
        ref, _ = torch.func.functional_call(layer.rnn, weights, (x[:, n:n + 1],))
        torch.testing.assert_close(out[:, n:n + 1], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", BBB)
def test_eval_uses_the_posterior_mean(name):
    model = _model(name, init_sigma=0.5).eval()
    noise = model.regularizer.layer_noise(model.layers[0], 3, 4)
    assert noise.weight_hh is model.layers[0].weight_hh and noise.flip_hh is None


# -- statistics: flipout's marginal and unbiased gradients ----------------------------------

def test_bbb_flipout_per_example_weights_are_distributed_as_the_posterior():
    """Each example's W_n - μ, divided by σ, must be i.i.d. N(0, 1): its mean, variance and CDF."""
    torch.manual_seed(4)
    model = _model("bbb_flipout", hidden=8, layers=1).train()
    _randomise_rho(model)  # σ differs per entry: normalising by the wrong σ would fail the variance
    layer, reg = model.layers[0], model.regularizer
    sigma = F.softplus(reg.rho_hh[0]).detach()
    w = layer.weight_hh.detach()
    draws, batch = 100, 4
    z = []
    for d in range(draws):
        flip = reg.layer_noise(layer, batch, 3).flip_hh
        z.append((flip.example_weight(w, d % batch).detach() - w) / sigma)  # one example per draw: independent
    z = torch.cat(z).flatten().double()
    n = z.numel()  # 100 draws x 256 entries
    # mean: sd 1/sqrt(n) = 0.006; variance: sd sqrt(2/n) = 0.009; 4.5 sd each (false alarm 7e-6).
    assert abs(z.mean().item()) < 4.5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4.5 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov against Φ: P(D > c/sqrt(n)) <= 2 exp(-2c²) (DKW); c = 2.5 gives 7e-6.
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    cdf = torch.special.ndtr(z.sort().values)
    d = torch.maximum((ecdf - cdf).abs(), (ecdf - 1 / n - cdf).abs()).max().item()
    assert d < 2.5 / math.sqrt(n), f"KS distance {d:.4f}"


STAT_DRAWS = 300


@pytest.fixture(scope="module")
def gradient_draws():
    """Gradients of the data loss w.r.t. μ = W_hh and ρ over many draws, for ``bbb``,
    ``bbb_flipout`` and an independent reference that builds each example's weights by hand,
    ``W_n = μ + softplus(ρ) ∘ ε_n`` with its own ε_n (the textbook reparameterisation)."""
    torch.manual_seed(5)
    steps, batch, d_in, hidden, classes = 4, 6, 3, 5, 4
    layer = LSTMLayer(d_in, hidden)
    x = torch.randn(steps, batch, d_in)
    y = torch.randint(0, classes, (steps, batch))
    readout = torch.randn(classes, hidden)
    regs = {}
    for name in BBB:
        reg = build_regularizer(RegularizerConfig(name=name)).train()
        reg.attach(torch.nn.ModuleList([layer]))
        with torch.no_grad():
            reg.rho_hh[0].copy_(torch.full_like(reg.rho_hh[0], inverse_softplus(0.4)))
        regs[name] = reg
    rho = regs["bbb"].rho_hh[0]
    regs["bbb_flipout"].rho_hh[0] = rho  # one ρ for all three estimators

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((out @ readout.t()).reshape(-1, classes), y.reshape(-1))

    def grad_reg(name: str) -> torch.Tensor:
        state = (torch.zeros(batch, hidden), torch.zeros(batch, hidden))
        out, _ = layer(x, state, regs[name].layer_noise(layer, batch, steps))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(out), (layer.weight_hh, rho))])

    def grad_reference(k: float = 1.0) -> torch.Tensor:
        sigma = F.softplus(rho) * k
        outs = []
        for n in range(batch):
            w_n = layer.weight_hh + sigma * torch.randn_like(sigma)
            out, _ = torch.func.functional_call(layer.rnn, {"weight_hh_l0": w_n}, (x[:, n:n + 1],))
            outs.append(out)
        loss = loss_of(torch.cat(outs, 1))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (layer.weight_hh, rho))])

    return {name: torch.stack([grad_reg(name) for _ in range(STAT_DRAWS)]) for name in BBB} | {
        "reference": torch.stack([grad_reference() for _ in range(STAT_DRAWS)]),
        "reference_2sigma": torch.stack([grad_reference(2.0) for _ in range(STAT_DRAWS)])}


@pytest.mark.parametrize("name", BBB)
def test_gradients_of_mu_and_rho_are_unbiased(gradient_draws, name):
    """E[∇μ], E[∇ρ] of each estimator equal those of the hand-built independent-sample estimator."""
    ours, ref = gradient_draws[name], gradient_draws["reference"]
    draws, entries = ours.shape  # 2 x 100 entries: μ then ρ
    se = (ours.var(0) / draws + ref.var(0) / draws).sqrt()
    z = ((ours.mean(0) - ref.mean(0)) / se).abs()
    # Each z ~ N(0, 1) under unbiasedness (CLT over 300 draws); Bonferroni over the 200 entries
    # bounds the family-wise false alarm at 1e-3: |z| <= Φ⁻¹(1 - 1e-3 / 400) = 4.56.
    bound = NormalDist().inv_cdf(1 - 1e-3 / (2 * entries))
    assert z.max().item() <= bound, f"max |z| = {z.max().item():.2f} over {entries} entries"


def test_unbiasedness_test_has_teeth(gradient_draws):
    """Control: the same comparison rejects the hand-built estimator of a different posterior, σ
    doubled, whose mean gradients differ from the true ones only through the noise's second-order
    effect (a measured power check: max |z| ≈ 5-6 here; σ x1.5 is not resolved with 300 draws)."""
    ours, ref = gradient_draws["bbb_flipout"], gradient_draws["reference_2sigma"]
    draws, entries = ours.shape
    se = (ours.var(0) / draws + ref.var(0) / draws).sqrt()
    z = ((ours.mean(0) - ref.mean(0)) / se).abs()
    assert z.max().item() > NormalDist().inv_cdf(1 - 1e-3 / (2 * entries))


# -- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("init_sigma", 0.0), ("prior_sigma", -1.0), ("kl_scale", -0.1),
                                       ("kl_warmup_steps", -1)])
def test_bad_values_are_rejected(key, value):
    with pytest.raises(UserError, match=f"regularizer.{key}"):
        load_config(overrides=["regularizer.name=bbb", f"regularizer.{key}={value}"])


def test_options_of_other_regularizers_are_rejected_both_ways():
    with pytest.raises(UserError, match="regularizer.sigma is not used by regularizer 'bbb'"):
        build_regularizer(RegularizerConfig(name="bbb", sigma=1.0))
    with pytest.raises(UserError, match="regularizer.prior_sigma is not used by regularizer 'gauss'"):
        build_regularizer(RegularizerConfig(name="gauss", sigma=1.0, prior_sigma=0.5))


# -- training: the paper's sizes, and the CLI ---------------------------------------------

@pytest.mark.parametrize("name", BBB)
@pytest.mark.parametrize("level", ["char", "word"])
def test_trains_on_the_paper_sizes(ptb_dir, level, name):
    from lm.train.trainer import Trainer

    cfg = load_config(f"{level}_gauss.yaml", [f"regularizer.name={name}", "regularizer.sigma=0"])
    trainer = Trainer(cfg, Path("unused"))
    hidden, layers = (1000, 1) if level == "char" else (650, 2)
    base = 4_258_050 if level == "char" else 19_780_400
    assert count_parameters(trainer.model) == base + layers * 4 * hidden * hidden  # + one ρ per W_hh entry
    rho_before = [p.detach().clone() for p in trainer.model.regularizer.parameters()]
    mu_before = trainer.model.layers[0].weight_hh.detach().clone()
    source = trainer.train_data
    for i in range(2):
        loss = trainer.train_step(source[i * 10: i * 10 + 10], source[i * 10 + 1: i * 10 + 11])
        assert math.isfinite(loss)
    assert not torch.equal(mu_before, trainer.model.layers[0].weight_hh)
    assert all(not torch.equal(a, b) for a, b in zip(rho_before, trainer.model.regularizer.parameters()))


@pytest.mark.parametrize("name", BBB)
def test_cli_logs_kl_and_evaluates_the_checkpoint(ptb_dir, tmp_path, name, capsys):
    run = tmp_path / "run"
    small = ["--config", "quickstart.yaml", "--regularizer.name", name, "--regularizer.kl_warmup_steps", "4",
             "--model.hidden_size", "16", "--train.max_steps", "2", "--train.bptt", "10", "--train.eval_every_steps",
             "1", "--eval.max_tokens", "400", "--eval.bptt", "20", "--eval.batch_size", "4", "--data.train_tokens", "20000"]
    assert train_script.main(["--run-dir", str(run), *small]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_weight"] for r in records] == [0.25, 0.5]
    assert all(r["kl"] > 0 and 0 < r["sigma_mean"] < 1 for r in records)
    assert "kl 0." in capsys.readouterr().out  # the log line
    assert evaluate_script.main([str(run / "best.pt"), "--split", "valid", "--json", "--max-tokens", "400"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


# -- the experiment's report (lm/analysis/bayes_report.py) --------------------------------------

def _fake_run(root: Path, batch: int, scheme: str, seed: int, speed: float) -> None:
    """Validation loss 3 - speed * step / 100 every 10 steps, floored at 1 (``speed`` x faster)."""
    d = root / f"b{batch}" / scheme / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"step": s, "elapsed_s": 0.5 * s, "valid_loss": max(1.0, 3 - speed * s / 100), "sigma_mean": 0.05,
             "kl": 0.01} for s in range(10, 210, 10)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = {"steps": 200, "valid": {"bpc": 1.5}, "test": {"bpc": 1.4 + seed / 100}, "train_tokens_per_s": 100.0}
    (d / "results.json").write_text(json.dumps(res))


def test_report_steps_to_target_and_ratio(tmp_path):
    from lm.analysis import bayes_report

    for seed, flip_speed in ((1, 2.0), (2, 2.0), (3, 2.0)):
        _fake_run(tmp_path, 64, "bbb", seed, 1.0)
        _fake_run(tmp_path, 64, "bbb_flipout", seed, flip_speed)
    _fake_run(tmp_path, 8, "bbb", 1, 1.0)  # a batch size without its pair is left out
    report = bayes_report.analyse(bayes_report.load_runs(tmp_path))
    assert list(report["batches"]) == [64]
    first = report["batches"][64]["targets"][0]
    # bbb reaches its floor 1.0 at step 200, the common lowest loss; flipout at step 100.
    assert first["valid_loss"] == pytest.approx(1.0)
    assert first["steps"]["bbb"] == [200, 200, 200] and first["steps"]["bbb_flipout"] == [100, 100, 100]
    assert first["steps_ratio"]["geo_mean"] == pytest.approx(2.0) and first["wall_ratio"]["geo_mean"] == pytest.approx(2.0)
    # 1.1 is reached between validations: bbb at 3 - s/100 = 1.1 -> s = 190 (interpolated, exact here).
    assert report["batches"][64]["targets"][1]["steps"]["bbb"][0] == pytest.approx(190)
    assert bayes_report.time_to([(10, 1.0, 2.0), (20, 3.0, 1.0)], 1.5) == pytest.approx((15, 2.0))
    assert bayes_report.time_to([(10, 1.0, 2.0)], 1.5) is None
    r = bayes_report.ratio_summary([1.5, 2.0, 3.0])
    assert r["ci95"][0] < r["geo_mean"] < r["ci95"][1]
    assert "| 64 |" in bayes_report.markdown(report)


def test_noise_sharing_declared_for_monte_carlo_evaluation():
    assert build_regularizer(RegularizerConfig(name="bbb")).shares_noise_across_batch()
    assert not build_regularizer(RegularizerConfig(name="bbb_flipout")).shares_noise_across_batch()
    assert build_regularizer(RegularizerConfig(name="bbb_flipout", embed_p=0.1)).shares_noise_across_batch()
