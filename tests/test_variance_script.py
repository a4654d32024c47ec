"""bench/variance.py: the tiny mode runs in seconds and writes the documented JSON and PNG."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lm.analysis import grad_variance, stats
from lm.config import ModelConfig, RegularizerConfig
from lm.regularizers import build_regularizer

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_variance", ROOT / "bench" / "variance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def variance():
    return _load_script()


@pytest.fixture(scope="module")
def tiny_result(variance, tmp_path_factory):
    out = tmp_path_factory.mktemp("variance")
    threads = torch.get_num_threads()
    try:
        assert variance.main(["--tiny", "--out", str(out), "--json", str(out / "v.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "v.json").read_text())


def _check_series(d: dict, k: int) -> None:
    for key in ("variance", "ci_low", "ci_high"):
        assert len(d[key]) == k and all(math.isfinite(v) for v in d[key])
    assert all(v > 0 for v in d["variance"])
    assert all(lo <= v <= hi for lo, v, hi in zip(d["ci_low"], d["variance"], d["ci_high"]))
    for key in ("slope", "slope_upper_half", "a", "b"):
        assert isinstance(d[key], float) and math.isfinite(d[key])


def test_tiny_json_shape(tiny_result):
    out, r = tiny_result
    assert r["ns"] == [1, 2, 4, 8]
    assert r["gates"] == ["i", "f", "g", "o"]
    assert set(r["schemes"]) == {"gauss", "gauss_flipout", "weight_drop", "wd_flipout"}
    for name, s in r["schemes"].items():
        assert s["perturbation"] == ("flipout" if "flipout" in name else "shared")
        assert s["family"] in ("gauss", "dropconnect")
        _check_series(s, len(r["ns"]))
        assert set(s["gates"]) == set(r["gates"])
        for gate in s["gates"].values():
            _check_series(gate, len(r["ns"]))
    assert set(r["comparison"]) == {"gauss", "dropconnect"}
    assert len(r["comparison"]["gauss"]["shared_over_flipout"]) == len(r["ns"])
    c = r["config"]
    assert c["reps"] % c["groups"] == 0 and c["data_mode"] == "fixed" and c["layer"] == 1
    for s in r["schemes"].values():
        assert len(s["group_values"]) == c["groups"] and len(s["group_values"][0]) == len(r["ns"])
        assert 0 < s["n1_grad_norm_sq"]["largest_share"] <= 1
    assert r["model"]["source"] == "trained" and r["model"]["hidden"] == 8
    assert (out / "variance.png").stat().st_size > 1000


def test_tiny_resample_subset(variance, tmp_path):
    """--data-mode resample with two schemes: only that family is compared."""
    threads = torch.get_num_threads()
    try:
        argv = ["--tiny", "--data-mode", "resample", "--schemes", "weight_drop,wd_flipout", "--out", str(tmp_path)]
        assert variance.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "variance.json").read_text())
    assert r["config"]["data_mode"] == "resample"
    assert set(r["schemes"]) == {"weight_drop", "wd_flipout"} and set(r["comparison"]) == {"dropconnect"}


def test_frozen_perturbation_is_shared_and_redrawn():
    """Within a repetition every forward call sees the same ΔŴ = W ∘ ξ; redraw() gives a new one."""
    for name in grad_variance.CLASSIC:
        options = grad_variance.SCHEMES[name][2]
        reg = build_regularizer(RegularizerConfig(name=name, **options))
        grad_variance.check_multiplicative(reg, (6, 3))
        w = torch.randn(6, 3, requires_grad=True)
        with grad_variance.frozen_base_perturbation(reg) as redraw:
            a, b = reg.base_perturbation(w), reg.base_perturbation(w)
            assert torch.equal(a, b)
            redraw()
            assert not torch.equal(a, reg.base_perturbation(w))
            a.sum().backward()
            assert w.grad is not None  # gradients still flow through W
        assert "base_perturbation" not in vars(reg)  # the override is removed afterwards


def test_frozen_bbb_noise_is_shared_and_redrawn_and_reaches_mu_and_rho():
    """bbb: ε is frozen within a repetition (same ΔŴ = σ ∘ ε each call), redrawn by redraw()."""
    torch.manual_seed(0)
    model = grad_variance.LanguageModel(ModelConfig(input="onehot", hidden_size=4, num_layers=1),
                                        RegularizerConfig(name="bbb"), 5)
    reg = grad_variance.bayes_regularizer(model, "bbb_flipout")
    layer = model.layers[0]
    with grad_variance.frozen_base_perturbation(reg.train()) as redraw:
        a, b = reg.layer_noise(layer, 3, 2).flip_hh.delta, reg.layer_noise(layer, 3, 2).flip_hh.delta
        assert torch.equal(a, b)
        redraw()
        c = reg.layer_noise(layer, 3, 2).flip_hh.delta
        assert not torch.equal(a, c)
        (grad,) = torch.autograd.grad(c.sum(), reg.rho_hh[0])
        assert grad.abs().min() > 0  # ρ still gets its gradient through σ
    assert "draw_eps" not in vars(reg)


def test_bbb_rho_is_taken_from_a_bbb_trained_model():
    torch.manual_seed(0)
    model = grad_variance.LanguageModel(ModelConfig(input="onehot", hidden_size=4, num_layers=1),
                                        RegularizerConfig(name="bbb"), 5)
    with torch.no_grad():
        model.regularizer.rho_hh[0].uniform_(-3, -1)
    reg = grad_variance.bayes_regularizer(model, "bbb")
    assert torch.equal(reg.rho_hh[0], model.regularizer.rho_hh[0])


def test_tiny_bbb_schemes(variance, tmp_path):
    """μ and ρ of bbb against bbb_flipout, on a bbb-trained tiny model: two families compared."""
    threads = torch.get_num_threads()
    try:
        argv = ["--tiny", "--train-regularizer", "bbb", "--schemes", "bbb,bbb_flipout,bbb_rho,bbb_flipout_rho",
                "--out", str(tmp_path)]
        assert variance.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "variance.json").read_text())
    assert set(r["comparison"]) == {"bbb_mu", "bbb_rho"}
    for name, s in r["schemes"].items():
        assert s["family"] == ("bbb_rho" if name.endswith("_rho") else "bbb_mu")
        _check_series(s, len(r["ns"]))
    assert r["model"]["config"]["regularizer"]["name"] == "bbb"


def test_fit_recovers_one_over_n():
    ns = [1, 2, 4, 8, 16, 32]
    f = stats.fit(ns, [3.0 / n for n in ns])
    assert f["slope"] == pytest.approx(-1.0) and f["b"] == pytest.approx(3.0) and abs(f["a"]) < 1e-9
    flat = stats.fit(ns, [1.0 + 3.0 / n for n in ns])
    assert flat["a"] == pytest.approx(1.0) and flat["b"] == pytest.approx(3.0) and flat["slope"] > -1
    assert grad_variance.batch_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert grad_variance.batch_sizes(6) == [1, 2, 4, 6]


def test_bad_arguments_are_user_errors(variance):
    from lm.errors import UserError

    with pytest.raises(UserError, match="--schemes"):
        variance.parse_args(["--tiny", "--schemes", "gauss,nope"])
    with pytest.raises(UserError, match="--reps"):
        variance.parse_args(["--tiny", "--reps", "3", "--groups", "2"])


def test_default_output_goes_to_runs_not_docs(variance, tmp_path, monkeypatch):
    """Without --out/--plot/--json everything lands in runs/variance; the tracked docs/ figure is untouched."""
    docs_png = ROOT / "docs" / "measurements" / "variance" / "variance.png"
    before = docs_png.stat().st_mtime_ns if docs_png.exists() else None
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert variance.main(["--tiny"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "runs" / "variance"
    assert (out / "variance.json").is_file() and (out / "variance.png").is_file()
    assert (docs_png.stat().st_mtime_ns if docs_png.exists() else None) == before


def test_readme_variance_commands_leave_docs_alone():
    """The README's variance command is what a new user runs: it must not replace the tracked figure."""
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")[1::2]  # the contents of the fenced code blocks
    commands = [line for block in blocks for line in block.splitlines() if "bench/variance.py" in line]
    assert commands, "README has no bench/variance.py command"
    for line in commands:
        assert "docs/" not in line.split("#")[0], line
