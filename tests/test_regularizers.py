"""The recurrent regularizers: identities, shapes, measured rates, mask granularity, registry,
configuration errors and the CLI listing.

Rates are checked against Binomial sampling error: with ``n`` independent Bernoulli(p) draws the
observed fraction has sd sqrt(p(1-p)/n); ``Z = 4.5`` sd gives a two-sided false alarm of 7e-6
per check (< 2e-4 over the ~25 rate checks here). Seeds are fixed.
"""

from __future__ import annotations

import math

import pytest
import torch

from lm.config import ModelConfig, RegularizerConfig
from lm.errors import UserError
from lm.nn.lstm import LSTMLayer
from lm.nn.model import LanguageModel
from lm.regularizers import REGISTRY, Regularizer, build_regularizer, register
from lm.regularizers.base import NoRegularizer
from lm.cli.train import main as train_main

Z = 4.5
VOCAB, STEPS, BATCH = 13, 6, 4
MODEL = ModelConfig(input="embedding", emb_size=6, hidden_size=5, num_layers=2)

# Non-zero settings of every option of every regularizer (its own and the shared dropout rates).
RATES = {
    "none": dict(embed_p=0.1, input_p=0.2, between_p=0.2, output_p=0.2),
    "dropout": dict(embed_p=0.1, input_p=0.3, between_p=0.3, output_p=0.3),
    "variational": dict(hidden_p=0.3, embed_p=0.2, input_p=0.35, between_p=0.2, output_p=0.35),
    "semeniuta": dict(cell_p=0.3, embed_p=0.1, input_p=0.5, output_p=0.5),
    "zoneout": dict(zoneout_c=0.25, zoneout_h=0.1, embed_p=0.1),
    "weight_drop": dict(weight_p=0.4, perturb_ih=True, embed_p=0.1, input_p=0.4, between_p=0.3, output_p=0.4),
    "wd_flipout": dict(weight_p=0.5, perturb_ih=True, resample_per_step=True, embed_p=0.1, output_p=0.4),
    "gauss": dict(sigma=1.0, perturb_ih=True),
    "gauss_flipout": dict(sigma=1.0, perturb_ih=True, resample_per_step=True),
    "bbb": dict(init_sigma=0.2, prior_sigma=0.5, kl_scale=0.1, kl_warmup_steps=10, perturb_ih=True, embed_p=0.1),
    "bbb_flipout": dict(init_sigma=0.2, prior_sigma=0.5, kl_scale=0.1, kl_warmup_steps=10, perturb_ih=True),
}
NAMES = sorted(RATES)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _assert_same_outputs(model, plain, tokens) -> torch.Tensor:
    """``model`` and its plain twin give the same logits and final states on ``tokens``; returns the plain logits."""
    logits, state = _run(model, tokens)
    plain_logits, plain_state = _run(plain, tokens)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-6)
    for (h, c), (ph, pc) in zip(state, plain_state):
        torch.testing.assert_close(h, ph, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, pc, rtol=0, atol=1e-6)
    return plain_logits


def _reg(name: str, **options) -> Regularizer:
    return build_regularizer(RegularizerConfig(name=name, **options)).train()


def _model(name: str, **options) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(MODEL, RegularizerConfig(name=name, **options), VOCAB)


def _plain_twin(model: LanguageModel) -> LanguageModel:
    """The unregularized ``none`` model with the same weights."""
    plain = _model("none")
    # the regularizer's own parameters (bbb's posterior scales) have no place in the plain model
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("regularizer.")})
    return plain.train(model.training)


def _run(model: LanguageModel, tokens: torch.Tensor):
    return model(tokens, model.init_state(tokens.size(1)))


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (STEPS, BATCH), generator=torch.Generator().manual_seed(1))


def _assert_rate(observed: float, p: float, n: int) -> None:
    tol = Z * math.sqrt(p * (1 - p) / n)
    assert abs(observed - p) <= tol, f"rate {observed:.4f}, configured {p} (n = {n}, tolerance {tol:.4f})"


