"""lm.nn.RegularizedLSTM as a drop-in torch.nn.LSTM: shapes, state dicts, convert(), eval parity with
nn.LSTM for every regularizer's deterministic form, per-example vs shared noise in training, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lm.config import ModelConfig, RegularizerConfig
from lm.errors import UserError
from lm.nn import RegularizedLSTM, convert
from lm.nn.model import LanguageModel
from lm.regularizers import REGISTRY
from lm.regularizers.bayes import gaussian_kl

NAMES = list(REGISTRY)
PER_EXAMPLE = {"wd_flipout", "gauss_flipout", "bbb_flipout", "variational", "semeniuta", "zoneout", "dropout"}
SHARED = {"weight_drop", "gauss", "bbb"}  # one draw for the whole batch
H = 16  # units: masks of two examples coincide with probability about 0.6^H
RATES = {"bbb": {"init_sigma": 0.1}, "bbb_flipout": {"init_sigma": 0.1}}  # noise well above float rounding


def _pair(name: str, rates: dict | None = None, **kw) -> tuple[nn.LSTM, RegularizedLSTM]:
    """An ``nn.LSTM(5, H, **kw)`` and a RegularizedLSTM of the same configuration with its weights."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, H, **kw)
    layer = RegularizedLSTM(5, H, **kw, regularizer=name, **(RATES.get(name, {}) if rates is None else rates))
    layer.load_state_dict(ref.state_dict())
    return ref, layer


def _zoneout_reference(ref: nn.LSTM, x: torch.Tensor, zc: float, zh: float) -> torch.Tensor:
    """One-layer LSTM with zoneout's expectation ``z·old + (1-z)·new`` (Krueger et al. 2016), via LSTMCell."""
    cell = nn.LSTMCell(ref.input_size, ref.hidden_size)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
    h = c = x.new_zeros(x.size(1), ref.hidden_size)
    outs = []
    for xt in x:
        h_new, c_new = cell(xt, (h, c))
        h, c = torch.lerp(h_new, h, zh), torch.lerp(c_new, c, zc)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "zoneout"])
@pytest.mark.parametrize("kw", [dict(num_layers=2, batch_first=True, bidirectional=True)])
def test_eval_is_nn_lstm(name, kw):
    ref, layer = _pair(name, **kw, dropout=0.3)
    ref.eval(), layer.eval()
    x = torch.randn(3, 4, 5)
    hx = (torch.randn(ref.num_layers * (1 + ref.bidirectional), 3 if kw.get("batch_first") else 4, H),) * 2
    with torch.no_grad():
        for args in ((x,), (x, hx), (x[0],)):  # default state, given state, unbatched (T, in)
            want, (wh, wc) = ref(*args)
            got, (h, c) = layer(*args)
            for a, b in ((got, want), (h, wh), (c, wc)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_zoneout_eval_is_its_expectation():
    ref, layer = _pair("zoneout", dict(zoneout_c=0.3, zoneout_h=0.1))
    x = torch.randn(7, 3, 5)
    with torch.no_grad():
        got, _ = layer.eval()(x)
        torch.testing.assert_close(got, _zoneout_reference(ref, x, 0.3, 0.1), rtol=0, atol=1e-6)
        assert (got - ref(x)[0]).abs().max() > 1e-3  # not the plain LSTM


def _two_identical(layer: RegularizedLSTM):
    """Input, output and per-example gradients (w.r.t. weight_hh_l0) of a batch of two equal examples.
    The window kernel takes one backward per forward, so the forward runs again (same seed, same
    noise) for the second example's gradient."""
    x = torch.randn(6, 1, 5).expand(6, 2, 5).contiguous()
    grads = []
    for n in range(2):
        torch.manual_seed(1)
        out, _ = layer.train()(x)
        grads.append(torch.autograd.grad(out[:, n].pow(2).sum(), layer.weight_hh_l0)[0])
    return x, out.detach(), grads


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE | SHARED))
def test_per_example_noise_in_training(name):
    """Per-example regularizers give two identical examples different outputs and gradients; the
    shared ones (one draw per sequence for the whole batch) give them the same ones."""
    _, layer = _pair(name)
    x, out, (g0, g1) = _two_identical(layer)
    if name in PER_EXAMPLE:
        assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3
        assert (g0 - g1).abs().max() > 1e-4
    else:
        torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=0)
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    with torch.no_grad():  # the noise is live: training differs from eval
        assert (out - layer.eval()(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["wd_flipout", "weight_drop"])
def test_a_new_draw_per_sequence(name):
    """Every forward call (one sequence) draws new noise; within it, flipout signs are held
    (default) or redrawn every step (``resample_per_step``)."""
    _, layer = _pair(name)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        a, b = layer.train()(x)[0], layer(x)[0]
    assert (a - b).abs().max() > 1e-3


# -- state dicts, convert ---------------------------------------------------------------------

def test_state_dict_is_nn_lstms():
    ref, layer = _pair("wd_flipout", num_layers=2, bidirectional=True)
    assert list(layer.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in ref.named_parameters()]
    back = nn.LSTM(5, H, num_layers=2, bidirectional=True)
    back.load_state_dict(layer.state_dict())  # and the other way round
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), ref.parameters()))
    no_bias = RegularizedLSTM(5, H, bias=False, regularizer="none")
    assert list(no_bias.state_dict()) == list(nn.LSTM(5, H, bias=False).state_dict())


