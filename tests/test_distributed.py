"""DistributedDataParallel: 2 CPU processes (gloo) spawned the way torchrun starts them.

One spawn runs everything (starting processes is the slow part): runs whose only noise is
shared by the batch (none, gauss, weight_drop) compared with single-process runs, a run with
per-example noise and variable BPTT, an interrupted and resumed run compared with an
uninterrupted one, the collectives a run makes, the CLI seed-sweep path, and the collective
decisions (interrupt, broadcast, mean). A torchrun subprocess checks that a bad input prints
its error once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lm.config import load_config
from tests.textdata import tiny_config, write_config, write_corpus

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
SGD = {"name": "sgd", "lr": 2.0, "clip": 0.5}  # plain SGD: a 2-rank step equals a 1-process step up to rounding
INTERRUPT_AFTER = 6  # rank 1 alone "receives" SIGTERM during step 6


def _configs(tmp: Path) -> dict[str, dict]:
    data = {"path": str(tmp / "corpus"), "tokenizer": "char"}
    exact = tiny_config(data, optim=SGD, train={"eval_every_steps": 0})
    # only noise shared by the batch (gauss ΔŴ on both weights, embedding dropout; DropConnect), with
    # variable BPTT: in two processes the same draws as in one, so the same run up to float rounding
    gauss = tiny_config(data, optim=SGD, regularizer={"name": "gauss", "sigma": 1.0, "perturb_ih": True,
                                                      "embed_p": 0.2},
                        train={"variable_bptt": True, "eval_every_steps": 0})
    weight_drop = tiny_config(data, optim=SGD, regularizer={"name": "weight_drop", "weight_p": 0.5},
                              train={"eval_every_steps": 0})
    noisy = tiny_config(data, regularizer={"name": "variational", "hidden_p": 0.3, "input_p": 0.2},
                        train={"variable_bptt": True, "max_steps": 16, "eval_every_steps": 4})
    # per-example (flipout signs, input dropout) and shared noise, for the exact-resume test
    resume = tiny_config(data, regularizer={"name": "gauss_flipout", "sigma": 0.5, "input_p": 0.2},
                         train={"variable_bptt": True, "max_steps": 14, "eval_every_steps": 5})
    return {"exact": exact, "gauss": gauss, "weight_drop": weight_drop, "noisy": noisy, "resume": resume}


def _trainer(cfg_dict: dict, run_dir: Path, dist=None, resume: bool = False):
    from lm.train.trainer import Trainer

    return Trainer(load_config(base=cfg_dict), run_dir, resume=resume, dist=dist)


def _run(cfg_dict: dict, run_dir: Path, dist=None, trainer=None) -> dict:
    trainer = trainer or _trainer(cfg_dict, run_dir, dist)
    snapshot = {}
    finish = trainer.finish

    def capture():  # the trained weights, before rank 0 loads best.pt to score it
        snapshot["params"] = [p.detach().clone() for p in trainer.model.parameters()]
        return finish()

    trainer.finish = capture
    snapshot["code"] = trainer.fit()
    snapshot["seed"] = torch.initial_seed()
    snapshot["step"] = trainer.step
    return snapshot


def _draws(trainer) -> dict:
    """One window's noise from this rank's streams after training: the shared ΔŴ of a layer with
    fixed weights (the ranks' weights may differ once rank 0 has loaded best.pt), the per-example
    flipout signs and input-dropout mask."""
    from lm.nn.lstm import LSTMLayer
    from lm.nn.rng import shared_noise

    reg = trainer.model.regularizer.train()
    layer = LSTMLayer(8, 4)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(0.5)
    with shared_noise(trainer.cfg.train.seed, 1000, trainer.dist.rank):
        plan = reg.layer_noise(layer, 3, 5)
        dropped = reg.drop_input(torch.ones(5, 3, 8))
    return {"delta": plan.flip_hh.delta.detach(), "sign_in": plan.flip_hh.sign_in,
            "sign_out": plan.flip_hh.sign_out, "input_mask": dropped}


def _counting(names=("all_reduce", "broadcast", "all_gather")) -> Counter:
    """Count the collectives lm.train.distributed calls (it calls them as torch.distributed.<name>)."""
    import torch.distributed as dist

    counts: Counter = Counter()
    for name in names:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _worker(rank: int, port: int, tmp: str, data_root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), FLIPOUT_LM_DATA=data_root)
    torch.set_num_threads(1)
    from lm.cli import train as train_cli
    from lm.train.distributed import session

    tmp_path = Path(tmp)
    cfgs = _configs(tmp_path)
    out = {}
    with session("cpu") as d:
        assert d.world == WORLD and d.rank == rank
        counts = _counting()
        for name in ("exact", "gauss", "weight_drop", "noisy"):
            before = Counter(counts)
            out[name] = _run(cfgs[name], tmp_path / f"ddp-{name}", d)
            out[f"{name}_collectives"] = counts - before
        # exact resume: an uninterrupted run; the same run stopped by a signal on rank 1 only, then resumed
        full = _trainer(cfgs["resume"], tmp_path / "ddp-full", d)
        out["full"] = _run(cfgs["resume"], tmp_path / "ddp-full", trainer=full)
        out["draws"] = _draws(full)
        cut = _trainer(cfgs["resume"], tmp_path / "ddp-cut", d)
        step = cut.train_step

        def interrupted_step(x, y):
            value = step(x, y)
            if rank == 1 and cut.step + 1 == INTERRUPT_AFTER:
                cut.interrupted = signal.SIGTERM
            return value

        cut.train_step = interrupted_step
        out["cut"] = _run(cfgs["resume"], tmp_path / "ddp-cut", trainer=cut)
        d.barrier()  # rank 0 has written last.pt
        ck = torch.load(tmp_path / "ddp-cut" / "last.pt", weights_only=True)
        out["cut_ck"] = {"step": ck["step"], "rng_ranks": ck["rng_ranks"]}
        d.barrier()
        out["resumed"] = _run(cfgs["resume"], tmp_path / "ddp-cut", d,
                              trainer=_trainer(cfgs["resume"], tmp_path / "ddp-cut", d, resume=True))
        # collective decisions: any rank's signal stops all; rank 0's result reaches all
        out["stop"] = d.stop_signal(signal.SIGINT if rank == 1 else None)
        out["from_main"] = d.from_main(lambda: {"loss": 1.5})
        out["mean"] = d.mean(float(rank))
        # the CLI path: a one-seed sweep inside the group
        cfg_file = write_config(tmp_path / f"sweep{rank}.yaml", cfgs["exact"])
        out["cli"] = train_cli.main(["--config", str(cfg_file), "--run-dir", str(tmp_path / "sweep"), "--seeds", "3"])
        # the generator of the noise: agreed by all ranks, else one error on every rank
        from lm.errors import UserError
        from lm.nn import fastrand
        try:
            out["agree"] = d.agree("x", "philox", "philox (C)", "fix")
        except AttributeError:  # a context without the check
            out["agree"] = None
        fastrand.FAST = False if rank == 1 else None  # rank 1 draws with torch's generator
        try:
            _trainer(cfgs["exact"], tmp_path / "ddp-mismatch", d)
            out["mismatch"] = None
        except UserError as e:
            out["mismatch"] = str(e)
        fastrand.FAST = None
    torch.save(out, tmp_path / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    write_corpus(tmp / "corpus")
    data_root = str(tmp_path_factory.getbasetemp() / "lm-data")  # conftest's per-session data root
    mp.start_processes(_worker, args=(_free_port(), str(tmp), data_root), nprocs=WORLD, join=True,
                       start_method="spawn")
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_parameters_identical_across_ranks(ddp):
    _, ranks = ddp
    for name in ("exact", "gauss", "weight_drop", "noisy", "full", "resumed"):
        assert all(r[name]["code"] == 0 for r in ranks)
        for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["exact", "gauss", "weight_drop"])
def test_two_ranks_match_one_process(ddp, tmp_path, name):
    """Columns split across ranks + averaged gradients + the same shared noise == one process on the whole
    batch: the same weights and validation loss up to float rounding (no noise, gauss ΔŴ with embedding
    dropout and variable BPTT, DropConnect)."""
    tmp, ranks = ddp
    cfg = _configs(tmp)[name]
    single = _run(cfg, tmp_path / "single")
    for a, b in zip(single["params"], ranks[0][name]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one, two = _metrics(tmp_path / "single")[-1], _metrics(tmp / f"ddp-{name}")[-1]
    assert one["step"] == two["step"] == cfg["train"]["max_steps"]
    assert two["valid_loss"] == pytest.approx(one["valid_loss"], rel=1e-5)


def test_shared_noise_is_shared_and_per_example_noise_is_not(ddp):
    """The same ΔŴ in both ranks (keyed on seed, step, layer); their own flipout signs and dropout masks."""
    _, ranks = ddp
    a, b = ranks[0]["draws"], ranks[1]["draws"]
    assert torch.equal(a["delta"], b["delta"]) and a["delta"].abs().sum() > 0
    for key in ("sign_in", "sign_out", "input_mask"):
        assert a[key].shape == b[key].shape
        # 3 x (8..96) fair coins agree by chance with probability <= 2^-24
        assert not torch.equal(a[key], b[key]), key


def test_noise_seeds_differ_and_loss_falls(ddp):
    tmp, ranks = ddp
    assert ranks[0]["noisy"]["seed"] != ranks[1]["noisy"]["seed"]
    records = _metrics(tmp / "ddp-noisy")
    assert len(records) == 4  # rank 0 alone writes: one line per validation
    assert records[-1]["valid_loss"] < records[0]["valid_loss"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    results = json.loads((tmp / "ddp-noisy" / "results.json").read_text())
    assert results["steps"] == 16 and "text_bpc" in results["test"]


def test_interrupted_and_resumed_run_equals_uninterrupted(ddp):
    """A signal seen by rank 1 alone stops both ranks one step later; last.pt holds both ranks' RNG
    states, and the resumed run ends with exactly the uninterrupted run's validation loss."""
    tmp, ranks = ddp
    assert [r["cut"]["code"] for r in ranks] == [128 + signal.SIGTERM] * 2
    assert [r["cut"]["step"] for r in ranks] == [INTERRUPT_AFTER + 1] * 2
    ck = ranks[0]["cut_ck"]
    assert ck["step"] == INTERRUPT_AFTER + 1 and len(ck["rng_ranks"]) == WORLD
    assert not torch.equal(ck["rng_ranks"][0]["cpu"], ck["rng_ranks"][1]["cpu"])
    full, resumed = _metrics(tmp / "ddp-full"), _metrics(tmp / "ddp-cut")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [5, 10, 14]
    assert resumed[-1]["valid_loss"] == full[-1]["valid_loss"]
    for a, b in zip(ranks[0]["full"]["params"], ranks[0]["resumed"]["params"]):
        assert torch.equal(a, b)


def test_few_collectives_per_step(ddp):
    """Per step one all-gather (the loss average, which also carries stop signals); no per-step
    stop all-reduce; one broadcast of the window lengths per epoch with variable BPTT."""
    _, ranks = ddp
    for r in ranks:
        for name in ("exact", "gauss"):
            counts, steps = r[f"{name}_collectives"], r[name]["step"]
            assert counts["all_reduce"] == 0, name
            assert counts["broadcast"] == (1 if name == "gauss" else 0), name  # one epoch, variable BPTT
            # the loss average per step, plus the hidden state (h, c) gathered for best.pt and last.pt,
            # and once more before the validation (the state a failed validation leaves, lm/train/failure.py)
            assert counts["all_gather"] == steps + 6, name


def test_collective_decisions(ddp):
    _, ranks = ddp
    assert [r["stop"] for r in ranks] == [signal.SIGINT, signal.SIGINT]
    assert all(r["from_main"] == {"loss": 1.5} for r in ranks)
    assert all(r["mean"] == pytest.approx(0.5) for r in ranks)


def test_ranks_that_draw_with_different_generators_stop_at_start_up(ddp):
    """A rank without the Philox library would draw other shared noise: every rank stops at
    start-up with one error naming each rank's generator."""
    _, ranks = ddp
    assert [r["agree"] for r in ranks] == ["philox", "philox"]
    for r in ranks:
        assert r["mismatch"] is not None and "disagree on the generator of the noise" in r["mismatch"]
        assert "process 1: torch" in r["mismatch"] and "FLIPOUT_LM_FUSED" in r["mismatch"]
        assert "\n" not in r["mismatch"]


def test_cli_sweep_under_ddp(ddp):
    tmp, ranks = ddp
    assert [r["cli"] for r in ranks] == [0, 0]
    assert (tmp / "sweep" / "seed3" / "results.json").is_file()
    ck = torch.load(tmp / "sweep" / "seed3" / "last.pt", weights_only=True)
    assert ck["hidden"][0][0].shape == (4, 24)  # gathered from both ranks: the global batch


def test_bad_input_under_torchrun_prints_one_line(tmp_path):
    """Both processes fail on the same bad input (a batch not divisible by the 2 processes, found after
    they joined the group); the error line appears once, from rank 0, without a traceback of ours."""
    write_corpus(tmp_path / "corpus")
    cfg = write_config(tmp_path / "bad.yaml", tiny_config({"path": str(tmp_path / "corpus"), "tokenizer": "char"},
                                                         train={"batch_size": 5}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), "--config", str(cfg), "--run-dir", str(tmp_path / "run"),
                           "--train.device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: train.batch_size=5 is not divisible by the 2 processes: use a multiple of 2 (it is "
                     "the global batch, split across processes)"], proc.stderr
    assert str(ROOT / "lm") not in proc.stderr  # no traceback through our code


def test_run_cli_rank_zero_prints_others_hold_back(monkeypatch, capsys):
    from lm import errors

    def fail(argv):
        raise errors.UserError("bad thing: fix it")

    waits = []
    monkeypatch.setattr(errors.time, "sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert errors.run_cli(fail) == 2
    assert capsys.readouterr().err == "error: bad thing: fix it\n" and waits == []
    monkeypatch.setenv("RANK", "1")
    assert errors.run_cli(fail) == 2  # printed only if torchrun has not stopped it after the wait
    assert waits == [errors.QUIET_RANK_GRACE_S] and capsys.readouterr().err == "error: (process 1) bad thing: fix it\n"