def reference_lstm(layer: LSTMLayer, x, state, weight_hh=None, hidden_mask=None, zoneout=(0.0, 0.0)):
    """Textbook LSTM (gate order i, f, g, o), weights shared by the batch, with an optional fixed
    mask on h_{t-1} and the zoneout expectation of Krueger et al. 2016:
    c_t = z_c c_{t-1} + (1-z_c)(f c_{t-1} + i g),  h_t = z_h h_{t-1} + (1-z_h) o tanh(f c_{t-1} + i g)."""
    w_ih, w_hh = layer.weight_ih, layer.weight_hh if weight_hh is None else weight_hh
    bias = layer.rnn.bias_ih_l0 + layer.rnn.bias_hh_l0
    h, c = state
    zc, zh = zoneout
    outputs = []
    for xt in x:
        hr = h if hidden_mask is None else h * hidden_mask
        i, f, g, o = (xt @ w_ih.t() + hr @ w_hh.t() + bias).chunk(4, 1)
        c_update = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_update = torch.sigmoid(o) * torch.tanh(c_update)
        c, h = zc * c + (1 - zc) * c_update, zh * h + (1 - zh) * h_update
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def test_every_registered_regularizer_is_covered():
    assert set(RATES) == set(REGISTRY)


# -- identities and shapes -----------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in NAMES if n != "zoneout"])
def test_eval_mode_is_the_plain_lstm(name):
    model = _model(name, **RATES[name])
    plain = _plain_twin(model.eval())
    tokens = _tokens()
    with torch.no_grad():
        plain_logits = _assert_same_outputs(model, plain, tokens)
        # The rates are live: in training mode the same model differs from the plain one.
        torch.manual_seed(2)
        assert (_run(model.train(), tokens)[0] - plain_logits).abs().max() > 1e-4


