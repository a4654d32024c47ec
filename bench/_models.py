"""The benchmark's models: the paper's two sizes, every regularizer at its rate, the reference
``nn.LSTM`` language model, and a :class:`Runner` that trains or evaluates one of them step by step
as the trainer does. Shared by ``bench/throughput.py`` (which times them against each other),
``bench/profile_step.py`` (where one step's time goes) and ``bench/fused_step.py`` (A/B of the
recurrence's step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from lm.config import ModelConfig, RegularizerConfig
from lm.nn.decoder_loss import decoder_cross_entropy
from lm.nn.model import LanguageModel, detach_state
from lm.nn.precision import Precision, fused_in_float32
from lm.train.optim import fused_adam_ok

REFERENCE = "nn_lstm"


@dataclass(frozen=True)
class Size:
    """One benchmark size: model shape, data shape and optimizer (the paper's, App. D.1)."""

    name: str
    model: ModelConfig
    vocab: int
    batch: int
    bptt: int
    optim: str  # 'amsgrad' or 'sgd'
    lr: float
    clip: float


SIZES = {
    "char": Size("char", ModelConfig(input="onehot", hidden_size=1000, num_layers=1, init="orthogonal"),
                 vocab=50, batch=32, bptt=100, optim="amsgrad", lr=0.002, clip=1.0),
    "word": Size("word", ModelConfig(input="embedding", emb_size=650, hidden_size=650, num_layers=2),
                 vocab=10_000, batch=40, bptt=35, optim="sgd", lr=1.0, clip=0.25),
}
TINY = {
    "char": Size("char", ModelConfig(input="onehot", hidden_size=24, num_layers=1, init="orthogonal"),
                 vocab=20, batch=4, bptt=12, optim="amsgrad", lr=0.002, clip=1.0),
    "word": Size("word", ModelConfig(input="embedding", emb_size=16, hidden_size=16, num_layers=2),
                 vocab=100, batch=4, bptt=8, optim="sgd", lr=1.0, clip=0.25),
}


def regularizers(size: str) -> dict[str, RegularizerConfig]:
    """The regularizers at the paper's rates (Sec. 4.2, App. D.1); speed does not depend on a rate
    as long as it is non-zero. Word-level zoneout uses the paper's word rates (0.25 / 0.025)."""
    io = dict(input_p=0.25, output_p=0.25, between_p=0.25 if size == "word" else 0.0)
    zc, zh = (0.5, 0.05) if size == "char" else (0.25, 0.025)
    R = RegularizerConfig
    return {
        "none": R(name="none"),
        "dropout": R(name="dropout", **io),
        "variational_nohidden": R(name="variational", **io),
        "variational": R(name="variational", hidden_p=0.25, **io),
        "semeniuta": R(name="semeniuta", cell_p=0.25),
        "zoneout": R(name="zoneout", zoneout_c=zc, zoneout_h=zh),
        "weight_drop": R(name="weight_drop", weight_p=0.5),
        "gauss": R(name="gauss", sigma=1.0),
        "wd_flipout": R(name="wd_flipout", weight_p=0.5),
        "gauss_flipout": R(name="gauss_flipout", sigma=1.0),
    }


class NNLSTMModel(nn.Module):
    """The reference: one multi-layer ``torch.nn.LSTM`` between the same input and decoder."""

    def __init__(self, cfg: ModelConfig, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.encoder = None if cfg.input == "onehot" else nn.Embedding(vocab, cfg.emb_size)
        in_size = vocab if self.encoder is None else cfg.emb_size
        self.rnn = nn.LSTM(in_size, cfg.hidden_size, cfg.num_layers)
        self.decoder = nn.Linear(cfg.hidden_size, vocab)
        self.layers, self.hidden = cfg.num_layers, cfg.hidden_size

    def init_state(self, batch: int):
        zeros = self.decoder.weight.new_zeros(self.layers, batch, self.hidden)
        return zeros, zeros.clone()

    def forward(self, tokens: torch.Tensor, state, targets: torch.Tensor | None = None):
        """Logits and state, or (``targets`` given) the mean loss as :class:`LanguageModel` computes it."""
        if self.encoder is None:
            x = F.one_hot(tokens, self.vocab).to(self.decoder.weight.dtype)
        else:
            x = self.encoder(tokens)
        if fused_in_float32(x.device):  # no oneDNN LSTM in this low dtype here: float32, as the fused layers do
            with torch.autocast("cpu", enabled=False):
                out, state = self.rnn(x.float(), state)
        else:
            out, state = self.rnn(x, state)
        if targets is None:
            return self.decoder(out), state
        return decoder_cross_entropy(out.flatten(0, 1), self.decoder.weight, self.decoder.bias, targets.flatten()), state


class Runner:
    """A model with its optimizer, a fixed random batch and a carried hidden state."""

    def __init__(self, model: nn.Module, size: Size, device: torch.device, data: torch.Tensor,
                 precision: Precision | None = None) -> None:
        self.model = model.to(device)
        self.size, self.device = size, device
        self.precision = precision or Precision("fp32", device)
        self.scaler = self.precision.scaler()
        params = list(self.model.parameters())
        if size.optim == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=size.lr)
        else:
            # as the trainer (lm.train.optim): torch's fused Adam where it applies
            self.optimizer = torch.optim.Adam(params, lr=size.lr, amsgrad=True, fused=fused_adam_ok(params) or None)
        self.x, self.y = data[:-1], data[1:]
        self.state = self.model.init_state(size.batch)
        self.tokens = self.y.numel()

    def _detach(self, state):
        if isinstance(self.model, NNLSTMModel):  # nn.LSTM under autocast returns its state in the low dtype
            return tuple(s.detach().float() for s in state)
        return detach_state(state)

    def train_step(self) -> None:
        """As :meth:`lm.train.trainer.Trainer.train_step`: forward, loss, backward, clip, step."""
        self.model.train()
        with self.precision.autocast():  # the trainer's loss (lm/nn/decoder_loss.py), in both models
            loss, state = self.model(self.x, self.state, targets=self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.size.clip:
            with record_function("clip_grad_norm"):  # a label for bench/profile_step.py (one op call a step)
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.size.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state = self._detach(state)

    @torch.no_grad()
    def eval_step(self) -> None:
        self.model.eval()
        with self.precision.autocast():
            _, state = self.model(self.x, self.state)
        self.state = self._detach(state)


def build_runners(size: Size, names: Sequence[str], device: torch.device,
                  precision: Precision | None = None) -> dict[str, Runner]:
    torch.manual_seed(0)
    data = torch.randint(0, size.vocab, (size.bptt + 1, size.batch), device=device)
    runners = {REFERENCE: Runner(NNLSTMModel(size.model, size.vocab), size, device, data, precision)}
    regs = regularizers(size.name)
    for name in names:
        runners[name] = Runner(LanguageModel(size.model, regs[name], size.vocab), size, device, data, precision)
    return runners


def kernel_of(runner: Runner) -> str:
    """'fused' (nn.LSTM's kernel) or 'window' (the explicit recurrence) for training windows."""
    model = runner.model
    if isinstance(model, NNLSTMModel):
        return "nn.LSTM"
    model.train()
    layer = model.layers[0]
    return "fused" if model.regularizer.layer_noise(layer, runner.size.batch, runner.size.bptt).fused else "window"


def floor_kind(runner: Runner) -> str:
    """Which matmul floor bounds a model's training ratio: 'flipout' or 'plain' (the window kernel
    with or without ``ΔŴ`` products), or its :func:`kernel_of` ('nn.LSTM', 'fused'), whose floor
    is 1 by definition (the layers run nn.LSTM's own kernel)."""
    kernel = kernel_of(runner)
    if kernel != "window":
        return kernel
    model = runner.model
    noise = model.regularizer.layer_noise(model.layers[0], runner.size.batch, runner.size.bptt)
    return "flipout" if noise.flip_hh is not None else "plain"
