"""CUDA-graph windows (lm.train.graphs) and the noise tape (lm.nn.tape), on a CPU with capture off.

The static buffers, length buckets, redraws and fallbacks are the same code with or without
capture; without it the "graph" is the forward run on the static buffers. A training with graphs
must then consume the random streams exactly as an eager one: every weight equal, bit for bit.
The capture itself is checked on a GPU (marked ``cuda``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lm.config.load import load_config
from lm.data.batching import sample_window_length
from lm.nn.tape import Tape, TapeMismatch, drawn
from lm.train import graphs
from lm.train.trainer import Trainer
from tests.tiny import TINY


def test_fixed_bptt_captures_its_length():
    assert graphs.likely_lengths(35, False, 8) == [35]


def test_likely_lengths_match_the_sampler():
    """The top lengths by the formula are the most frequent of 20,000 draws, and their total
    frequency agrees within 4 binomial standard deviations."""
    lengths = graphs.likely_lengths(70, True, 8)
    assert sorted(lengths) == list(range(66, 74)), lengths
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    draws = [sample_window_length(70, gen) for _ in range(n)]
    covered = sum(d in lengths for d in draws) / n
    expected = 0.95 * (0.5 * (math.erf(4 / (5 * math.sqrt(2))) - math.erf(-4 / (5 * math.sqrt(2)))))
    assert abs(covered - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (covered, expected)


def test_tape_redraws_what_the_forward_would_draw():
    def forward():
        a = drawn(lambda: torch.rand(3, 4), (3, 4))
        b = drawn(lambda: torch.empty(5).bernoulli_(0.3), (5,))
        return a, b

    tape = Tape()
    torch.manual_seed(0)
    with tape.active("record"):
        recorded = forward()
    torch.manual_seed(1)
    eager = forward()  # no tape: draws
    torch.manual_seed(1)
    tape.refill()
    with tape.active("replay"):
        replayed = forward()
    for r, e, buf in zip(replayed, eager, recorded):
        assert r is buf  # the static buffer itself, refilled in place
        torch.testing.assert_close(r, e, rtol=0, atol=0)


def test_tape_refuses_a_different_forward():
    tape = Tape()
    with tape.active("record"):
        drawn(lambda: torch.rand(2), (2,))
    with pytest.raises(TapeMismatch, match="shape"), tape.active("replay"):
        drawn(lambda: torch.rand(3), (3,))
    with pytest.raises(TapeMismatch, match="more than the 1 recorded"), tape.active("replay"):
        drawn(lambda: torch.rand(2), (2,))
        drawn(lambda: torch.rand(2), (2,))
    with pytest.raises(TapeMismatch, match="drew 0 of the 1"), tape.active("replay"):
        pass


def test_a_failed_capture_falls_back_to_eager_for_that_length(monkeypatch):
    """capture=True on a CPU: the capture raises, the length runs eagerly from then on, and the reason is kept."""
    calls = []

    def step(x, y, state):
        calls.append(x.size(0))
        return x.sum(), state

    runner = graphs.WindowGraphs(step, [], [4], capture=True)
    for _ in range(3):
        runner(torch.ones(4, 2), torch.ones(4, 2), [])
    runner(torch.ones(3, 2), torch.ones(3, 2), [])
    assert calls == [4, 4, 4, 3]
    assert 4 in runner.failed and runner.counts == {"recorded": 1, "eager": 3}


def test_reasons_for_eager():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA device" in graphs.why_not(cpu, "fp32", False, "none", 1, None)
    assert "fp16" in graphs.why_not(cuda, "fp16", False, "none", 1, None)
    assert "AR/TAR" in graphs.why_not(cuda, "bf16", True, "none", 1, None)
    assert "KL weight" in graphs.why_not(cuda, "fp32", False, "bbb_flipout", 1, None)
    assert "several processes" in graphs.why_not(cuda, "fp32", False, "none", 2, None)
    assert graphs.why_not(cuda, "bf16", False, "wd_flipout", 1, None) is None
    assert graphs.why_not(cpu, "fp32", False, "none", 1, False) is None  # capture switched off: the tests' path


def _trainer(tmp_path, name: str, graphed: bool, variable: bool = False, device: str = "cpu", **reg) -> Trainer:
    base = {k: dict(v) for k, v in TINY.items()}
    base["regularizer"] = {"name": name, **reg}
    base["model"].update(hidden_size=8, emb_size=8)
    base["data"]["train_tokens"] = 1200
    steps = 16 if variable else 6  # variable: enough windows that some bucketed length comes back (a replay)
    base["train"].update(max_steps=steps, eval_every_steps=steps, bptt=7, variable_bptt=variable, progress=False,
                         cuda_graphs=graphed, cuda_graph_lengths=3, threads=1, device=device)
    base["eval"].update(max_tokens=200, bptt=20)
    return Trainer(load_config(base=base), tmp_path / ("graphed" if graphed else "eager"))


CASES = {  # every kind of draw: dropouts (per element and locked), embedding rows, masks, ΔŴ, signs
    "wd_flipout": {"weight_p": 0.5, "embed_p": 0.1, "input_p": 0.2, "output_p": 0.3, "resample_per_step": True},
    "zoneout": {"zoneout_c": 0.5, "zoneout_h": 0.05, "between_p": 0.1},
    "variational": {"hidden_p": 0.25, "input_p": 0.2},  # locked (per-window) dropout masks
    "semeniuta": {"cell_p": 0.25},
    "dropout": {"input_p": 0.2, "output_p": 0.2},  # per-element masks (not locked), nn.LSTM
    "gauss": {"sigma": 1.0},
}


@pytest.mark.parametrize("variable", [False, True], ids=["fixed", "variable"])
@pytest.mark.parametrize("name", list(CASES))
def test_graphed_training_equals_eager(ptb_dir, tmp_path, monkeypatch, name, variable):
    monkeypatch.setattr(graphs, "CAPTURE", False)
    torch.set_num_threads(1)
    eager = _trainer(tmp_path, name, False, variable, **CASES[name])
    assert eager.fit() == 0 and not eager.windows.enabled
    graphed = _trainer(tmp_path, name, True, variable, **CASES[name])
    assert graphed.windows.enabled
    assert graphed.fit() == 0
    counts = graphed.windows.counts
    assert counts["recorded"] >= 1 and counts["replayed"] >= 1, counts
    if variable:
        assert counts["eager"] >= 1, counts  # lengths without a graph
    for (key, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    assert graphed.best_val == eager.best_val


def test_the_summary_says_why_windows_run_eagerly(ptb_dir, tmp_path, capsys):
    trainer = _trainer(tmp_path, "zoneout", True, zoneout_c=0.5)
    assert not trainer.windows.enabled
    assert "graphs      off: capture needs a CUDA device (this run: cpu)" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("variable", [False, True], ids=["fixed", "variable"])
def test_captured_training_matches_eager_on_cuda(ptb_dir, tmp_path, variable):
    """Real capture: the same weights as eager up to float rounding (cuBLAS may pick other kernels)."""
    eager, graphed = (_trainer(tmp_path, "wd_flipout", g, variable, "cuda", **CASES["wd_flipout"]) for g in (False, True))
    assert eager.fit() == 0 and graphed.fit() == 0
    assert graphed.windows.counts["captured"] >= 1, (graphed.windows.counts, graphed.windows.failed)
    for (key, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_likely_lengths_with_a_cap_give_the_cap_the_tail():
    """With train.variable_bptt_max the cap collects every longer draw: with a cap at the mean it is
    the single most likely length (P = 0.95 * P(N(70, 5) >= 70) = 0.475), and nothing above it is captured."""
    lengths = graphs.likely_lengths(70, True, 8, longest=70)
    assert lengths[0] == 70 and max(lengths) == 70
    assert graphs.likely_lengths(70, True, 8, longest=100) == graphs.likely_lengths(70, True, 8)