def test_zoneout_eval_is_the_expectation():
    torch.manual_seed(3)
    layer = LSTMLayer(3, 5)
    x, state = torch.randn(STEPS, BATCH, 3), (torch.randn(BATCH, 5), torch.randn(BATCH, 5))
    reg = _reg("zoneout", zoneout_c=0.25, zoneout_h=0.1).eval()
    with torch.no_grad():
        out, (h, c) = layer(x, state, reg.layer_noise(layer, BATCH, STEPS))
        ref_out, (ref_h, ref_c) = reference_lstm(layer, x, state, zoneout=(0.25, 0.1))
        plain_out, _ = reference_lstm(layer, x, state)
    for got, want in ((out, ref_out), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (out - plain_out).abs().max() > 1e-3  # the expectation is not the plain LSTM
    # Eval is deterministic (no masks drawn).
    with torch.no_grad():
        again, _ = layer(x, state, reg.layer_noise(layer, BATCH, STEPS))
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", NAMES)
def test_zero_rates_in_training_mode_are_the_plain_lstm(name):
    options = {"perturb_ih": True} if "perturb_ih" in REGISTRY[name].options else {}
    if "init_sigma" in REGISTRY[name].options:  # bbb: sigma = softplus(rho) > 0 always; take it negligible
        options["init_sigma"] = 1e-9
    model = _model(name, **options).train()  # every probability/scale at its default 0
    plain = _plain_twin(model)
    tokens = _tokens()
    _assert_same_outputs(model, plain, tokens)


def test_zoneout_at_zero_rates_is_the_plain_lstm_in_eval_too():
    model = _model("zoneout").eval()
    plain = _plain_twin(model)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(_run(model, tokens)[0], _run(plain, tokens)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_training_mode_keeps_shapes_and_gradients(name):
    torch.manual_seed(4)
    model = _model(name, **RATES[name]).train()
    logits, state = _run(model, _tokens())
    assert logits.shape == (STEPS, BATCH, VOCAB)
    assert len(state) == MODEL.num_layers
    assert all(h.shape == c.shape == (BATCH, MODEL.hidden_size) for h, c in state)
    logits.logsumexp(-1).mean().backward()
    for layer in model.layers:
        assert torch.isfinite(layer.weight_hh.grad).all() and layer.weight_hh.grad.abs().sum() > 0
    reg = model.regularizer
    x = torch.randn(STEPS, BATCH, 7)
    assert reg.drop_input(x).shape == reg.drop_between(x).shape == reg.drop_output(x).shape == x.shape
    assert reg.embedding_weight(model.encoder.weight).shape == model.encoder.weight.shape


# -- measured rates and granularity of the masks -------------------------------------------

def test_embedding_dropout_drops_whole_rows_at_the_configured_rate():
    torch.manual_seed(5)
    p, vocab = 0.25, 4000
    reg = _reg("none", embed_p=p)
    out = reg.embedding_weight(torch.ones(vocab, 6))
    dropped = (out == 0).all(1)
    # Each row is either all 0 or all 1/(1-p): a word is dropped everywhere it occurs.
    assert torch.all(dropped | (out == 1 / (1 - p)).all(1))
    _assert_rate(dropped.float().mean().item(), p, vocab)
    assert torch.equal(reg.eval().embedding_weight(out), out)


@pytest.mark.parametrize("hook, key", [("drop_input", "input_p"), ("drop_between", "between_p"),
                                       ("drop_output", "output_p")])
def test_locked_dropout_rate_and_one_mask_per_window(hook, key):
    torch.manual_seed(6)
    p, batch, feats = 0.35, 400, 10
    reg = _reg("variational", **{key: p})  # locked, like none / semeniuta / zoneout / weight noise
    out = getattr(reg, hook)(torch.ones(STEPS, batch, feats))
    assert torch.all((out == 0) | (out == 1 / (1 - p)))
    assert all(torch.equal(out[t], out[0]) for t in range(STEPS))  # constant over the time steps
    _assert_rate((out[0] == 0).float().mean().item(), p, batch * feats)
    assert not all(torch.equal(out[0, 0], out[0, b]) for b in range(1, batch))  # differs across examples


def test_naive_dropout_draws_a_new_mask_every_step():
    torch.manual_seed(7)
    p, batch, feats = 0.3, 100, 10
    reg = _reg("dropout", input_p=p)
    out = reg.drop_input(torch.ones(STEPS, batch, feats))
    zero = out == 0
    assert torch.all(zero | (out == 1 / (1 - p)))
    _assert_rate(zero.float().mean().item(), p, zero.numel())
    # New mask each step: dropped at two given steps with probability p², not p.
    _assert_rate((zero[0] & zero[1]).float().mean().item(), p * p, batch * feats)


def test_variational_hidden_mask_rate_and_held_over_the_window():
    torch.manual_seed(8)
    p, batch, hidden = 0.3, 500, 8
    layer = LSTMLayer(3, hidden)
    noise = _reg("variational", hidden_p=p).layer_noise(layer, batch, STEPS)
    mask = noise.hidden_mask
    assert mask.shape == (batch, hidden)
    assert torch.all((mask == 0) | (mask == 1 / (1 - p)))
    _assert_rate((mask == 0).float().mean().item(), p, mask.numel())
    assert not all(torch.equal(mask[0], mask[b]) for b in range(1, batch))
    # The layer applies this one mask to h_{t-1} at every step of the window.
    x, state = torch.randn(STEPS, batch, 3), (torch.randn(batch, hidden), torch.randn(batch, hidden))
    with torch.no_grad():
        out, _ = layer(x, state, noise)
        ref, _ = reference_lstm(layer, x, state, hidden_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def _probe_layer(hidden: int = 8, d_in: int = 3) -> LSTMLayer:
    """An LSTM whose step is c_t = tanh(g_t(x_t)) (input gate 1, forget gate 0, W_hh = 0) and
    h_t = tanh(c_t) (output gate 1): every update is a fresh continuous value, so a dropped cell
    update or a zoned-out unit is visible exactly."""
    layer = LSTMLayer(d_in, hidden)
    with torch.no_grad():
        layer.weight_hh.zero_()
        layer.weight_ih.zero_()
        layer.weight_ih[2 * hidden:3 * hidden].normal_()  # g block
        layer.rnn.bias_hh_l0.zero_()
        bias = layer.rnn.bias_ih_l0
        bias.zero_()
        bias[:hidden], bias[hidden:2 * hidden], bias[3 * hidden:] = 100.0, -100.0, 100.0  # i, f, o
    return layer


def test_semeniuta_cell_update_mask_rate_scaling_and_new_mask_every_step():
    torch.manual_seed(9)
    p, batch, hidden = 0.3, 300, 8
    layer = _probe_layer(hidden)
    x = torch.randn(STEPS, batch, 3)
    state = (torch.zeros(batch, hidden), torch.zeros(batch, hidden))
    reg = _reg("semeniuta", cell_p=p)
    with torch.no_grad():
        out, _ = layer(x, state, reg.layer_noise(layer, batch, STEPS))
        g = torch.tanh(x @ layer.weight_ih[2 * hidden:3 * hidden].t())
    dropped = out.abs() < 1e-30  # c_t = σ(-100)·c_{t-1} ≈ 0 when g_t is dropped
    # Kept units carry the update scaled by 1/(1-p).
    torch.testing.assert_close(out[~dropped], torch.tanh(g / (1 - p))[~dropped], rtol=1e-5, atol=1e-6)
    _assert_rate(dropped.float().mean().item(), p, dropped.numel())
    # A new mask every step: dropped at steps 0 and 1 with probability p².
    _assert_rate((dropped[0] & dropped[1]).float().mean().item(), p * p, batch * hidden)


def test_zoneout_rates_and_new_mask_every_step():
    torch.manual_seed(10)
    zc, zh, batch, hidden = 0.5, 0.4, 500, 8
    layer = _probe_layer(hidden)
    reg = _reg("zoneout", zoneout_c=zc, zoneout_h=zh)
    h0, c0 = torch.randn(batch, hidden), torch.randn(batch, hidden)
    with torch.no_grad():
        out, _ = layer(torch.randn(STEPS, batch, 3), (h0, c0), reg.layer_noise(layer, batch, STEPS))
        _, (_, c1) = layer(torch.randn(1, batch, 3), (h0, c0), reg.layer_noise(layer, batch, 1))
        _, (_, c3) = layer(torch.randn(3, batch, 3), (h0, c0), reg.layer_noise(layer, batch, 3))
    prev = torch.cat([h0[None], out[:-1]])
    kept_h = out == prev  # zoned out: h_t is exactly h_{t-1}; a fresh update differs almost surely
    _assert_rate(kept_h.float().mean().item(), zh, kept_h.numel())
    _assert_rate((kept_h[1] & kept_h[2]).float().mean().item(), zh * zh, batch * hidden)  # per step
    assert not all(torch.equal(kept_h[1, 0], kept_h[1, b]) for b in range(1, batch))
    _assert_rate((c1 == c0).float().mean().item(), zc, c0.numel())
    # c keeps c_0 through 3 steps only if zoned out at each: zc³ with a new mask per step (zc if held).
    _assert_rate((c3 == c0).float().mean().item(), zc ** 3, c0.numel())


@pytest.mark.parametrize("perturb_ih", [False, True])
def test_weight_drop_mask_rate_and_scaling(perturb_ih):
    torch.manual_seed(11)
    p, hidden = 0.4, 16
    layer = LSTMLayer(hidden, hidden)
    reg = _reg("weight_drop", weight_p=p, perturb_ih=perturb_ih)
    dropped = {"hh": [], "ih": []}
    for _ in range(4):
        noise = reg.layer_noise(layer, 3, STEPS)
        assert noise.flip_hh is None and noise.flip_ih is None
        for key, got, w in (("hh", noise.weight_hh, layer.weight_hh), ("ih", noise.weight_ih, layer.weight_ih)):
            if key == "ih" and not perturb_ih:
                assert got is w
                continue
            drop = got == 0
            torch.testing.assert_close(got[~drop], (w / (1 - p))[~drop])
            dropped[key].append(drop.flatten())
    for key in ("hh", "ih") if perturb_ih else ("hh",):
        mask = torch.cat(dropped[key])
        _assert_rate(mask.float().mean().item(), p, mask.numel())


@pytest.mark.parametrize("name, options", [("weight_drop", dict(weight_p=0.5)), ("gauss", dict(sigma=1.0))])
def test_shared_weight_noise_is_one_draw_per_call_for_the_whole_batch(name, options):
    torch.manual_seed(12)
    batch, hidden = 5, 6
    layer = LSTMLayer(3, hidden)
    reg = _reg(name, **options)
    # Identical examples: a perturbation shared by the batch gives identical outputs.
    x = torch.randn(STEPS, 1, 3).expand(STEPS, batch, 3)
    state = (torch.zeros(batch, hidden), torch.zeros(batch, hidden))
    first, second = reg.layer_noise(layer, batch, STEPS), reg.layer_noise(layer, batch, STEPS)
    assert first.weight_hh.shape == layer.weight_hh.shape  # one matrix, no batch dimension
    assert not torch.equal(first.weight_hh, second.weight_hh)  # a new draw per forward call
    with torch.no_grad():
        out, _ = layer(x, state, first)
        ref, _ = reference_lstm(layer, x, state, weight_hh=first.weight_hh)
        plain, _ = reference_lstm(layer, x, state)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # the fused kernel uses the drawn weights
    assert (out - plain).abs().max() > 1e-3
    assert torch.equal(out, out[:, :1].expand_as(out))
    # AWD's WeightDrop check: with h_0 = 0, W_hh does not act at step 1, so only later steps differ.
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=1e-6)


# -- registry, configuration and listing ---------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_print_model_shows_the_rates(name):
    text = str(_model(name, **RATES[name]))
    assert f"name={name}" in text
    for key, value in RATES[name].items():
        assert f"{key}={value}" in text


def test_registry_refuses_duplicates_and_nameless_classes():
    class Impostor(NoRegularizer):
        name = "dropout"

    before = dict(REGISTRY)
    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)

    class Nameless(Regularizer):
        pass

    with pytest.raises(ValueError, match="no name"):
        register(Nameless)
    assert REGISTRY == before

    class Fresh(NoRegularizer):
        name = "test_fresh"

    try:
        assert register(Fresh) is Fresh
        assert isinstance(build_regularizer(RegularizerConfig(name="test_fresh")), Fresh)
        with pytest.raises(ValueError, match="already registered"):
            register(Fresh)
    finally:
        REGISTRY.pop("test_fresh", None)


def test_unknown_regularizer_name_is_a_user_error():
    with pytest.raises(UserError, match="regularizer.name='drop_connect'.*weight_drop"):
        build_regularizer(RegularizerConfig(name="drop_connect"))
    with pytest.raises(UserError):
        LanguageModel(MODEL, RegularizerConfig(name="drop_connect"), VOCAB)


@pytest.mark.parametrize("name, key, value", [
    ("weight_drop", "zoneout_c", 0.1), ("weight_drop", "resample_per_step", True), ("none", "hidden_p", 0.2),
    ("gauss", "weight_p", 0.5), ("wd_flipout", "sigma", 1.0), ("variational", "cell_p", 0.1),
    ("zoneout", "perturb_ih", True), ("dropout", "sigma", 0.5)])
def test_option_not_used_by_the_regularizer_is_a_user_error(name, key, value):
    with pytest.raises(UserError, match=f"regularizer.{key} is not used by regularizer '{name}'"):
        build_regularizer(RegularizerConfig(name=name, **{key: value}))


@pytest.mark.parametrize("name", NAMES)
def test_every_regularizer_accepts_its_own_options(name):
    reg = build_regularizer(RegularizerConfig(name=name, **RATES[name]))
    assert set(RATES[name]) <= set(reg.options) | {"embed_p", "input_p", "between_p", "output_p"}


def test_list_regularizers_prints_every_name(capsys):
    assert train_main(["--list-regularizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines if line.strip()) == sorted(REGISTRY)
    for name, cls in REGISTRY.items():
        assert any(line.startswith(name) and cls.summary in line for line in lines)
