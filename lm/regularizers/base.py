"""Base class of the recurrent regularizers: the hooks the language model calls.

A regularizer acts at four places of :class:`lm.nn.model.LanguageModel`:

* ``embedding_weight``: embedding dropout (whole rows of the embedding matrix, AWD-LSTM), one
  mask shared by the batch, drawn from the keyed stream of :mod:`lm.nn.rng`;
* ``drop_input`` / ``drop_between`` / ``drop_output``: dropout on the LSTM stack's input,
  between layers and on its output, ``(T, B, F)``; *locked* (one mask per example held over
  the window, AWD's LockedDropout) unless the class sets ``locked = False`` (a new mask per step);
* ``layer_noise``: the :class:`lm.nn.lstm.RecurrentNoise` plan of one LSTM layer for one window;
* ``attach``: called once by the model with its LSTM layers (a regularizer with parameters of its
  own, e.g. the posterior scales of ``bbb``, creates them here);
* ``extra_loss`` / ``log_stats``: a term the trainer adds to the training loss (``bbb``'s KL), and
  the figures it adds to each metrics.jsonl record.

Every option is a probability or scale; at zero, and in eval mode, each hook is an exact
identity (zoneout in eval uses its expectation, by definition of the method).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch
from torch import nn

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.nn.fastrand import two_valued
from lm.nn.lstm import LSTMLayer
from lm.nn.noise import RecurrentNoise
from lm.nn.rng import shared_generator
from lm.nn.tape import drawn, like

SHARED_OPTIONS = ("embed_p", "input_p", "between_p", "output_p", "ar", "tar")  # ar/tar: read by the trainer


class Regularizer(nn.Module):
    """Base: no recurrent noise; shared embedding/input/between/output dropout.

    Subclasses set ``name`` (registry key), ``summary`` (one line), ``perturbs``,
    ``granularity`` and ``paper`` (for docs), and ``options``: the keys of
    :class:`lm.config.RegularizerConfig` they read besides the shared dropout rates.
    Any other key set away from its default is a configuration error.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    perturbs: ClassVar[str] = ""
    granularity: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    locked: ClassVar[bool] = True

    def __init__(self, cfg: RegularizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.check(cfg)

    @classmethod
    def check(cls, cfg: RegularizerConfig) -> None:
        """Reject options this regularizer would silently ignore."""
        defaults = RegularizerConfig()
        allowed = set(SHARED_OPTIONS) | set(cls.options) | {"name"}
        for f in dataclasses.fields(cfg):
            if f.name not in allowed and getattr(cfg, f.name) != getattr(defaults, f.name):
                uses = ", ".join((*cls.options, *SHARED_OPTIONS))
                raise UserError(f"config key regularizer.{f.name} is not used by regularizer '{cls.name}' "
                                f"(it reads {uses}): remove it or choose a regularizer that uses it")

    # -- model-level hooks -------------------------------------------------------------
    def embedding_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Embedding dropout: zero whole rows (words) with prob ``embed_p``, scale the rest by 1/(1-p)."""
        p = self.cfg.embed_p
        if not self.training or p == 0:
            return weight
        # one mask for the whole batch: a shared draw, the same in every process (lm.nn.rng)
        # (through the noise tape: a CUDA-graphed window gets it drawn outside the graph, lm.nn.tape)
        mask = drawn(lambda: torch.empty((weight.size(0), 1), dtype=weight.dtype, device=weight.device).bernoulli_(
            1 - p, generator=shared_generator(weight.device)), (weight.size(0), 1))
        return weight * (mask / (1 - p))

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout on ``(T, B, F)``: one mask ``(1, B, F)`` per window if ``locked``, else per element."""
        if not self.training or p == 0:
            return x
        shape, meta = x.shape, like(x)
        if not self.locked:  # F.dropout's scaled mask; on a CPU drawn by Philox (lm.nn.fastrand)
            return x * drawn(lambda: two_valued(shape, meta, p, 0.0, 1 / (1 - p)), shape)
        mask = drawn(lambda: meta.new_empty((1, *shape[1:])).bernoulli_(1 - p), (1, *shape[1:]))
        return x * (mask / (1 - p))

    def drop_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._drop(x, self.cfg.input_p)

    def drop_between(self, x: torch.Tensor) -> torch.Tensor:
        return self._drop(x, self.cfg.between_p)

    def drop_output(self, x: torch.Tensor) -> torch.Tensor:
        return self._drop(x, self.cfg.output_p)

    def layer_noise(self, layer: LSTMLayer, batch: int, steps: int) -> RecurrentNoise:
        """The plan for one layer and one window of ``steps`` x ``batch``: here, the mean weights."""
        return RecurrentNoise(layer.weight_ih, layer.weight_hh, training=self.training)

    def attach(self, layers: Sequence[LSTMLayer]) -> None:
        """Called once by the model with its LSTM layers; the base has nothing to set up."""

    def extra_loss(self, step: int, train_tokens: int) -> torch.Tensor | None:
        """A term to add to the mean token loss of training step ``step`` (0-based), or None.

        ``train_tokens``: the size of the training set, for terms that are per data set (a KL)."""
        return None

    def log_stats(self) -> dict[str, float]:
        """Figures for the metrics record of a validation (since the previous call); none here."""
        return {}
    # -- sampling granularity (used by Monte-Carlo evaluation, lm/eval/mc.py) ------------
    def shares_noise_across_batch(self) -> bool:
        """True when one forward pass draws noise shared by every example of the batch, so that
        K copies of a stream in one batch would not be K independent samples. Here: embedding
        dropout, which drops rows of the embedding matrix for the whole batch; the locked and
        per-step dropout masks are per example."""
        return self.cfg.embed_p > 0

    def extra_repr(self) -> str:
        keys = ("name", *self.options, *SHARED_OPTIONS)
        return ", ".join(f"{k}={getattr(self.cfg, k)}" for k in keys) + f", locked={self.locked}"


class NoRegularizer(Regularizer):
    """``none``: the unregularized LSTM (paper Tables 2 and 3, first row)."""

    name = "none"
    summary = "unregularized LSTM (optionally with the shared embedding/input/output dropout)"
    perturbs = "nothing (shared dropout options only)"
    granularity = "-"
    paper = "Tables 2-3, 'Unregularized LSTM'"
