"""GPU checks (marker ``cuda``; skipped without CUDA). ``scripts/gpu_check.sh`` runs them first.

* every regularizer's window kernel against ``reference_loop`` on CUDA in float32 (TF32 off), and
  every regularizer's layer in bf16 against float32 (tolerance: tests/test_precision.py);
* no host synchronisation inside the recurrence (``torch.cuda.set_sync_debug_mode("error")``);
* two training steps of each paper config on the GPU, in fp32 and bf16;
* a checkpoint written on the GPU loads and evaluates on a CPU;
* ``lm.nn.RegularizedLSTM`` moved to the GPU equals ``nn.LSTM`` in eval and trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm.nn.lstm import reference_loop
from lm.nn.lstm_kernel import lstm_window
from lm.nn.precision import set_tf32

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

KERNEL_CASES = {  # (hidden mask, flipout, cell mask, zoneout) of each window-kernel regularizer
    "variational": (True, "none", False, "off"),
    "semeniuta": (False, "none", True, "off"),
    "zoneout": (False, "none", False, "masks"),
    "zoneout_eval": (False, "none", False, "expectation"),
    "wd_flipout": (False, "per_window", False, "off"),
    "gauss_flipout_per_step": (False, "per_step", False, "off"),
    "everything": (True, "per_window", True, "masks"),
}


def _to_cuda(inputs, draws):
    from lm.nn.flipout import Flip

    inputs = [x.detach().cuda().requires_grad_() for x in inputs]
    move = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    flip = draws.flip and Flip(inputs[4], draws.flip.sign_in.cuda(), draws.flip.sign_out.cuda())
    draws = type(draws)(move(draws.hidden_mask), flip, move(draws.cell_mask), move(draws.zoneout_c),
                        move(draws.zoneout_h))
    return inputs, draws


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_reference_on_cuda_float32(case):
    from test_lstm_kernel import NAMES, make_case, run

    set_tf32(False)
    inputs, draws = _to_cuda(*make_case(*KERNEL_CASES[case], dtype=torch.float32))
    fast, ref = run(lstm_window, inputs, draws), run(reference_loop, inputs, draws)
    for name, a, b in zip(NAMES, fast, ref):
        assert a.is_cuda
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.parametrize("name", ["none", "dropout", "variational", "semeniuta", "zoneout", "weight_drop", "gauss",
                                  "wd_flipout", "gauss_flipout", "gauss_flipout_per_step"])
def test_bf16_layer_agrees_with_float32_on_cuda(name):
    from test_precision import compare_bf16

    set_tf32(False)
    compare_bf16(name, device="cuda")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_host_sync_inside_the_recurrence(dtype):
    from test_lstm_kernel import make_case, run

    inputs, draws = _to_cuda(*make_case(True, "per_window", True, "masks", dtype=torch.float32))
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        run(lstm_window, inputs, draws)  # warm up (probes, cuBLAS handles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, (h, c) = lstm_window(inputs[0], (inputs[1], inputs[2]), inputs[3], draws)
            (out.sum() + c.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


PAPER = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
               if p.stem != "quickstart")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", PAPER)
def test_paper_config_trains_on_cuda(ptb_dir, name, precision):
    from lm.config import load_config
    from lm.train.trainer import Trainer

    cfg = load_config(name, ["train.device=cuda", f"train.precision={precision}"])
    trainer = Trainer(cfg, Path("unused"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    source = trainer.train_data
    for i in range(3):
        x, y = source[i * 35: i * 35 + 35], source[i * 35 + 1: i * 35 + 36]
        loss = trainer.train_step(x, y)
        assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(t.dtype == torch.float32 for s in trainer.state for t in s)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_checkpoint_saved_on_gpu_loads_on_cpu(ptb_dir, tmp_path, capsys):
    import evaluate as evaluate_script
    import train as train_script

    run = tmp_path / "run"
    args = ["--config", "char_flipout.yaml", "--run-dir", str(run), "--train.device", "cuda",
            "--train.precision", "bf16", "--train.max_steps", "3", "--train.bptt", "20", "--eval.max_tokens", "2000",
            "--data.train_tokens", "20000", "--train.progress", "false"]
    assert train_script.main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["precision"]["device"].startswith("cuda") and results["precision"]["precision"] == "bf16"
    capsys.readouterr()
    assert evaluate_script.main([str(run / "best.pt"), "--device", "cpu", "--precision", "fp32", "--split", "valid",
                                 "--max-tokens", "2000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"]["device"] == "cpu"
    assert abs(out["bpc"] - results["valid"]["bpc"]) < 0.05  # bf16 on GPU vs fp32 on CPU, same weights


@pytest.mark.parametrize("name", ["none", "weight_drop", "wd_flipout", "bbb_flipout", "variational"])
def test_regularized_lstm_moves_to_cuda(name):
    """lm.nn.RegularizedLSTM after .cuda(): its layers still use the moved parameters (cuDNN-flattened),
    eval equals nn.LSTM on the GPU (TF32 off), and a training step gives every parameter a gradient."""
    from torch import nn

    from lm.nn import RegularizedLSTM

    set_tf32(False)
    torch.manual_seed(0)
    ref = nn.LSTM(5, 16, num_layers=2, batch_first=True).cuda()
    layer = RegularizedLSTM(5, 16, num_layers=2, batch_first=True, regularizer=name)
    layer.load_state_dict(ref.state_dict())
    layer.cuda()
    assert layer.layers[1].rnn.weight_hh_l0 is layer.weight_hh_l1 and layer.weight_hh_l1.is_cuda
    x = torch.randn(3, 7, 5, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x)[0], ref.eval()(x)[0], rtol=0, atol=1e-5)
    out, _ = layer.train()(x)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in layer.parameters())