def test_bayesian_state_dict_adds_its_keys_and_takes_a_plain_one():
    ref, layer = _pair("bbb_flipout", dict(perturb_ih=True))
    assert set(layer.state_dict()) - set(ref.state_dict()) == {"regularizer.rho_hh.0", "regularizer.rho_ih.0"}
    rho = layer.regularizer.rho_hh[0].detach().clone()
    with torch.no_grad():
        ref.weight_hh_l0.add_(1)
    layer.load_state_dict(ref.state_dict())  # a plain nn.LSTM's: the posterior scales keep their values
    assert torch.equal(layer.weight_hh_l0, ref.weight_hh_l0) and torch.equal(layer.regularizer.rho_hh[0], rho)
    twin = RegularizedLSTM(5, H, regularizer="bbb_flipout", perturb_ih=True)
    twin.load_state_dict(layer.state_dict())  # its own, with the scales
    assert torch.equal(twin.regularizer.rho_hh[0], rho)


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.body = nn.Sequential(nn.LSTM(5, H, batch_first=True, num_layers=2, dropout=0.2))
        self.head = nn.Linear(H, 3)

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens))[0])


def test_convert_in_place_keeps_weights_and_eval_outputs():
    torch.manual_seed(0)
    model = _Tagger().double().eval()
    tokens = torch.randint(0, 11, (3, 7))
    with torch.no_grad():
        want = model(tokens)
    assert convert(model, "gauss_flipout", sigma=0.5) is model
    rnn = model.body[0]
    assert isinstance(rnn, RegularizedLSTM) and rnn.batch_first and rnn.num_layers == 2 and rnn.dropout == 0.2
    assert rnn.weight_hh_l0.dtype == torch.float64 and not rnn.training and rnn.regularizer.cfg.sigma == 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, rtol=0, atol=1e-12)
        assert (model.train()(tokens) - want).abs().max() > 1e-3
    lone = convert(nn.LSTM(5, H), "variational")
    assert isinstance(lone, RegularizedLSTM) and lone.regularizer.cfg.hidden_p == 0.25


def test_weights_stay_linked_after_moves_and_assign():
    _, layer = _pair("none")
    layer = layer.double().eval()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    ref = nn.LSTM(5, H).double()
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[0], ref(x)[0])
    fresh = nn.LSTM(5, H).double()
    layer.load_state_dict(fresh.state_dict(), assign=True)  # new Parameter objects: the layers follow
    torch.testing.assert_close(layer(x)[0], fresh(x)[0])
    twin = copy.deepcopy(layer)
    assert twin.layers[0].rnn.weight_hh_l0 is twin.weight_hh_l0 is not layer.weight_hh_l0
    torch.testing.assert_close(twin(x)[0], fresh(x)[0])
    with pytest.raises(UserError, match="plain tensor"):
        torch.func.functional_call(layer, {"weight_hh_l0": torch.zeros(4 * H, H, dtype=torch.float64)}, (x,))


