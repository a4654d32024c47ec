"""The benchmarks that train a model and time or measure one setting against another:
bench/memory.py (peak memory with variable against fixed BPTT) and bench/malloc_ab.py (the cost of
the malloc threshold), both on a real config on PTB, and bench/flag_ab.py (a kernel switch on and
off), on tiny sizes."""

from __future__ import annotations

import json

import pytest

from tests.test_bench import _load


def test_memory_bench_compares_variable_and_fixed_bptt(ptb_dir, tmp_path, capsys):
    """bench/memory.py trains a few windows of a tiny AWD config with variable and with fixed BPTT,
    each in its own process, and records both peaks and their ratio."""
    module = _load("memory")
    out = tmp_path / "m.json"
    tiny = ["model.hidden_size=16", "model.emb_size=8", "train.batch_size=4", "data.train_tokens=5000",
            "train.bptt=20"]
    assert module.main(["--config", "word_awd_wd_flipout.yaml", "--windows", "6", "--threads", "1", "--concurrent",
                        "--json", str(out), *[a for s in tiny for a in ("--set", s)]]) == 0
    rec = json.loads(out.read_text())
    fixed, variable = rec["rows"]["fixed"], rec["rows"]["variable"]
    assert fixed["distinct_lengths"] == 1 and fixed["longest"] == 20 and variable["distinct_lengths"] > 1
    assert all(r["peak_rss_bytes"] >= r["rss_built_bytes"] > 0 and r["windows"] == 6 for r in (fixed, variable))
    assert rec["peak_ratio"] == variable["peak_rss_bytes"] / fixed["peak_rss_bytes"]
    assert "variable / fixed peak RSS" in capsys.readouterr().out


def test_malloc_ab_times_both_thresholds(ptb_dir, capsys):
    """bench/malloc_ab.py alternates glibc's mmap threshold in one training and prints both medians."""
    module = _load("malloc_ab")
    tiny = ["model.hidden_size=16", "model.emb_size=8", "train.batch_size=4", "data.train_tokens=5000", "train.bptt=20"]
    assert module.main(["--config", "word_awd_wd_flipout.yaml", "--rounds", "2", "--per", "1", "--threads", "1",
                        *[a for s in tiny for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "median s/window: 4 MiB" in out and "ratio 32 MiB / 4 MiB time" in out and "at bptt 20" in out


@pytest.mark.parametrize("switch", ["low_factors", "fused", "byte_masks"])
def test_flag_ab_times_a_switch_on_and_off_and_restores_it(tmp_path, capsys, switch):
    """bench/flag_ab.py times the training step with a kernel switch on and off and leaves the
    switch as it found it."""
    from lm.nn import lstm_fused, noise

    module = _load("flag_ab")
    out = tmp_path / "ab.json"
    assert module.main(["--tiny", "--switch", switch, "--sizes", "char", "--precision", "fp32,bf16",
                        "--only", "zoneout", "--threads", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["precision"], r["name"], r["switch"]) for r in records] == [("fp32", "zoneout", switch),
                                                                           ("bf16", "zoneout", switch)]
    for r in records:
        assert r["ms_on"] > 0 and r["ms_off"] > 0 and r["speedup_range"][0] <= r["speedup"] <= r["speedup_range"][1]
    assert "| char | bf16 | zoneout | window |" in capsys.readouterr().out
    assert lstm_fused.LOW_FACTORS is True and lstm_fused.FUSED is None and noise.BYTE_MASKS is True
    with pytest.raises(SystemExit) as bad:  # argparse's one-line error, exit code 2
        module.main(["--tiny", "--sizes", "huge"])
    assert bad.value.code == 2 and "unknown regularizer, size or precision" in capsys.readouterr().err
