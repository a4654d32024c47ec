"""``python evaluate.py CHECKPOINT``: rebuild the model from the checkpoint's config and score a split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from lm.cli import eval_extras
from lm.config import load_config
from lm.data.custom import load_data
from lm.errors import UserError
from lm.eval.evaluation import evaluate
from lm.eval.metrics import add_text_bpc, metric_name
from lm.nn.precision import PRECISIONS, Precision
from lm.train.checkpoint import load_model
from lm.train.preflight import check_split_size


def _subcommand(name: str, argv: Sequence[str]) -> int:
    """``evaluate.py compare ...`` and ``evaluate.py generate ...`` (imported only when used)."""
    if name == "compare":
        from lm.cli.compare import main as compare_main

        return compare_main(argv)
    from lm.cli.generate import main as generate_main

    return generate_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("compare", "generate"):
        return _subcommand(argv[0], argv[1:])
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a flipout-lm checkpoint on its data.",
                                epilog="subcommands: 'evaluate.py compare RUN_DIR... [--out DIR]' tabulates and plots "
                                "runs; 'evaluate.py generate CHECKPOINT [--tokens N] ...' samples text "
                                "(each has --help)")
    p.add_argument("checkpoint", help="path to best.pt or last.pt")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="split to score (default: test)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation streams (default: eval.batch_size of the run, 10 unless changed)")
    p.add_argument("--bptt", type=int, default=None, help="evaluation window (speed only; default: eval.bptt)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (smoke runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32, bf16 or fp16 forward pass (default: the run's train.precision)")
    p.add_argument("--tf32", choices=["on", "off"], default=None,
                   help="allow TF32 for float32 matmuls/cuDNN on a GPU (default: the run's train.tf32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    eval_extras.add_arguments(p)  # --mc-samples, --dynamic-eval and their options
    args = p.parse_args(argv)
    eval_extras.check(args)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--bptt", args.bptt, 1),
                             ("--max-tokens", args.max_tokens, 2)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} is invalid: expected an integer >= {low}")
    model, ck = load_model(args.checkpoint, args.device)
    cfg = load_config(base=ck["config"])
    corpus = load_data(cfg, Path(args.checkpoint).parent)  # PTB, or the run's own corpus and tokenizer
    if corpus.vocab != list(ck["vocab"]):
        if cfg.data.path is not None:
            raise UserError(f"checkpoint {args.checkpoint} was trained on corpus {cfg.data.path} with another "
                            f"vocabulary ({len(ck['vocab'])} symbols, now {len(corpus.vocab)}): its training split "
                            "(or tokenizer) changed since; restore the text it was trained on")
        raise UserError(f"checkpoint {args.checkpoint} was trained with another vocabulary than this corpus: "
                        "point PTB_DIR/data.ptb_dir at the data it was trained on")
    data = corpus.split(args.split)[: args.max_tokens] if args.max_tokens else corpus.split(args.split)
    batch = args.batch_size or cfg.eval.batch_size
    what = f"the {args.split} split" + (f" (--max-tokens {args.max_tokens})" if args.max_tokens else "")
    check_split_size(what, data.numel(), batch, "the evaluation batch size",
                     "lower --batch-size" + (" or raise --max-tokens" if args.max_tokens else ""))
    tf32 = cfg.train.tf32 if args.tf32 is None else args.tf32 == "on"
    precision = Precision(args.precision or cfg.train.precision, model.decoder.weight.device, tf32)
    for notice in precision.plan()[1]:  # a float32 fallback, or bf16 slower than fp32 on this CPU
        print(notice, file=sys.stderr)
    with torch.inference_mode():
        result = evaluate(model, data, corpus.level,
                          args.batch_size or cfg.eval.batch_size, args.bptt or cfg.eval.bptt, precision)
    result = add_text_bpc(result, corpus, args.split)  # own corpora: bits per character of the text
    m = metric_name(corpus.level)
    out = {"checkpoint": args.checkpoint, "split": args.split, "level": corpus.level,
           "batch_size": args.batch_size or cfg.eval.batch_size, **result, "precision": precision.describe()}
    out.update(eval_extras.run(args, model, corpus, cfg, data, args.batch_size or cfg.eval.batch_size))
    if args.json:
        print(json.dumps(out))
    else:
        text = f" | text BPC {result['text_bpc']:.4f}" if "text_bpc" in result else ""
        print(f"{args.split}: loss {result['loss']:.4f} nats/token | {m} {result[m]:.4f} | {result['tokens']} tokens"
              + text)
        for line in eval_extras.describe(out, corpus.level):
            print(line)
    return 0
