"""``evaluate.py``'s Monte-Carlo (``--mc-samples``) and dynamic (``--dynamic-eval``) evaluation:
the flags, their checks, and the ``"mc"`` / ``"dynamic"`` entries of the output.

Kept apart from :mod:`lm.cli.evaluate` so that the deterministic path stays as it was; the work
itself is in :mod:`lm.eval.mc` and :mod:`lm.eval.dynamic`.
"""

from __future__ import annotations

import argparse

import torch

from lm.config import Config
from lm.data.corpus import Corpus
from lm.errors import UserError
from lm.eval.dynamic import (KRAUSE_DECAY, KRAUSE_LR, RULES, DynamicSettings, default_grid, dynamic_evaluate,
                             gradient_stats, tune)
from lm.eval.metrics import metric_name
from lm.eval.mc import mc_evaluate
from lm.nn.model import LanguageModel

SGD_LR = 0.03  # chosen default of the plain SGD rule: the best of a grid at batch size 1 (docs/evaluation.md)


def add_arguments(p: argparse.ArgumentParser) -> None:
    mc = p.add_argument_group("Monte-Carlo evaluation (predictive average over the regularizer's noise)")
    mc.add_argument("--mc-samples", type=int, default=0, metavar="K",
                    help="also score the average of K noise samples, p̄ = (1/K) Σ p_k (0 = off)")
    mc.add_argument("--seed", type=int, default=1, help="seed of the Monte-Carlo noise (default: 1)")
    dyn = p.add_argument_group("dynamic evaluation (Krause et al. 2018)")
    dyn.add_argument("--dynamic-eval", action="store_true",
                     help="also score while adapting the weights segment by segment (score, then update)")
    dyn.add_argument("--dynamic-rule", choices=RULES, default="rms",
                     help="'rms': Krause's RMS-normalised rule with decay towards the trained weights; "
                     "'sgd': plain SGD (default: rms)")
    dyn.add_argument("--dynamic-lr", type=float, default=None,
                     help=f"learning rate eta (default: rms {KRAUSE_LR}, Krause's; sgd {SGD_LR}, chosen)")
    dyn.add_argument("--dynamic-decay", type=float, default=None,
                     help=f"decay lambda towards the trained weights (default: rms {KRAUSE_DECAY}, Krause's; sgd 0)")
    dyn.add_argument("--dynamic-segment", type=int, default=5,
                     help="segment length: tokens per stream between updates (default: 5, Krause's)")
    dyn.add_argument("--dynamic-streams", type=int, default=1,
                     help="streams the split is scored as (default: 1, Krause's protocol: each token predicted by "
                     "weights that saw only the tokens before it; B > 1 is faster, but each update then mixes "
                     "segments of B distant parts of the split)")
    dyn.add_argument("--dynamic-epsilon", type=float, default=2e-5, help="epsilon of the rms rule (default: 2e-5)")
    dyn.add_argument("--dynamic-stat-batches", type=int, default=0,
                     help="rms: gradient statistics from at most N training segments (0 = the whole training "
                     "split, as Krause)")
    dyn.add_argument("--dynamic-stat-streams", type=int, default=100,
                     help="rms: streams of the training data for the gradient statistics (default: 100, Krause's)")
    dyn.add_argument("--tune-on", choices=["valid"], default=None,
                     help="grid-search lr and decay on the validation split, then score --split with the best")
    dyn.add_argument("--tune-max-tokens", type=int, default=None,
                     help="tune on the first N validation tokens only (Krause's --gridfast uses 30000)")


