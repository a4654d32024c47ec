"""``evaluate.py generate``: sampling, priming, seeds, detokenization and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import evaluate as evaluate_script
import train as train_script
from lm.errors import UserError
from tests.textdata import tiny_config, write_config, write_corpus
from tests.tiny import write_tiny


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    root = write_corpus(tmp / "corpus")
    cfg = write_config(tmp / "char.yaml", tiny_config({"path": str(root), "tokenizer": "char"}))
    run = tmp / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    return run / "best.pt"


def generate(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = evaluate_script.main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prime_seed_and_length(char_run, capsys):
    code, text, _ = generate(capsys, char_run, "--prime", "the cat", "--tokens", 40, "--seed", 3)
    assert code == 0 and text.startswith("the cat")
    assert len(text.rstrip("\n")) <= len("the cat") + 40  # one character per token, <eos> -> newline
    assert generate(capsys, char_run, "--prime", "the cat", "--tokens", 40, "--seed", 3)[1] == text
    assert generate(capsys, char_run, "--prime", "the cat", "--tokens", 40, "--seed", 4)[1] != text


def test_greedy_is_deterministic_without_prime(char_run, capsys):
    a = generate(capsys, char_run, "--temperature", 0, "--tokens", 30, "--seed", 1)
    b = generate(capsys, char_run, "--temperature", 0, "--tokens", 30, "--seed", 2)
    assert a[0] == 0 and a[1] == b[1]


@pytest.mark.parametrize("args, message", [
    (["--prime", "the ZQ cat"], "2 symbol(s) not in the model's"),
    (["--tokens", "0"], "--tokens 0 is invalid"),
    (["--temperature", "-1"], "--temperature -1.0 is invalid"),
])
def test_errors_are_one_line(char_run, capsys, args, message):
    code, _, err = generate(capsys, char_run, *args)
    assert code == 2 and message in err and err.count("\n") == 1
    if "symbol" in message:
        assert "'Z'" in err and "'Q'" in err


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = generate(capsys, tmp_path / "nope.pt")
    assert code == 2 and "not found" in err


def test_sentencepiece_generation(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    root = write_corpus(tmp_path / "corpus")
    cfg = write_config(tmp_path / "sp.yaml", tiny_config({"path": str(root), "tokenizer": "sentencepiece",
                                                          "vocab_size": 40}, train={"max_steps": 4}))
    run = tmp_path / "run"
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    code, text, _ = generate(capsys, run / "last.pt", "--prime", "the dog", "--tokens", 20)
    assert code == 0 and text.startswith("the dog")
    (run / "tokenizer.model").unlink()
    code, _, err = generate(capsys, run / "last.pt")
    assert code == 2 and "tokenizer.model not found" in err


def test_ptb_word(ptb_dir, tmp_path, capsys):
    """Real PTB word level (tiny run): space-joined words, <eos> as newlines; unknown words are named.

    (PTB char's '_' -> space is covered by test_corpus_custom.test_detokenize_schemes.)
    """
    run = tmp_path / "w"
    cfg = write_tiny(tmp_path, train={"max_steps": 3})
    assert train_script.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    code, text, _ = generate(capsys, run / "last.pt", "--prime", "the company said", "--tokens", 10)
    assert code == 0 and text.startswith("the company said")
    assert len(text.split()) + text.count("\n") - 1 == 3 + 10  # words + <eos> newlines (print adds one)
    code, _, err = generate(capsys, run / "last.pt", "--prime", "the Zyzzyva said")
    assert code == 2 and "'Zyzzyva'" in err


def test_ptb_char_codec_round_trip():
    """PTB char spells words with '_' between them: the prime is cut that way and joined back."""
    from lm.config import load_config
    from lm.eval.generate import Codec

    vocab = list("abcehst_") + ["<eos>"]
    codec = Codec(load_config(base={"data": {"level": "char"}}), vocab, Path("."))
    ids = codec.encode("the  cat\nsat")
    assert [vocab[i] for i in ids] == [*"the_cat", "<eos>", *"sat"]  # runs of spaces are one boundary
    assert codec.decode(ids) == "the cat\nsat"
    with pytest.raises(UserError, match=r"1 symbol\(s\) not in the model's 9-symbol vocabulary: 'T'"):
        codec.encode("The")
