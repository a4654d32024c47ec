"""Own corpora: tokenizers, splits, caching, text BPC and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import evaluate as evaluate_script
import train as train_script
from lm.config import load_config
from lm.data.custom import TOKENIZER_FILE, TextCorpus, load_data, load_text_corpus
from lm.eval.metrics import add_text_bpc
from lm.data.tokenizers import EOS, UNK, SentencePiece, build_vocab, detokenize
from lm.errors import UserError
from tests.textdata import tiny_config, write_config, write_corpus


def cfg_for(path: Path, **data):
    return load_config(base=tiny_config({"path": str(path), **data}))


def test_char_tokens_match_characters(tmp_path):
    root = write_corpus(tmp_path / "c")
    (root / "valid.txt").write_text("naïve ☃ cat\n", encoding="utf-8")  # ☃ never occurs in train
    corpus = load_data(cfg_for(root, tokenizer="char", split_fractions=None), None)
    assert isinstance(corpus, TextCorpus) and corpus.level == "char"
    for split in ("train", "test"):  # files end in a newline: one token per character
        assert corpus.split(split).numel() == corpus.chars[split] == len((root / f"{split}.txt").read_text())
    assert {EOS, UNK, "ï", " "} <= set(corpus.vocab)
    unk = corpus.vocab.index(UNK)
    assert corpus.valid.tolist().count(unk) == 1
    result = add_text_bpc({"loss": 1.0, "tokens": 10, "bpc": 1 / math.log(2)}, corpus, "test")
    assert result["text_bpc"] == pytest.approx(result["bpc"])  # char: text BPC is BPC


def test_word_vocabulary_cap_maps_the_rest_to_unk(tmp_path):
    root = write_corpus(tmp_path / "w")
    corpus = load_text_corpus(cfg_for(root, tokenizer="word", vocab_size=10).data)
    assert len(corpus.vocab) == 10 and corpus.vocab[-1] == UNK and EOS in corpus.vocab
    assert corpus.train.max().item() == 9 and (corpus.train == 9).any()
    assert build_vocab(["b", "a", "b", "c", "a", "b"], None) == ["b", "a", "c", UNK]  # by count, then first seen


def test_one_file_is_cut_by_split_fractions(tmp_path):
    path = tmp_path / "all.txt"
    path.write_text("".join(f"line {i} of text\n" for i in range(100)))
    corpus = load_text_corpus(cfg_for(path, tokenizer="word", split_fractions=[0.8, 0.1, 0.1]).data)
    eos = corpus.vocab.index(EOS)
    assert [(corpus.split(s) == eos).sum().item() for s in ("train", "valid", "test")] == [80, 10, 10]
    default = load_text_corpus(cfg_for(path, tokenizer="word").data)
    assert (default.valid == default.vocab.index(EOS)).sum().item() == 5  # 0.9 / 0.05 / 0.05


def test_encoded_splits_are_cached_by_checksum(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "c")
    cfg = cfg_for(root, tokenizer="word")
    first = load_text_corpus(cfg.data)
    import lm.data.custom as custom

    monkeypatch.setattr(custom, "word_tokens", lambda lines: pytest.fail("cache miss"))
    assert load_text_corpus(cfg.data).vocab == first.vocab  # served from the cache
    monkeypatch.undo()
    (root / "train.txt").write_text((root / "train.txt").read_text() + "zebra zebra\n")
    assert "zebra" in load_text_corpus(cfg.data).vocab  # a changed file changes the key


def test_sentencepiece_is_lossless_cached_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("sentencepiece")
    root = write_corpus(tmp_path / "s")
    cfg = cfg_for(root, tokenizer="sentencepiece", vocab_size=40)
    corpus = load_text_corpus(cfg.data)
    assert corpus.level == "sentencepiece" and len(corpus.vocab) == 40 and corpus.sp_model
    sp = SentencePiece(corpus.sp_model)
    assert sp.decode(corpus.valid.tolist()) == (root / "valid.txt").read_text()
    run = tmp_path / "run"
    run.mkdir()
    (run / TOKENIZER_FILE).write_bytes(corpus.sp_model)
    monkeypatch.setattr(SentencePiece, "train", classmethod(lambda *a: pytest.fail("retrained")))
    assert load_text_corpus(cfg.data).vocab == corpus.vocab  # cached model
    (root / "train.txt").write_text("other text entirely\n" * 50)
    assert load_text_corpus(cfg.data, run).sp_model == corpus.sp_model  # the run's own model wins


def test_train_and_evaluate_report_text_bpc(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    root = write_corpus(tmp_path / "s")
    cfg = write_config(tmp_path / "sp.yaml", tiny_config({"path": str(root), "tokenizer": "sentencepiece",
                                                          "vocab_size": 40}))
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    assert (run / TOKENIZER_FILE).is_file()
    results = json.loads((run / "results.json").read_text())
    chars = len((root / "test.txt").read_text())
    assert results["level"] == "sentencepiece" and results["test"]["chars"] == chars
    assert 0 < results["test"]["text_bpc"] < results["test"]["loss"] / math.log(2)  # > 1 char per piece
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "valid_text_bpc" in record and "valid_ppl" in record
    capsys.readouterr()
    assert evaluate_script.main([str(run / "best.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text_bpc"] == pytest.approx(results["test"]["text_bpc"])


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "has no train.txt, valid.txt, test.txt"),
    (lambda d: (write_corpus(d), (d / "test.txt").unlink()), "has no test.txt"),
    (lambda d: (write_corpus(d), (d / "valid.txt").write_bytes(b"caf\xe9\n")), "not UTF-8 text (invalid byte 0xe9"),
    (lambda d: (write_corpus(d), (d / "train.txt").write_bytes(b"\x89PNG\x00\x00")), "looks binary"),
    (lambda d: (write_corpus(d), (d / "valid.txt").write_text(" \n\n")), "is empty"),
    (lambda d: (write_corpus(d), (d / "test.txt").write_text("ab\n")), "too few for eval.batch_size=2"),
])
def test_bad_corpus_is_a_one_line_error(tmp_path, capsys, setup, message):
    root = tmp_path / "bad"
    setup(root)
    cfg = write_config(tmp_path / "c.yaml", tiny_config({"path": str(root), "tokenizer": "char"}))
    assert train_script.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_empty_split_of_one_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only\ntwo lines\n")
    with pytest.raises(UserError, match="split valid of .* is empty.*split_fractions"):
        load_text_corpus(cfg_for(path, tokenizer="char").data)


@pytest.mark.parametrize("data, message", [
    ({"tokenizer": "char"}, "data.tokenizer needs data.path"),
    ({"path": "x", "tokenizer": "sentencepiece"}, "data.vocab_size is required"),
    ({"path": "x", "tokenizer": "bpe"}, "expected one of char, word, sentencepiece"),
    ({"path": "x", "split_fractions": [0.5, 0.5]}, "three positive"),
    ({"path": "x", "ptb_dir": "y"}, "contradict"),
])
def test_config_validation(data, message):
    with pytest.raises(UserError, match=message):
        load_config(base={"data": data})


def test_detokenize_schemes():
    assert detokenize(list("the_cat") + [EOS] + list("sat"), "ptb-char") == "the cat\nsat"
    assert detokenize(["a", "b", EOS, "c"], "word") == "a b\nc"
    assert detokenize(list("a_b "), "char") == "a_b "
