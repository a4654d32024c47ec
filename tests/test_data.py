"""PTB resolution, checksums, tokenization counts on the real data, caching, batching."""

from __future__ import annotations

import shutil

import pytest
import torch

from lm.data import batchify, bptt_windows, load_corpus
from lm.data import ptb as ptb_mod
from lm.data.batching import sample_window_length
from lm.errors import UserError

COUNTS = {
    "word": ((929_589, 73_760, 82_430), 10_000),
    "char": ((5_017_482, 393_042, 442_423), 50),
}


@pytest.mark.parametrize("level", ["word", "char"])
def test_real_ptb_counts(ptb_dir, level):
    corpus = load_corpus(level)
    sizes, vocab = COUNTS[level]
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == sizes
    assert len(corpus.vocab) == vocab
    assert corpus.vocab[-1] == "<eos>" or "<eos>" in corpus.vocab
    eos = corpus.vocab.index("<eos>")
    lines = {"word": 42_068, "char": 42_068}[level]
    assert int((corpus.train == eos).sum()) == lines  # one <eos> per line, none for the char trailing " "


def test_cache_is_used_on_second_load(ptb_dir, monkeypatch):
    first = load_corpus("word")
    calls = []
    monkeypatch.setattr("lm.data.corpus.tokenize", lambda path: calls.append(path) or [])
    second = load_corpus("word")
    assert calls == []  # no re-tokenization
    assert torch.equal(first.train, second.train) and first.vocab == second.vocab


def test_mikolov_names_are_accepted(ptb_dir, tmp_path, monkeypatch):
    for split in ("train", "valid", "test"):
        shutil.copy(ptb_dir / "word" / f"{split}.txt", tmp_path / f"ptb.{split}.txt")
    monkeypatch.setenv("PTB_DIR", str(tmp_path))
    assert load_corpus("word").valid.numel() == 73_760


def test_corrupt_file_names_the_file(ptb_dir, tmp_path, monkeypatch):
    for split in ("train", "valid", "test"):
        shutil.copy(ptb_dir / "word" / f"{split}.txt", tmp_path / f"ptb.{split}.txt")
    (tmp_path / "ptb.valid.txt").write_bytes((ptb_dir / "word" / "valid.txt").read_bytes()[:1000])
    monkeypatch.setenv("PTB_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"ptb\.valid\.txt is corrupt or truncated"):
        load_corpus("word")


def test_prepared_copy_under_data_root_wins(ptb_dir, tmp_path, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(ptb_dir / "word", root / "ptb" / "word")
    monkeypatch.setenv("FLIPOUT_LM_DATA", str(root))
    monkeypatch.setenv("PTB_DIR", str(tmp_path / "nowhere"))  # would fail if consulted
    assert load_corpus("word").test.numel() == 82_430


def test_offline_without_copy_says_set_ptb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPOUT_LM_DATA", str(tmp_path))
    monkeypatch.delenv("PTB_DIR", raising=False)
    monkeypatch.setattr(ptb_mod, "URL", "http://127.0.0.1:9/simple-examples.tgz")  # refused at once
    with pytest.raises(UserError, match="set PTB_DIR"):
        load_corpus("char")


def test_ptb_dir_without_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PTB_DIR", str(tmp_path))
    monkeypatch.setenv("FLIPOUT_LM_DATA", str(tmp_path / "root"))
    with pytest.raises(UserError, match="point PTB_DIR"):
        load_corpus("word")


def test_batchify_shapes_and_streams():
    data = torch.arange(103)
    b = batchify(data, 4)
    assert b.shape == (25, 4)  # 103 // 4 rows, 3 tail tokens dropped
    assert torch.equal(b[:, 1], torch.arange(25, 50))  # column = contiguous stream


def test_bptt_windows_shift_and_cover():
    source = batchify(torch.arange(1000), 5)  # (200, 5)
    rows = []
    for start, x, y in bptt_windows(source, 30):
        assert torch.equal(y, source[start + 1: start + 1 + x.size(0)])
        assert torch.equal(x[1:], y[:-1])
        rows.append(x.size(0))
    assert sum(rows) == 199 and rows[:-1] == [30] * 6 and rows[-1] == 19  # every target predicted once


def test_bptt_windows_resume_position():
    source = batchify(torch.arange(1000), 5)
    full = list(bptt_windows(source, 30))
    tail = list(bptt_windows(source, 30, start=90))
    assert [w[0] for w in tail] == [w[0] for w in full[3:]]


def test_variable_bptt_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = [sample_window_length(70, g) for _ in range(2000)]
    assert min(lengths) >= 5
    short = sum(1 for n in lengths if n < 52)  # bptt/2 = 35 +- a few std of 5
    # P(short window) = 0.05: binomial sd = sqrt(2000*.05*.95) ~ 9.7, so +-4 sd is [61, 139]
    assert 61 <= short <= 139
    source = batchify(torch.arange(5000), 5)
    total = sum(x.size(0) for _, x, _ in bptt_windows(source, 70, variable=True, generator=g))
    assert total == source.size(0) - 1


def test_variable_bptt_max_cuts_only_the_longer_draws():
    """train.variable_bptt_max: the same draws as without it, those above the cap cut to it."""
    free, capped = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_window_length(70, free) for _ in range(3000)]
    b = [sample_window_length(70, capped, longest=80) for _ in range(3000)]
    assert b == [min(n, 80) for n in a]
    # P(length > 80) = 0.95 P(N(70, 5) >= 81) = 0.95 (1 - Phi(2.2)) = 0.0132: 3000 draws give 39.7 +- 6.2,
    # so at least one is cut (and the cap is reached) with overwhelming probability
    assert max(a) > 80 and max(b) == 80


def test_variable_bptt_max_is_checked():
    from lm.config import TrainConfig
    from lm.errors import UserError
    assert TrainConfig(bptt=70, variable_bptt=True, variable_bptt_max=80).variable_bptt_max == 80
    with pytest.raises(UserError, match="train.variable_bptt_max"):
        TrainConfig(bptt=70, variable_bptt=True, variable_bptt_max=60)
