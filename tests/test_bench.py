"""bench/throughput.py, bench/flipout_gemm.py and bench/profile_step.py run end to end on tiny sizes
and write the documented records; the matmul floor (bench/_floor.py) issues the model's own matmuls."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import sys
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench import _floor

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "size", "device", "train_tokens_per_s", "eval_tokens_per_s", "ratio_vs_nn_lstm", "peak_mem_mb"}


def _load(script: str, register: bool = False):
    """``bench/<script>.py`` as a module (``register``: also in ``sys.modules`` while it loads)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", ROOT / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    yield _load("throughput", register=True)  # its dataclasses look their module up in sys.modules
    sys.modules.pop("bench_throughput", None)


def test_tiny_run_writes_json(throughput, tmp_path, capsys):
    out = tmp_path / "t.json"
    names = ["none", "variational", "zoneout", "wd_flipout"]
    code = throughput.main(["--tiny", "--threads", "1", "--rounds", "1", "--only", ",".join(names),
                            "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert {(r["size"], r["name"]) for r in records} == {(s, n) for s in ("char", "word")
                                                         for n in ["nn_lstm", *names]}
    for r in records:
        assert KEYS <= set(r), r
        assert r["device"] == "cpu"
        assert r["train_tokens_per_s"] > 0 and r["eval_tokens_per_s"] > 0 and r["ratio_vs_nn_lstm"] > 0
        assert r["peak_mem_mb"] > 0 or math.isnan(r["peak_mem_mb"])
    kernels = {r["name"]: r["kernel"] for r in records}
    assert kernels["none"] == "fused" and kernels["variational"] == "window"
    table = capsys.readouterr().out
    assert "| char | fp32 | wd_flipout | window |" in table
    assert "| train ratio (range) | floor | of floor |" in table.splitlines()[0]
    kinds = {"nn_lstm": "nn.LSTM", "none": "fused", "variational": "plain", "zoneout": "plain", "wd_flipout": "flipout"}
    for r in records:
        assert r["floor_kind"] == kinds[r["name"]], r
        for key in ("matmul_floor", "matmuls_only_floor", "layer_floor"):
            assert math.isfinite(r[key]) and r[key] > 0, r
        if r["floor_kind"] in ("nn.LSTM", "fused"):  # nn.LSTM's own kernel: 1 by definition, not measured
            assert r["matmul_floor"] == r["matmuls_only_floor"] == r["layer_floor"] == 1.0 and r["floor_ms"] is None
        else:
            ms = r["floor_ms"]
            assert set(ms) == {"nn_lstm_layers", "window_matmuls", "decoder_matmuls", "nn_lstm_step", "rest"}
            assert all(v > 0 for k, v in ms.items() if k != "rest") and ms["rest"] >= 0
            assert len(r["floor_rounds"]) == r["rounds"]
        lo, hi = min(r["train_ratios"]), max(r["train_ratios"])
        row = (f"| {r['size']} | fp32 | {r['name']} | {r['kernel']} | {r['train_tokens_per_s']:,.0f} | "
               f"{r['ratio_vs_nn_lstm']:.2f} ({lo:.2f}-{hi:.2f}) | {r['matmul_floor']:.2f} | "
               f"{r['ratio_vs_nn_lstm'] / r['matmul_floor']:.2f} |")
        assert row in table, row
    by = {(r["size"], r["name"]): r for r in records}
    for size in ("char", "word"):  # one floor per size and kind, shared by the regularizers of that kind
        assert by[size, "variational"]["matmul_floor"] == by[size, "zoneout"]["matmul_floor"]
        assert by[size, "variational"]["floor_ms"] != by[size, "wd_flipout"]["floor_ms"]


def test_no_floor_leaves_the_columns_empty(throughput, tmp_path, capsys):
    out = tmp_path / "n.json"
    assert throughput.main(["--tiny", "--threads", "1", "--rounds", "1", "--sizes", "char", "--only", "variational",
                            "--no-floor", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["matmul_floor"] for r in records] == [r["matmuls_only_floor"] for r in records] == [None, None]
    assert "| window | " in capsys.readouterr().out and all(r["floor_ms"] is None for r in records)


def test_precisions_compared_in_one_run(throughput, tmp_path, capsys):
    """--precision fp32,bf16: every record says its precision; the bf16-over-fp32 table is printed."""
    out = tmp_path / "p.json"
    code = throughput.main(["--tiny", "--threads", "1", "--rounds", "1", "--sizes", "char",
                            "--only", "none,wd_flipout", "--precision", "fp32,bf16", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert sorted((r["precision"], r["name"]) for r in records) == sorted(
        (p, n) for p in ("fp32", "bf16") for n in ("nn_lstm", "none", "wd_flipout"))
    text = capsys.readouterr().out
    assert "| char | bf16 | wd_flipout | window |" in text
    flip = {r["precision"]: r for r in records if r["name"] == "wd_flipout"}
    assert all(r["floor_kind"] == "flipout" and r["matmul_floor"] > 0 for r in flip.values())
    assert "low precision against fp32" in text and "| char | bf16 | nn_lstm |" in text


def test_unknown_names_are_rejected(throughput):
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--precision", "fp8"])
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--precision", "fp16"])  # CPU: no fp16 nn.LSTM to compare with
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--only", "no_such_regularizer"])
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--sizes", "byte"])


@pytest.fixture(scope="module")
def flipout_gemm():
    return _load("flipout_gemm")


def test_flipout_gemm_probe_prints_a_row_per_size(flipout_gemm, capsys):
    module = flipout_gemm
    assert module.main(["--sizes", "8", "16", "--batch", "2", "--threads", "1", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [8, 16]
    assert all(float(r[2]) >= 0 and float(r[3]) >= 0 and float(r[4]) > 0 for r in rows)  # ms round to 0 at tiny H


def test_flipout_gemm_window_floor_prints_both_ratios(flipout_gemm, capsys):
    module = flipout_gemm
    assert module.main(["--window", "--sizes", "8", "--batch", "2", "--steps", "3", "--input", "5",
                        "--threads", "1", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    backends = ["bmm"] + (["packed"] if module.lstm_matmul.onednn_linear_available() else [])
    assert [r[1] for r in rows] == backends and all(int(r[0]) == 8 for r in rows)
    assert all(float(v) > 0 for r in rows for v in r[5:7])  # the two floors: nn.LSTM time over matmul-only time


def test_flipout_gemm_uses_the_shared_floor(flipout_gemm, throughput):
    """One implementation of the window's matmuls: bench/_floor.py, imported by both scripts."""
    assert flipout_gemm._floor is _floor and not hasattr(flipout_gemm, "window_matmuls")
    assert throughput.model_floors is _floor.model_floors and throughput.interleave is _floor.interleave


def test_step_floor_adds_the_rest_of_the_step_to_both_sides():
    """(L + E) / (M + E): the layer floor without a rest, nearer 1 from either side as it grows;
    a negative rest (S timed below L) is clamped to 0."""
    assert _floor.step_floor(4.0, 2.0, 0.0) == 2.0 and _floor.step_floor(2.0, 4.0, 0.0) == 0.5
    assert _floor.step_floor(4.0, 2.0, 2.0) == 1.5 and _floor.step_floor(2.0, 4.0, 4.0) == 0.75
    fast = [_floor.step_floor(4.0, 2.0, e) for e in (0.0, 1.0, 10.0, 1e6)]
    slow = [_floor.step_floor(2.0, 4.0, e) for e in (0.0, 1.0, 10.0, 1e6)]
    assert fast == sorted(fast, reverse=True) and fast[-1] > 1.0 and math.isclose(fast[-1], 1.0, rel_tol=1e-5)
    assert slow == sorted(slow) and slow[-1] < 1.0 and math.isclose(slow[-1], 1.0, rel_tol=1e-5)
    assert _floor.step_rest(10.0, 4.0) == 6.0 and _floor.step_rest(3.0, 4.0) == 0.0


def test_model_floors_combine_the_rounds_as_documented(monkeypatch):
    """model_floors times the reference model's step in the interleaved rounds and combines the
    per-round timings: E = S - (the mean L around S), clamped; matmul_floor = median (L + E)/(M + E)."""
    seen = {}

    def fake(reference, runs, rounds, device="cpu"):
        seen.update(runs=set(runs), step=runs.get("step"))
        return _floor.Rounds(own={"plain": [2.0, 1.0, 3.0], "decoder": [1.0, 1.0, 1.0], "step": [10.0, 6.0, 1.0]},
                             ref={"plain": [4.0, 3.0, 3.0], "decoder": [4.0, 3.0, 3.0], "step": [4.0, 2.0, 2.0]},
                             ref_all=[4.0, 4.0, 2.0, 3.0, 3.0, 2.0, 3.0, 2.0])
    monkeypatch.setattr(_floor, "interleave", fake)
    step = lambda: None  # noqa: E731
    out = _floor.model_floors(5, 4, 1, 6, 2, 3, onehot=True, kinds=("plain",), rounds=3, step=step)["plain"]
    assert seen == {"runs": {"plain", "decoder", "step"}, "step": step}
    # E per round: 10 - 4 = 6, 6 - 2 = 4, 1 - 2 < 0 -> 0
    assert out["floor_rounds"] == [(4 + 6) / (2 + 6), (3 + 4) / (1 + 4), 3 / 3]
    assert out["matmul_floor"] == 1.25 and out["layer_floor"] == 2.0
    assert out["matmuls_only_floor"] == 5 / 3  # median of (L + D) / (M + D): 5/3, 4/2, 4/4
    assert out["floor_ms"] == {"nn_lstm_layers": 3e3, "window_matmuls": 2e3, "decoder_matmuls": 1e3,
                               "nn_lstm_step": 6e3, "rest": 4e3}
    out = _floor.model_floors(5, 4, 1, 6, 2, 3, onehot=True, kinds=("plain",), rounds=3)["plain"]
    assert seen["runs"] == {"plain", "decoder"}  # without a step: the former definition, no S or E
    assert out["matmul_floor"] == out["matmuls_only_floor"] == 5 / 3 and out["floor_rounds"] == [5 / 3, 2.0, 1.0]
    assert set(out["floor_ms"]) == {"nn_lstm_layers", "window_matmuls", "decoder_matmuls"}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "mkldnn::_reorder_linear_weight"}


def _matmuls(fn) -> collections.Counter:
    """The matmuls (and weight reorders) ``fn`` runs: op, operand shapes and dtypes, with counts."""
    fn()  # first calls probe backends (lm.nn.lstm_matmul.onednn_linear_available): not part of a step
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return collections.Counter((e.name, str(e.input_shapes), str(e.input_dtypes)) for e in prof.events()
                               if e.name in MATMUL_OPS)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("reg", ["variational", "wd_flipout"])
@pytest.mark.parametrize("size", ["char", "word"])
def test_floor_issues_the_models_own_matmuls(throughput, size, reg, precision):
    """The floor's matmuls (every layer's window matmuls plus the decoder's) are exactly those of a
    training forward + backward of the model: same ops, shapes, dtypes and counts."""
    sz = throughput.TINY[size]
    runner = throughput.build_runners(sz, [reg], torch.device("cpu"), throughput.Precision(precision, "cpu"))[reg]
    model, m = runner.model.train(), sz.model

    def step():
        with runner.precision.autocast():
            logits, _ = model(runner.x, runner.state)
        F.cross_entropy(logits.float().flatten(0, 1), runner.y.flatten()).backward()
    dtype = throughput.LOW_DTYPES.get(precision)
    onehot = m.input == "onehot"
    stack = _floor.window_stack(sz.vocab if onehot else m.emb_size, m.hidden_size, m.num_layers, sz.batch, sz.bptt,
                                reg == "wd_flipout", onehot=onehot, dtype=dtype)
    decoder = _floor.decoder_matmuls(m.hidden_size, sz.vocab, sz.batch, sz.bptt, dtype=dtype)
    floor = _matmuls(lambda: (stack(), decoder()))
    assert floor and floor == _matmuls(step)


@pytest.mark.skipif(not _floor.lstm_fused.usable(torch.ones(4, 1), None), reason="the fused C step does not run here")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("flip", [False, True])
def test_floor_of_the_fused_step_times_only_its_matmuls(flip, precision):
    """Where the fused C step runs, it issues its products on operands it wrote in their dtype and
    nothing element-wise around them; so the floor times no per-step op but the products (an add,
    addcmul or cast issued every step would be the torch step's work, not a matmul)."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    if dtype is not None and not _floor.lstm_matmul.onednn_linear_available(dtype):
        pytest.skip("no oneDNN bf16 linear here")
    steps = 12  # more than the per-window casts (weights, input: up to 6)
    run = _floor.window_matmuls(8, 5, 3, steps, flip, dtype=dtype)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    calls = collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)  # ops the floor issues
    per_step = {name for name, n in calls.items() if n >= steps} - {"aten::select", "aten::to"}  # a view; see below
    assert per_step == {"mkldnn::_linear_pointwise"}, calls
    copies = sum(e.name == "aten::_to_copy" for e in prof.events())  # a `to` that casts: per window only
    assert copies < steps, copies


@pytest.fixture(scope="module")
def profile_step():
    return _load("profile_step")


@pytest.mark.parametrize("reg", ["wd_flipout", "nn_lstm"])
def test_profile_step_categories_sum_to_the_step(profile_step, reg, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert profile_step.main(["--tiny", "--reg", reg, "--threads", "1", "--steps", "2", "--warmup", "1",
                              "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    cats = {c["name"]: c for c in rec["categories"]}
    assert list(cats) == list(profile_step.CATEGORIES)
    assert math.isclose(sum(c["ms"] for c in cats.values()), rec["step_ms"], rel_tol=1e-9)
    assert math.isclose(sum(c["share"] for c in cats.values()), 1.0, rel_tol=1e-9)
    assert cats["unattributed"]["ms"] > -0.01 * rec["step_ms"]  # self times never exceed the wall time
    steps = profile_step.TINY["char"].bptt
    if reg == "nn_lstm":
        assert cats["fused LSTM kernel"]["calls"] > 0 and cats["per-step matmuls"]["calls"] == 0
    else:  # one or two products per step forward and backward, whatever the backend
        calls = cats["per-step matmuls"]["calls"]
        assert calls >= 2 * steps and calls % steps == 0 and cats["fused LSTM kernel"]["calls"] == 0
        assert cats["window-wide matmuls"]["calls"] > 0 and cats["noise draws"]["calls"] > 0
    text = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    table = {r[0].strip(): float(r[1]) for r in rows if r[0].strip() in cats or r[0].strip() == "total (wall)"}
    assert abs(sum(v for k, v in table.items() if k != "total (wall)") - table["total (wall)"]) <= 0.005 * len(cats)


def test_profile_step_categories(profile_step):
    """Synthetic events: matmuls split by their left operand's rows, regions by their ancestors."""
    def ev(name, shapes=(), parent=None):
        return SimpleNamespace(name=name, input_shapes=list(shapes), cpu_parent=parent)
    cat = profile_step.category
    assert cat(ev("aten::addmm", [[96], [4, 24], [24, 96]]), batch=4) == "per-step matmuls"
    assert cat(ev("aten::addmm", [[96], [48, 20], [20, 96]]), batch=4) == "window-wide matmuls"
    assert cat(ev("aten::bmm", [[2, 4, 24], [2, 24, 96]]), batch=4) == "per-step matmuls"
    assert cat(ev("aten::linear", [[12, 4, 24], [96, 24], [96]]), batch=4) == "window-wide matmuls"
    assert cat(ev("mkldnn::_linear_pointwise", [[4, 24], [96, 24], [], [], [], []]), batch=4) == "per-step matmuls"
    assert cat(ev("mkldnn::_reorder_linear_weight", [[96, 24], []]), batch=4) == "weight reorders"
    assert cat(ev("aten::uniform_", parent=ev("aten::rand")), batch=4) == "noise draws"
    assert cat(ev("aten::mul_", parent=ev("aten::_foreach_mul_", parent=ev("clip_grad_norm"))),
               batch=4) == "optimizer, clipping, zero_grad"
    assert cat(ev("aten::addcmul_"), batch=4) == cat(ev("mylib::lstm_fused_step"), batch=4) == "element-wise"
    assert cat(ev("_LSTMWindowBackward"), batch=4) == "autograd Functions' self"
    assert cat(ev("aten::mkldnn_rnn_layer_backward"), batch=4) == "fused LSTM kernel"
    assert cat(ev("aten::select"), batch=4) == "rest"


def test_profile_step_compare_before_and_after(profile_step, tmp_path, capsys):
    """--compare profiles the step as before issue 19 (torch step, torch draws, unfused Adam) and
    as now in one process, and restores the defaults afterwards."""
    from lm.nn import fastrand, lstm_fused
    out = tmp_path / "p.json"
    assert profile_step.main(["--tiny", "--reg", "zoneout", "--threads", "1", "--steps", "2", "--warmup", "1",
                              "--compare", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["before"]["torch_step"] is True and rec["after"]["torch_step"] is False
    for r in rec.values():
        assert math.isclose(sum(c["ms"] for c in r["categories"]), r["step_ms"], rel_tol=1e-9)
    before = {c["name"]: c["calls"] for c in rec["before"]["categories"]}
    after = {c["name"]: c["calls"] for c in rec["after"]["categories"]}
    if lstm_fused.library() is not None:  # the fused step issues far fewer element-wise ops
        assert after["element-wise"] < before["element-wise"] / 2
    assert "| unprofiled step |" in capsys.readouterr().out
    assert lstm_fused.FUSED is None and fastrand.FAST is None
    assert profile_step.models.fused_adam_ok([torch.nn.Parameter(torch.zeros(1))])


def test_fused_step_bench_runs(tmp_path, capsys):
    module = _load("fused_step")
    out = tmp_path / "f.json"
    assert module.main(["--tiny", "--sizes", "char", "--only", "zoneout,gauss", "--threads", "1",
                        "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == ["zoneout", "gauss"]
    for r in records:
        assert set(r["ms"]) == set(module.MODES) and all(v > 0 for v in r["ms"].values())
        assert r["speedup"]["torch"] == 1.0 and r["projection_speedup"] > 0
    assert "| char | fp32 | zoneout | window |" in capsys.readouterr().out
    from lm.nn import fastrand, lstm, lstm_fused
    assert lstm_fused.FUSED is None and fastrand.FAST is None and lstm.WINDOW_PROJECTS is True


def test_c_step_bench_runs(tmp_path, capsys):
    """bench/c_step.py times the fused C step of a window with its products replaced, forward and
    backward, and puts the real products back afterwards."""
    from lm.nn import lstm_fused
    if lstm_fused.library() is None:
        pytest.skip("fused step unavailable")
    module = _load("c_step")
    real = lstm_fused.products
    out = tmp_path / "c.json"
    assert module.main(["--tiny", "--sizes", "char", "--precision", "fp32", "--threads", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["size"], r["kind"]) for r in records] == [("char", "plain"), ("char", "flipout")]
    assert all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in records)
    assert "| char | fp32 | flipout |" in capsys.readouterr().out
    assert lstm_fused.products is real and lstm_fused.POOL.bytes() == 0


def test_peers_tiny(tmp_path, capsys):
    """bench/peers.py on a tiny size: a record per layer, what each computes, the peers that are not
    installed reported as skipped (CI installs neither)."""
    peers = _load("peers")
    out = tmp_path / "p.json"
    assert peers.main(["--tiny", "--threads", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == list(peers.WHAT)
    for r in records:
        assert r["per"] and r["resampled"] and r["machine"]
        if "skipped" not in r:
            assert r["train_tokens_per_s"] > 0 and r["speed_vs_nn_lstm"] > 0
    assert all("skipped" not in r for r in records if r["name"].startswith(("ours_", "nn_")))
    table = capsys.readouterr().out
    assert "| ours_wd_flipout |" in table and "| bayesian_torch |" in table
    assert peers.main(["--tiny", "--only", "nope"]) == 2


def test_precision_ab_prints_a_ratio_per_regularizer(tmp_path, capsys):
    """bench/precision_ab.py alternates fp32 and bf16 steps of one model and records the ratio, the
    plan (what ran in which dtype) and the machine class of each regularizer."""
    ab = _load("precision_ab")
    out = tmp_path / "ab.json"
    assert ab.main(["--tiny", "--rounds", "2", "--threads", "1", "--only", "none,zoneout", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == ["none", "zoneout"]
    for r in records:
        assert len(r["ratios"]) == 2 and r["bf16_speed_over_fp32"] > 0 and r["plan"].startswith("bf16: ")
        assert r["machine"]["isa"]
    assert "zoneout: bf16 speed / fp32 speed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ab.main(["--tiny", "--only", "nope"])


def test_runs_repeat_the_table_and_give_medians_over_the_runs(throughput, tmp_path, capsys):
    """--runs 3: three tables, every record with its run, and the medians table from those records."""
    out = tmp_path / "r.json"
    assert throughput.main(["--tiny", "--threads", "1", "--rounds", "1", "--sizes", "char", "--only", "zoneout",
                            "--runs", "3", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert sorted((r["run"], r["name"]) for r in records) == [(k, n) for k in (1, 2, 3) for n in ("nn_lstm", "zoneout")]
    text = capsys.readouterr().out
    assert "run 3 of 3" in text and "medians over 3 runs" in text
    zone = [r for r in records if r["name"] == "zoneout"]
    shares = sorted(r["ratio_vs_nn_lstm"] / r["matmul_floor"] for r in zone)
    ratios = sorted(r["ratio_vs_nn_lstm"] for r in zone)
    row = (f"| char | fp32 | zoneout | window | 3 | {statistics.median(r['train_tokens_per_s'] for r in zone):,.0f} "
           f"| {ratios[1]:.2f} ({ratios[0]:.2f}-{ratios[2]:.2f}) "
           f"| {statistics.median(r['matmul_floor'] for r in zone):.2f} | {shares[1]:.2f} ({shares[0]:.2f}-{shares[2]:.2f}) |")
    assert row in text, row
    machine = records[0]["machine"]
    assert {"cpu", "isa", "bf16_units", "thp"} <= set(machine) and set(machine["thp"]) == {"alloc", "system"}
    with pytest.raises(SystemExit):
        throughput.main(["--tiny", "--runs", "0"])
