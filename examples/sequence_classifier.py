#!/usr/bin/env python
"""Swap ``nn.LSTM`` for ``lm.nn.RegularizedLSTM`` in a small sequence classifier (no language modelling).

The data are generated here: each sequence holds ``--steps`` steps of 4 channels; channel 0 is a
sinusoid whose frequency (1, 2, 3 or 4 periods over the sequence) is the class, with a random phase
and amplitude, and every channel carries Gaussian noise. The training set is small, so an
unregularized LSTM overfits it. Three copies of one classifier (same initial weights) are trained:

* ``nn.LSTM`` as written;
* ``wd_flipout``: the same model after ``convert(model, regularizer="wd_flipout")`` (DropConnect
  p = 0.5 on ``W_hh``, its own mask per example, Wen et al. 2018);
* ``bbb_flipout``: Bayes by Backprop with flipout on ``W_hh``, trained on cross-entropy plus
  ``kl() / N``; predicted by averaging ``--mc-samples`` stochastic passes (the layer in train mode),
  whose predictive entropy is reported on test sequences and on pure-noise sequences (no signal,
  out of distribution), where a calibrated model should be less sure.

Run from the repository root after ``pip install -e .``::

    python examples/sequence_classifier.py            # about a minute on 2 CPU cores

Accuracy depends on the seed and the sizes; the script prints what it measured.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lm.nn import convert

CLASSES = 4
CHANNELS = 4


class Classifier(nn.Module):
    """LSTM over ``(B, T, CHANNELS)``, linear head on the last layer's final ``h``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(CHANNELS, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])


def make_data(n: int, steps: int, noise: float, gen: torch.Generator, signal: bool = True):
    """``n`` sequences ``(n, steps, CHANNELS)`` and their classes ``(n,)``."""
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    t = torch.arange(steps) / steps
    phase = torch.rand(n, 1, generator=gen) * 2 * math.pi
    amp = 0.5 + torch.rand(n, 1, generator=gen)
    x = noise * torch.randn(n, steps, CHANNELS, generator=gen)
    if signal:
        x[:, :, 0] += amp * torch.sin(2 * math.pi * (y[:, None] + 1) * t + phase)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          gen: torch.Generator, bayes: bool, kl_weight: float) -> float:
    """Adam on cross-entropy (plus ``kl_weight · kl() / N`` for a Bayesian layer); returns seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if bayes:
                loss = loss + kl_weight * model.rnn.kl() / len(x)  # the ELBO's KL per training example, down-weighted
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mc_samples: int = 0) -> torch.Tensor:
    """Class probabilities ``(n, CLASSES)``: the deterministic eval pass, or the mean of ``mc_samples``
    stochastic passes (only the LSTM in train mode: each pass draws new weights per example)."""
    model.eval()
    if not mc_samples:
        return model(x).softmax(-1)
    model.rnn.train()
    probs = torch.stack([model(x).softmax(-1) for _ in range(mc_samples)]).mean(0)
    model.eval()
    return probs


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=192, help="training sequences")
    ap.add_argument("--test", type=int, default=1000, help="test sequences (and as many pure-noise ones)")
    ap.add_argument("--steps", type=int, default=40, help="time steps per sequence")
    ap.add_argument("--noise", type=float, default=1.0, help="std of the Gaussian noise on every channel")
    ap.add_argument("--hidden", type=int, default=64, help="LSTM units")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--mc-samples", type=int, default=20, help="stochastic passes averaged for bbb_flipout")
    ap.add_argument("--kl-weight", type=float, default=0.01,
                    help="weight of kl()/N in bbb_flipout's loss (1 = the ELBO; with a few hundred examples the "
                         "full KL pulls every weight to the prior)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(args.train, args.steps, args.noise, gen)
    x_test, y_test = make_data(args.test, args.steps, args.noise, gen)
    x_ood, _ = make_data(args.test, args.steps, args.noise, gen, signal=False)

    torch.manual_seed(args.seed)
    base = Classifier(args.hidden)
    models = {"nn.LSTM": base,  # the swap is one line: convert() (or RegularizedLSTM(...) in __init__)
              "wd_flipout": convert(copy.deepcopy(base), regularizer="wd_flipout"),
              "bbb_flipout": convert(copy.deepcopy(base), regularizer="bbb_flipout")}
    print(f"{args.train} training sequences of {args.steps} steps, {args.test} test; LSTM {CHANNELS}x{args.hidden}")
    print(f"{'model':<24} {'train acc':>9} {'test acc':>9} {'test NLL':>9} {'seconds':>8}")
    results = {}
    for name, model in models.items():
        torch.manual_seed(args.seed + 1)
        seconds = train(model, x_train, y_train, args.epochs, args.batch, args.lr, gen, bayes=name == "bbb_flipout",
                        kl_weight=args.kl_weight)
        rows = [(name, 0)] + ([(f"{name} (MC, K={args.mc_samples})", args.mc_samples)] if name == "bbb_flipout" else [])
        for label, k in rows:
            p_train, p_test = predict(model, x_train, k), predict(model, x_test, k)
            acc_train = (p_train.argmax(-1) == y_train).float().mean().item()
            acc_test = (p_test.argmax(-1) == y_test).float().mean().item()
            nll = F.nll_loss(p_test.clamp_min(1e-12).log(), y_test).item()
            results[label] = acc_test
            print(f"{label:<24} {acc_train:>9.3f} {acc_test:>9.3f} {nll:>9.3f} {seconds if not k else 0:>8.1f}")
    bayes = models["bbb_flipout"]
    p_test, p_ood = predict(bayes, x_test, args.mc_samples), predict(bayes, x_ood, args.mc_samples)
    right = p_test.argmax(-1) == y_test
    print(f"bbb_flipout predictive entropy (nats, max {math.log(CLASSES):.2f}), K={args.mc_samples}: "
          f"test right {entropy(p_test[right]).mean().item():.3f}, test wrong "
          f"{entropy(p_test[~right]).mean().item() if (~right).any() else float('nan'):.3f}, "
          f"pure noise (out of distribution) {entropy(p_ood).mean().item():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
