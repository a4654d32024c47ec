"""``evaluate.py compare``: seed aggregation, separate tables per level, incomplete runs, outputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

import evaluate as evaluate_script
from lm.config import load_config, to_dict


def fake_run(path: Path, level: str = "char", seed: int = 1, valid: float = 1.5, test: float = 1.45,
             done: bool = True, checkpoint: bool = False, lr: float = 0.002,
             tokens: tuple[int, int] | None = None) -> Path:
    """A run directory as lm/train/trainer.py writes it, without training."""
    path.mkdir(parents=True)
    cfg = to_dict(load_config(base={"data": {"level": level}, "train": {"seed": seed}, "optim": {"lr": lr}}))
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = "bpc" if level == "char" else "ppl"
    records = [{"epoch": e, "step": 100 * e, f"valid_{m}": valid + (3 - e) * 0.1, "valid_loss": 1.0,
                "tokens_per_s": 1000.0 * seed, "elapsed_s": 60.0 * e, "best": True} for e in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 4, "ste')
    if checkpoint:
        torch.save({"params": 4242, "config": cfg}, path / "last.pt")
    if done:
        results = {"level": level, "regularizer": "none", "seed": seed, "params": 1000, "epochs": 3.0, "steps": 300,
                   "best_epoch": 3, "best_step": 300, "train_tokens_per_s": 1000.0 * seed, "wall_s": 180.0 + seed,
                   "valid": {"loss": 1.0, m: valid}, "test": {"loss": 1.0, m: test}}
        if tokens:  # the number of tokens each figure was scored on
            results["valid"]["tokens"], results["test"]["tokens"] = tokens
        (path / "results.json").write_text(json.dumps(results))
    return path


def compare(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = evaluate_script.main(["compare", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_seeds_aggregate_and_levels_split(tmp_path, capsys):
    sweep = tmp_path / "char_sweep"
    for seed, v in ((1, 1.50), (2, 1.52), (3, 1.55)):
        fake_run(sweep / f"seed{seed}", seed=seed, valid=v)
    fake_run(tmp_path / "other_lr", lr=0.01, valid=1.7)
    fake_run(tmp_path / "word", level="word", valid=120.0, test=115.0)
    out = tmp_path / "out"
    code, text, _ = compare(capsys, sweep, tmp_path / "other_lr", tmp_path / "word", "--out", out)
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.json", "curves.png"}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert text.startswith((out / "compare.md").read_text())
    assert "## PTB, char level (BPC)" in text and "## PTB, word level (perplexity)" in text
    tables = json.loads((out / "compare.json").read_text())["tables"]
    char, word = tables
    assert [t["level"] for t in tables] == ["char", "word"] and len(word["rows"]) == 1
    row = char["rows"][0]
    assert row["run"] == "char_sweep" and row["n"] == 3 and row["seeds"] == [1, 2, 3]
    assert row["valid"]["mean"] == pytest.approx(statistics.mean([1.50, 1.52, 1.55]))
    assert row["valid"]["std"] == pytest.approx(statistics.stdev([1.50, 1.52, 1.55]))
    mean, std = row["valid"]["mean"], row["valid"]["std"]
    assert f"| char_sweep | char | none | 1.0k | 3.00 ± 0.00 | 3.00 ± 0.00 | {mean:.3f} ± {std:.3f} |" in text
    assert char["rows"][1]["run"] == "other_lr" and char["rows"][1]["n"] == 1  # another lr: its own row


def test_incomplete_runs_are_shown(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "seed1", seed=1)
    fake_run(tmp_path / "runs" / "seed2", seed=2, done=False, checkpoint=True)  # crashed: metrics + last.pt
    (tmp_path / "runs" / "seed2" / "config.yaml").unlink()  # its config comes from last.pt
    crashed = tmp_path / "early"
    fake_run(crashed, done=False)
    (crashed / "metrics.jsonl").unlink()  # died before the first validation
    code, text, _ = compare(capsys, tmp_path / "runs", crashed, "--out", tmp_path / "out")
    assert code == 0
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["tables"][0]["rows"]
    assert [(r["run"], r["status"], r["n"]) for r in rows] == [
        ("runs/seed1", "done", 1), ("runs/seed2", "incomplete", 1), ("early", "incomplete", 1)]
    assert rows[1]["params"]["mean"] == 4242 and rows[1]["valid"]["mean"] == pytest.approx(1.5)
    assert rows[1]["test"] is None and rows[2]["valid"] is None
    assert text.count("incomplete |") == 2


def test_real_runs_end_to_end(tmp_path, capsys):
    """Two seeds of a tiny own-corpus run, trained for real, then compared."""
    import train as train_script
    from tests.textdata import tiny_config, write_config, write_corpus

    root = write_corpus(tmp_path / "corpus")
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config({"path": str(root), "tokenizer": "word"},
                                                           train={"max_steps": 6}))
    assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / "sw"), "--seeds", "1", "2"]) == 0
    code, text, _ = compare(capsys, tmp_path / "sw", "--out", tmp_path / "out", "--no-plot")
    assert code == 0 and "valid text BPC" in text and "| sw | word | none |" in text
    row = json.loads((tmp_path / "out" / "compare.json").read_text())["tables"][0]["rows"][0]
    assert row["n"] == 2 and row["test_text_bpc"]["n"] == 2 and row["status"] == "done"


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "is not a run directory"),
])
def test_bad_run_directories(tmp_path, capsys, make, message):
    make(tmp_path / "x")
    code, _, err = compare(capsys, tmp_path / "x", "--out", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_study_directory_stands_for_every_sweep_below_it(tmp_path, capsys):
    """``compare study/char`` finds ``study/char/<regularizer>/seed<S>``: one row per sweep."""
    for reg, lr in (("a_reg", 0.002), ("b_reg", 0.004)):
        for seed in (1, 2):
            fake_run(tmp_path / "study" / "char" / reg / f"seed{seed}", seed=seed, lr=lr)
    code, _, _ = compare(capsys, tmp_path / "study", "--out", tmp_path / "out", "--no-plot")
    assert code == 0
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["tables"][0]["rows"]
    assert [(r["run"], r["n"]) for r in rows] == [("a_reg", 2), ("b_reg", 2)]
