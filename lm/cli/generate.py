"""``python evaluate.py generate CHECKPOINT``: sample text from a trained model (:mod:`lm.eval.generate`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from lm.config import load_config
from lm.errors import UserError
from lm.eval.generate import Codec, sample
from lm.train.checkpoint import load_model


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py generate", description="Sample text from a trained model.")
    p.add_argument("checkpoint", help="best.pt or last.pt of a run")
    p.add_argument("--tokens", type=int, default=200, help="symbols to sample (default 200)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature: < 1 safer, > 1 more varied, 0 = greedy (default 1.0)")
    p.add_argument("--prime", default="", help="text the sample continues (default: start of a line)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the sampler (default 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.tokens < 1:
        raise UserError(f"--tokens {args.tokens} is invalid: expected a positive integer")
    if not args.temperature >= 0:
        raise UserError(f"--temperature {args.temperature} is invalid: expected a number >= 0 (0 = greedy)")
    model, ck = load_model(args.checkpoint, args.device)
    codec = Codec(load_config(base=ck["config"]), ck["vocab"], Path(args.checkpoint).parent)
    prime = codec.encode(args.prime)
    device = model.decoder.weight.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = sample(model, [codec.eos, *prime], args.tokens, args.temperature, generator)
    print(codec.decode([*prime, *ids]))
    return 0
