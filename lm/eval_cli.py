"""``python evaluate.py CHECKPOINT``: rebuild the model from the checkpoint's config and score a split."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch

from lm.checkpoint import load_checkpoint
from lm.config import load_config
from lm.data import load_corpus
from lm.errors import UserError
from lm.evaluation import evaluate
from lm.metrics import metric_name
from lm.model import LanguageModel
from lm.trainer import resolve_device


def load_model(path: str, device: str = "auto") -> tuple[LanguageModel, dict]:
    """Model (in eval mode, on ``device``) and the raw checkpoint dict."""
    ck = load_checkpoint(path)
    try:
        cfg = load_config(base=ck["config"])
        model = LanguageModel(cfg.model, cfg.regularizer, len(ck["vocab"]))
        model.load_state_dict(ck["model"])
    except (KeyError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"checkpoint {path} does not match its stored config ({first}): it is damaged") from None
    return model.to(resolve_device(device)).eval(), ck


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a flipout-lm checkpoint on PTB.")
    p.add_argument("checkpoint", help="path to best.pt or last.pt")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="split to score (default: test)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation streams (default: eval.batch_size of the run, 10 unless changed)")
    p.add_argument("--bptt", type=int, default=None, help="evaluation window (speed only; default: eval.bptt)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size} is invalid: expected a positive integer")
    model, ck = load_model(args.checkpoint, args.device)
    cfg = load_config(base=ck["config"])
    corpus = load_corpus(cfg.data.level, cfg.data.ptb_dir)
    if corpus.vocab != list(ck["vocab"]):
        raise UserError(f"checkpoint {args.checkpoint} was trained with another vocabulary than this corpus: "
                        "point PTB_DIR/data.ptb_dir at the data it was trained on")
    with torch.inference_mode():
        result = evaluate(model, corpus.split(args.split), corpus.level,
                          args.batch_size or cfg.eval.batch_size, args.bptt or cfg.eval.bptt)
    m = metric_name(corpus.level)
    out = {"checkpoint": args.checkpoint, "split": args.split, "level": corpus.level,
           "batch_size": args.batch_size or cfg.eval.batch_size, **result}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.split}: loss {result['loss']:.4f} nats/token | {m} {result[m]:.4f} | {result['tokens']} tokens")
    return 0