def check(args: argparse.Namespace) -> None:
    """One-line errors for values argparse cannot check."""
    if args.mc_samples < 0:
        raise UserError(f"--mc-samples {args.mc_samples} is invalid: expected an integer >= 1 (0 = off)")
    if not args.dynamic_eval:
        for flag in ("dynamic_lr", "dynamic_decay", "tune_on", "tune_max_tokens"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs --dynamic-eval: add it or drop the flag")
        return
    for flag, value in (("--dynamic-lr", args.dynamic_lr), ("--dynamic-decay", args.dynamic_decay),
                        ("--dynamic-epsilon", args.dynamic_epsilon)):
        if value is not None and value < 0:
            raise UserError(f"{flag} {value} is invalid: expected a number >= 0")
    for flag, value, low in (("--dynamic-segment", args.dynamic_segment, 1),
                             ("--dynamic-streams", args.dynamic_streams, 1),
                             ("--dynamic-stat-batches", args.dynamic_stat_batches, 0),
                             ("--dynamic-stat-streams", args.dynamic_stat_streams, 1),
                             ("--tune-max-tokens", args.tune_max_tokens, 2)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} is invalid: expected an integer >= {low}")
    if args.tune_on and args.split == "valid":
        raise UserError("--tune-on valid with --split valid would report a figure tuned on the data it scores: "
                        "use --split test")
    if args.tune_on and (args.dynamic_lr is not None or args.dynamic_decay is not None):
        raise UserError("--tune-on chooses lr and decay itself: drop --dynamic-lr / --dynamic-decay")


def run(args: argparse.Namespace, model: LanguageModel, corpus: Corpus, cfg: Config, data: torch.Tensor,
        batch_size: int) -> dict:
    """The ``"mc"`` and ``"dynamic"`` entries (empty when neither is asked for)."""
    out: dict = {}
    m = metric_name(corpus.level)
    if args.mc_samples:
        bptt = args.bptt or cfg.train.bptt  # noise is redrawn per window: by default the training window
        torch.manual_seed(args.seed)
        r = mc_evaluate(model, data, corpus.level, args.mc_samples, batch_size, bptt)
        out["mc"] = {"samples": r["samples"], "loss": r["loss"], m: r[m], "tokens": r["tokens"],
                     "draws": r["draws"], "bptt": bptt, "seed": args.seed}
    if args.dynamic_eval:
        out["dynamic"] = _dynamic(args, model, corpus, cfg, data, args.dynamic_streams, m)
    return out


def _dynamic(args, model, corpus, cfg, data, batch_size, m) -> dict:
    rule = args.dynamic_rule
    lr = args.dynamic_lr if args.dynamic_lr is not None else (KRAUSE_LR if rule == "rms" else SGD_LR)
    decay = args.dynamic_decay if args.dynamic_decay is not None else (KRAUSE_DECAY if rule == "rms" else 0.0)
    settings = DynamicSettings(rule, lr, decay, args.dynamic_segment, args.dynamic_epsilon)
    ms = None
    info: dict = {}
    if rule == "rms":  # Krause: gradient statistics on the training data
        ms = gradient_stats(model, corpus.train, args.dynamic_segment, args.dynamic_stat_streams,
                            args.dynamic_stat_batches)
        info["stats"] = {"data": "train", "streams": args.dynamic_stat_streams,
                         "max_segments": args.dynamic_stat_batches or "all"}
    if args.tune_on:
        valid = corpus.split("valid")[: args.tune_max_tokens] if args.tune_max_tokens else corpus.split("valid")
        lrs, decays = default_grid(rule, args.dynamic_segment)
        settings, grid = tune(model, valid, corpus.level, settings, lrs, decays, batch_size, ms)
        best = min(grid, key=lambda g: g["loss"])
        info["tuned_on"] = {"split": "valid", "tokens": int(valid.numel()), "grid": grid, "best_loss": best["loss"]}
    r = dynamic_evaluate(model, data, corpus.level, settings, batch_size, ms)
    protocol = ("Krause: one stream, each token predicted by weights that saw only the tokens before it"
                if batch_size == 1 else f"{batch_size} streams: each update mixes segments of {batch_size} distant "
                "parts of the split (not Krause's one-stream protocol)")
    return {**settings.as_dict(), **info, "streams": batch_size, "protocol": protocol, "loss": r["loss"], m: r[m],
            "tokens": r["tokens"], "updates": r["updates"]}


def describe(out: dict, level: str) -> list[str]:
    """Text lines for the terminal output."""
    m = metric_name(level)
    lines = []
    if "mc" in out:
        r = out["mc"]
        lines.append(f"MC ({r['samples']} samples, {r['draws']}): loss {r['loss']:.4f} nats/token | {m} {r[m]:.4f}")
    if "dynamic" in out:
        r = out["dynamic"]
        lines.append(f"dynamic ({r['rule']}, lr {r['lr']:.3g}, decay {r['decay']:.3g}, segment {r['segment']}, "
                     f"{r['streams']} stream{'s' if r['streams'] > 1 else ''}): "
                     f"loss {r['loss']:.4f} nats/token | {m} {r[m]:.4f}")
    return lines