def test_dropout_between_layers_is_nn_lstms():
    _, layer = _pair("none", num_layers=2, dropout=0.5)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        assert (layer.train()(x)[0] - layer.eval()(x)[0]).abs().max() > 1e-3
        _, plain = _pair("none", num_layers=2)
        torch.testing.assert_close(plain.train()(x)[0], plain.eval()(x)[0], rtol=0, atol=0)


# -- the Bayesian variants' KL ---------------------------------------------------------------

def test_kl_is_the_closed_form_and_differentiable():
    layer = RegularizedLSTM(5, H, num_layers=2, regularizer="bbb", init_sigma=0.07, prior_sigma=0.2)
    want = sum(gaussian_kl(w, torch.full_like(w, 0.07), 0.2) for w in (layer.weight_hh_l0, layer.weight_hh_l1))
    kl = layer.kl()
    torch.testing.assert_close(kl, want, rtol=1e-5, atol=0)
    kl.backward()
    assert layer.regularizer.rho_hh[0].grad.abs().sum() > 0 and layer.weight_hh_l1.grad.abs().sum() > 0
    with pytest.raises(UserError, match="Bayesian regularizer"):
        RegularizedLSTM(5, H, regularizer="wd_flipout").kl()


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(regularizer="flipout"), r"regularizer.name='flipout' is invalid: expected one of none, "),
    (dict(regularizer="wd_flipout", hidden_p=0.3), r"regularizer.hidden_p is not used by regularizer 'wd_flipout'"),
    (dict(regularizer="wd_flipout", weight_p=0.3), r"needs a perturbation symmetric about zero"),
    (dict(regularizer="variational", hidden_p=1.5), r"regularizer.hidden_p=1.5 is invalid: expected a probability"),
    (dict(regularizer="wd_flipout", wieght_p=0.5), r"option 'wieght_p' is unknown"),
    (dict(regularizer="bbb", kl_scale=0.1), r"kl_scale is read by the language model's trainer"),
    (dict(proj_size=3), r"proj_size=3 is not supported"),
    (dict(dropout=1.0), r"dropout=1.0 is invalid"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match) as e:
        RegularizedLSTM(5, H, **kw)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors():
    layer = RegularizedLSTM(5, H, num_layers=2)
    x = torch.randn(4, 3, 5)
    packed = pack_padded_sequence(x, torch.tensor([4, 3, 2]))
    for args, match in (((packed,), "does not take a PackedSequence: pass the padded batch"),
                        ((torch.randn(4, 3, 6),), "Expected 5, got 6"),
                        ((torch.randn(2, 4, 3, 5),), "2 \\(unbatched\\) or 3 dimensions"),
                        ((x, (torch.zeros(1, 3, H), torch.zeros(1, 3, H))), r"expected h_0 of shape \(2, 3, 16\)")):
        with pytest.raises(UserError, match=match) as e:
            layer(*args)
        assert "\n" not in str(e.value)


# -- the language model is built on it --------------------------------------------------------

def test_language_model_stack_is_this_module_and_loads_per_layer_keys():
    cfg = ModelConfig(emb_size=6, hidden_size=8, num_layers=3, tie_weights=True)
    torch.manual_seed(0)
    model = LanguageModel(cfg, RegularizerConfig(name="bbb"), 11)
    assert isinstance(model.lstm, RegularizedLSTM) and model.lstm.layer_sizes == [8, 8, 6]
    assert [n for n, _ in model.named_parameters()][-4:] == ["decoder.bias", "regularizer.rho_hh.0",
                                                             "regularizer.rho_hh.1", "regularizer.rho_hh.2"]
    # the per-layer names of earlier checkpoints: layers.K.rnn.weight_ih_l0 for lstm.weight_ih_lK
    old = {(f"layers.{k[len('lstm.') :].rsplit('_l', 1)[1]}.rnn.{k[len('lstm.') :].rsplit('_l', 1)[0]}_l0"
            if k.startswith("lstm.") else k): v + 1 for k, v in model.state_dict().items()}
    assert "layers.2.rnn.weight_hh_l0" in old
    again = LanguageModel(cfg, RegularizerConfig(name="bbb"), 11)
    again.load_state_dict(old)
    assert torch.equal(again.lstm.weight_hh_l2, old["layers.2.rnn.weight_hh_l0"])
