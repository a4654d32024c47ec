#!/usr/bin/env python
"""Variance of the stochastic gradient of W_hh against mini-batch size: shared perturbation vs flipout.

Reproduces the LSTM panel of Wen et al. 2018 (arXiv 1803.04386), Sec. 4.1 / App. C / Fig. 1c on
the real Penn Treebank. A briefly trained LSTM language model (trained here with the project's
:class:`lm.train.trainer.Trainer`, or loaded with ``--checkpoint``) is frozen; for mini-batch sizes
``N = 1, 2, 4, ..., max_n`` we draw many stochastic gradients of the first layer's ``W_hh`` and
estimate, per element, their variance over repetitions, averaged over the elements of each gate
block (PyTorch order i, f, g, o) and over the whole matrix. Four estimators, all through the
model's own regularizers in training mode with every other dropout rate at zero:

* ``gauss`` / ``gauss_flipout``: multiplicative Gaussian ``W(1 + σε)``, σ = 1 (paper Sec. 4.1);
* ``weight_drop`` / ``wd_flipout``: DropConnect p = 0.5 (paper Sec. 4.2 "WD" / "WD+Flipout");
* on request (``--schemes bbb,bbb_flipout,bbb_rho,bbb_flipout_rho``): Bayes by Backprop's
  posterior N(μ, softplus(ρ)²) on W_hh, one sample shared by the batch or flipout per example
  (paper Sec. 4.3); ``bbb``/``bbb_flipout`` measure the gradient of μ (= W_hh), the ``_rho``
  schemes that of ρ. σ is the checkpoint's when it was trained with bbb, else ``init_sigma``
  (0.05) around the frozen weights. Not in the default list, which stays the paper's four.

Theory (paper Thm 2): Var = α/N + (N-1)/N (β+γ) with a shared perturbation, α/N + (N-1)/N γ with
flipout, and α ≫ β ≫ γ, so flipout should fall like 1/N (log-log slope -1) while shared
perturbation flattens at β+γ.

What one repetition is (``--data-mode``):

* ``fixed`` (default): the same ``max_n`` random windows of ``--bptt`` tokens in every
  repetition; only the weight perturbation (and flipout's signs) is redrawn. This is the variance
  over the weight noise given the mini-batch, the part of the estimator flipout acts on. With
  independent per-example perturbations it is exactly (mean per-example noise variance)/N.
* ``resample``: fresh windows *and* fresh noise every repetition; the variance then also holds
  the data sampling, as α, β, γ of Thm 2 do. The paper's text does not say which of the two its
  App. C estimator used. On PTB the per-window gradients are heavy-tailed (a rare window can give
  a squared gradient norm >200x the median, even at the mean weights), so this mode needs many
  more repetitions; the JSON's ``n1_grad_norm_sq.largest_share`` says how much one repetition
  weighs.

Efficiency: the gradients for all N come from one repetition. The ``max_n`` windows are run in
blocks of sizes 1, 1, 2, 4, ..., max_n/2 (split further into ``--chunk``-sized pieces), all under
the *same* base perturbation ``ΔŴ`` (frozen for the repetition); flipout draws fresh sign vectors
per example as in training. The running sum after the blocks covering the first N windows is N
times the mini-batch-N gradient. So the estimates for different N within one repetition are
nested (correlated across N), but each N's marginal is exactly that of an N-example batch; the
paper's App. C likewise splits large batches into sub-batches that share ΔŴ with independent signs.

Intervals: the ``--reps`` repetitions are split into ``--groups`` groups; each group gives an
unbiased per-element variance estimate averaged over the gate; the reported value is the mean of
the group values and the interval a two-sided 90% Student-t interval over them (the paper repeats
its 200-repetition estimate 50 times and uses a t-test).

Usage::

    PTB_DIR=../shared/data/ptb python bench/variance.py --quick --out runs/variance
    python bench/variance.py --checkpoint runs/variance/train/best.pt --data-mode resample --out runs/variance_rs
    python bench/variance.py --tiny --out /tmp/v        # seconds, synthetic data (tests)
    python bench/variance.py --quick --train-regularizer bbb --schemes bbb,bbb_flipout,bbb_rho,bbb_flipout_rho \
        --out runs/variance_bbb                          # Bayes by Backprop: μ and ρ
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from lm.config import load_config, to_dict
from lm.data import Corpus, load_corpus
from lm.errors import UserError, run_cli
from lm.analysis.grad_variance import CLASSIC, GATES, SCHEMES, batch_sizes, measure, window_sampler
from lm.analysis.plots import plot_variance, print_variance_table
from lm.cli.evaluate import load_model
from lm.eval.metrics import metric_name
from lm.nn import hardware
from lm.nn.model import LanguageModel, count_parameters
from lm.analysis.stats import summarize, t_stat_equal, tail_summary
from lm.train.trainer import Trainer

FAMILY_TITLE = {"gauss": "mult. Gaussian σ = 1", "dropconnect": "DropConnect p = 0.5",
                "bbb_mu": "BBB, gradient of μ", "bbb_rho": "BBB, gradient of ρ"}

# Presets fill every option the user did not give. 'full' is the default (hours on 2 CPU cores).
PRESETS: dict[str, dict] = {
    "full": dict(level="char", hidden=256, layers=None, bptt=100, train_steps=1000, reps=200, groups=10,
                 max_n=256, chunk=128, threads=0, eval_tokens=None),
    # quick: one thread, because torch's two spinning threads slow down ~10x on a shared machine
    "quick": dict(level="char", hidden=256, layers=None, bptt=50, train_steps=300, reps=48, groups=6,
                  max_n=256, chunk=128, threads=1, eval_tokens=100_000),
    "tiny": dict(level="char", hidden=8, layers=None, bptt=6, train_steps=3, reps=8, groups=4,
                 max_n=8, chunk=4, threads=1, eval_tokens=None),  # one thread: no spin-wait cost on a busy machine
}

# -- the model -----------------------------------------------------------------------------
def synthetic_corpus(seed: int) -> Corpus:
    """A few thousand random 'characters' for ``--tiny`` (no PTB needed)."""
    g = torch.Generator().manual_seed(seed)
    vocab = [chr(ord("a") + i) for i in range(11)] + ["<eos>"]
    draw = lambda n: torch.randint(0, len(vocab), (n,), generator=g)  # noqa: E731
    return Corpus(level="char", vocab=vocab, train=draw(4000), valid=draw(600), test=draw(600))


def train_config(args: argparse.Namespace) -> dict:
    """Config (as a dict for :func:`lm.config.load_config`) of the briefly trained model."""
    if args.level == "char":  # the paper's char setting (App. D.1), smaller
        model = {"input": "onehot", "hidden_size": args.hidden, "num_layers": args.layers or 1, "init": "orthogonal"}
        optim = {"name": "amsgrad", "lr": 0.004, "clip": 1.0}
        train = {"batch_size": 32, "bptt": 100}
    else:  # the paper's word setting (Sec. 4.2), smaller
        model = {"input": "embedding", "emb_size": args.hidden, "hidden_size": args.hidden,
                 "num_layers": args.layers or 2}
        optim = {"name": "sgd", "lr": 20.0, "clip": 0.25}
        train = {"batch_size": 20, "bptt": 35}
    reg = {"name": args.train_regularizer}
    reg.update({"gauss": {"sigma": 1.0}, "weight_drop": {"weight_p": 0.5}}.get(args.train_regularizer, {}))
    if args.tiny:
        train = {"batch_size": 4, "bptt": 8}
    train.update(seed=args.seed, threads=args.threads, max_steps=args.train_steps, max_epochs=1000,
                 eval_every_steps=0, progress=False, device="cpu")
    return {"data": {"level": args.level}, "model": model, "regularizer": reg, "optim": optim, "train": train,
            "eval": {"batch_size": 4 if args.tiny else 128, "bptt": 100, "max_tokens": args.eval_tokens}}


def get_model(args: argparse.Namespace, out: Path) -> tuple[LanguageModel, Corpus, dict]:
    """Load ``--checkpoint`` or train a model for ``--train-steps``; return it with its corpus and a summary."""
    if args.checkpoint:
        model, ck = load_model(args.checkpoint, "cpu")
        cfg = load_config(base=ck["config"])
        corpus = load_corpus(cfg.data.level, cfg.data.ptb_dir)
        if corpus.vocab != list(ck["vocab"]):
            raise UserError(f"checkpoint {args.checkpoint} was trained with another vocabulary than this corpus: "
                            "point PTB_DIR at the data it was trained on")
        args.level = cfg.data.level
        return model, corpus, {"source": str(args.checkpoint), "config": to_dict(cfg), "steps": ck.get("step"),
                               "params": count_parameters(model)}
    cfg = load_config(base=train_config(args))
    corpus = synthetic_corpus(args.seed) if args.tiny else load_corpus(args.level)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out / "train", corpus=corpus)
    if trainer.fit() != 0:
        raise RuntimeError("training the model to freeze failed (see the message above)")
    results = json.loads((out / "train" / "results.json").read_text())
    m = metric_name(corpus.level)
    return trainer.model, corpus, {
        "source": "trained", "run_dir": str(out / "train"), "config": to_dict(cfg), "steps": results["steps"],
        "params": results["params"], f"valid_{m}": results["valid"][m], f"test_{m}": results["test"][m],
        "train_s": time.perf_counter() - t0}


# -- CLI -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/variance.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="small preset (char, H=256, T=50, 300 training steps, 48 reps, 1 thread): < 10 min on "
                           "2 CPU cores; without a preset: H=256, T=100, 1000 steps, 200 reps")
    mode.add_argument("--tiny", action="store_true", help="seconds, synthetic data, tiny model (for tests)")
    p.add_argument("--level", choices=["char", "word"], help="PTB tokenization of the trained model (default char)")
    p.add_argument("--checkpoint", help="measure this best.pt/last.pt instead of training a model")
    p.add_argument("--hidden", type=int, help="LSTM units (and word embedding size) of the trained model")
    p.add_argument("--layers", type=int, help="LSTM layers of the trained model (default 1 char, 2 word)")
    p.add_argument("--train-steps", type=int, help="optimizer steps to train the model before freezing it")
    p.add_argument("--train-regularizer", choices=["none", "gauss", "weight_drop", "bbb"], default=None,
                   help="regularizer while training the model (default gauss σ=1 for char, weight_drop 0.5 for word)")
    p.add_argument("--eval-tokens", type=int, help="score the trained model on only the first N valid/test tokens")
    p.add_argument("--schemes", default=",".join(CLASSIC), help=f"comma list out of {', '.join(SCHEMES)} "
                   f"(default: {','.join(CLASSIC)})")
    p.add_argument("--data-mode", choices=["fixed", "resample"], default="fixed",
                   help="fixed: the same windows every repetition, variance over the weight noise only (default); "
                        "resample: new windows and noise every repetition (Thm 2's estimator; heavy-tailed)")
    p.add_argument("--split", choices=["train", "valid", "test"], default="train", help="split the windows come from")
    p.add_argument("--bptt", type=int, help="tokens per window (sequence length T)")
    p.add_argument("--max-n", type=int, help="largest mini-batch size (N = 1, 2, 4, ..., max-n)")
    p.add_argument("--reps", type=int, help="repetitions (gradient draws) per scheme")
    p.add_argument("--groups", type=int, help="groups the repetitions are split into for the 90%% t-interval")
    p.add_argument("--chunk", type=int, help="largest block run in one forward/backward")
    p.add_argument("--layer", type=int, default=1, help="LSTM layer whose W_hh is measured (1-based)")
    p.add_argument("--threads", type=int, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=1, help="seed of training, data windows and noise")
    p.add_argument("--out", default="runs/variance", help="output directory (trained model, JSON, PNG)")
    p.add_argument("--json", help="JSON result path (default OUT/variance.json)")
    p.add_argument("--plot", help="PNG path (default OUT/variance.png)")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.train_regularizer is None:
        args.train_regularizer = "gauss" if args.level == "char" else "weight_drop"
    for key in ("hidden", "train_steps", "bptt", "max_n", "reps", "groups", "chunk", "layer"):
        if getattr(args, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid: expected a positive integer")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads} is invalid: expected 0 (torch default) or a positive count")
    if args.groups < 2 or args.reps < 2 * args.groups:
        raise UserError(f"--reps {args.reps} --groups {args.groups}: need at least 2 groups of at least 2 repetitions")
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown or not args.schemes:
        raise UserError(f"--schemes {','.join(unknown) or '(empty)'}: expected names out of {', '.join(SCHEMES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, corpus, model_info = get_model(args, out)
    model = model.cpu()
    if not 1 <= args.layer <= len(model.layers):
        raise UserError(f"--layer {args.layer} is invalid: the model has {len(model.layers)} LSTM layers")
    for p in model.parameters():  # frozen: only the gradient of W_hh is taken
        p.requires_grad_(p is model.layers[args.layer - 1].weight_hh)
    model_info["hidden"] = model.layers[args.layer - 1].hidden_size
    ns = batch_sizes(args.max_n)
    reps = args.reps - args.reps % args.groups
    sampler = window_sampler(corpus.split(args.split), args.bptt, args.max_n, args.seed, args.data_mode == "fixed")
    print(f"measuring {', '.join(args.schemes)} for N = {ns}: {reps} reps in {args.groups} groups, "
          f"windows of {args.bptt} {args.level}s from {args.split} ({args.data_mode})", flush=True)
    raw, schemes = {}, {}
    for i, name in enumerate(args.schemes):
        t0 = time.perf_counter()
        raw[name], n1_sq = measure(model, name, sampler, ns, reps, args.groups, args.chunk, args.layer,
                                   seed=args.seed * 7919 + i + 1, log=lambda s: print(s, flush=True))
        family, kind, options = SCHEMES[name]
        tail = tail_summary(n1_sq)
        if tail["largest_share"] > 0.5:
            print(f"  warning: one repetition ({tail['largest_rep']}) holds {tail['largest_share']:.0%} of the "
                  f"summed squared N=1 gradient norms: the gradients are heavy-tailed and the estimates are "
                  f"dominated by it (more --reps, or --data-mode fixed)", flush=True)
        schemes[name] = {"family": family, "perturbation": kind, "regularizer": {"name": name, **options},
                         **summarize(ns, raw[name], len(GATES)),
                         "gates": {g: summarize(ns, raw[name], j) for j, g in enumerate(GATES)},
                         "group_values": raw[name][:, :, len(GATES)].tolist(), "n1_grad_norm_sq": tail,
                         "seconds": time.perf_counter() - t0}
    comparison = {}
    for family in FAMILY_TITLE:
        pair = {SCHEMES[s][1]: s for s in args.schemes if SCHEMES[s][0] == family}
        if len(pair) == 2:
            sh, fl = raw[pair["shared"]][:, :, 4], raw[pair["flipout"]][:, :, 4]
            comparison[family] = {"shared_over_flipout": (sh.mean(0) / fl.mean(0)).tolist(),
                                  "t_stat_n1": t_stat_equal(sh[:, 0], fl[:, 0])}
    result = {
        "experiment": "variance of the stochastic gradient of W_hh vs mini-batch size (Wen et al. 2018, "
                      "Sec. 4.1 / App. C)",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "config": {"level": args.level, "data_mode": args.data_mode, "split": args.split, "bptt": args.bptt,
                   "max_n": args.max_n, "reps": reps, "groups": args.groups, "chunk": args.chunk,
                   "layer": args.layer, "seed": args.seed, "tiny": args.tiny, "quick": args.quick,
                   "interval": f"two-sided 90% Student-t over {args.groups} group estimates of "
                               f"{reps // args.groups} repetitions each",
                   "fit": "slope: least squares of log var on log N; a, b: var ≈ a + b/N by least squares "
                          "of relative residuals"},
        "model": model_info,
        "ns": ns,
        "gates": list(GATES),
        "schemes": schemes,
        "comparison": comparison,
        "runtime_s": time.perf_counter() - t_start,
        "machine": {**hardware.facts("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
    }
    json_path = Path(args.json) if args.json else out / "variance.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot_path = Path(args.plot) if args.plot else out / "variance.png"
    plot_variance(result, plot_path, GATES, FAMILY_TITLE)
    print_variance_table(result)
    print(f"\nwrote {json_path} and {plot_path} in {result['runtime_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
