"""DistributedDataParallel: 2 CPU processes (gloo) spawned the way torchrun starts them.

One spawn runs everything (starting processes is the slow part): a noise-free run compared
with a single-process run, a run with dropout noise and variable BPTT, the CLI seed-sweep
path, and the collective decisions (interrupt, broadcast, mean).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lm.config import load_config
from tests.textdata import tiny_config, write_config, write_corpus

WORLD = 2


def _configs(tmp: Path) -> dict[str, dict]:
    data = {"path": str(tmp / "corpus"), "tokenizer": "char"}
    # plain SGD and no noise: a 2-rank step must equal a single-process step on the whole batch
    exact = tiny_config(data, optim={"name": "sgd", "lr": 2.0, "clip": 0.5}, train={"eval_every_steps": 0})
    noisy = tiny_config(data, regularizer={"name": "variational", "hidden_p": 0.3, "input_p": 0.2},
                        train={"variable_bptt": True, "max_steps": 16, "eval_every_steps": 4})
    return {"exact": exact, "noisy": noisy}


def _run(cfg_dict: dict, run_dir: Path, dist=None) -> dict:
    from lm.train.trainer import Trainer

    trainer = Trainer(load_config(base=cfg_dict), run_dir, dist=dist)
    snapshot = {}
    finish = trainer.finish

    def capture():  # the trained weights, before rank 0 loads best.pt to score it
        snapshot["params"] = [p.detach().clone() for p in trainer.model.parameters()]
        return finish()

    trainer.finish = capture
    snapshot["code"] = trainer.fit()
    snapshot["seed"] = torch.initial_seed()
    return snapshot


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
        for name, cfg in cfgs.items():
            out[name] = _run(cfg, tmp_path / f"ddp-{name}", d)
        # collective decisions: any rank's signal stops all; rank 0's result reaches all
        out["stop"] = d.stop_signal(signal.SIGINT if rank == 1 else None)
        out["from_main"] = d.from_main(lambda: {"loss": 1.5})
        out["mean"] = d.mean(float(rank))
        # the CLI path: a one-seed sweep inside the group
        cfg_file = write_config(tmp_path / f"sweep{rank}.yaml", cfgs["exact"])
        out["cli"] = train_cli.main(["--config", str(cfg_file), "--run-dir", str(tmp_path / "sweep"), "--seeds", "3"])
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


def test_parameters_identical_across_ranks(ddp):
    _, ranks = ddp
    for name in ("exact", "noisy"):
        assert all(r[name]["code"] == 0 for r in ranks)
        for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(a, b), name


def test_two_ranks_match_one_process(ddp, tmp_path):
    """Columns split across ranks + averaged gradients == one process on the whole batch."""
    tmp, ranks = ddp
    single = _run(_configs(tmp)["exact"], tmp_path / "single")
    for a, b in zip(single["params"], ranks[0]["exact"]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_noise_seeds_differ_and_loss_falls(ddp):
    tmp, ranks = ddp
    assert ranks[0]["noisy"]["seed"] != ranks[1]["noisy"]["seed"]
    records = [json.loads(line) for line in (tmp / "ddp-noisy" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4  # rank 0 alone writes: one line per validation
    assert records[-1]["valid_loss"] < records[0]["valid_loss"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    results = json.loads((tmp / "ddp-noisy" / "results.json").read_text())
    assert results["steps"] == 16 and "text_bpc" in results["test"]


def test_collective_decisions(ddp):
    _, ranks = ddp
    assert [r["stop"] for r in ranks] == [signal.SIGINT, signal.SIGINT]
    assert all(r["from_main"] == {"loss": 1.5} for r in ranks)
    assert all(r["mean"] == pytest.approx(0.5) for r in ranks)


def test_cli_sweep_under_ddp(ddp):
    tmp, ranks = ddp
    assert [r["cli"] for r in ranks] == [0, 0]
    assert (tmp / "sweep" / "seed3" / "results.json").is_file()
    ck = torch.load(tmp / "sweep" / "seed3" / "last.pt", weights_only=True)
    assert ck["hidden"][0][0].shape == (4, 24)  # gathered from both ranks: the global batch
