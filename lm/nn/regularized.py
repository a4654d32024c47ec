"""``RegularizedLSTM``: a drop-in replacement for ``torch.nn.LSTM`` with a recurrent regularizer.

The same constructor, forward and shapes as ``nn.LSTM`` (``batch_first``, unbatched ``(T, in)``
input, ``num_layers``, ``dropout`` between layers, ``bidirectional``, ``hx``), the same parameter
names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ..., ``*_reverse``), so
``layer.load_state_dict(lstm.state_dict())`` works, plus ``regularizer=`` with any name of the
registry (:mod:`lm.regularizers`) and its rates under the registry's option names. :func:`convert`
swaps the ``nn.LSTM`` modules inside any model in place. The language model of this codebase
(:class:`lm.nn.model.LanguageModel`) is built on this module too: one LSTM implementation.

How it runs: each layer (and direction) is an :class:`lm.nn.lstm.LSTMLayer`; once per forward
call the regularizer hands every layer its noise plan (:class:`lm.nn.noise.RecurrentNoise`), so a
forward call is one "window": noise held "per window" is held over the whole sequence. The layers
are kept in a plain list and their parameters registered here under ``nn.LSTM``'s names (the same
tensors, not copies), so the state dict and ``named_parameters()`` are exactly ``nn.LSTM``'s.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.nn.lstm import LSTMLayer
from lm.nn.noise import State
from lm.nn.regularizer_args import make_regularizer
from lm.regularizers import Regularizer

_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class RegularizedLSTM(nn.Module):
    """``torch.nn.LSTM`` with a recurrent regularizer (Wen et al. 2018 and the methods it compares).

    Args (as ``nn.LSTM``): ``input_size``, ``hidden_size``, ``num_layers=1``, ``bias=True``,
    ``batch_first=False``, ``dropout=0.0`` (dropout on the outputs of every layer but the last, a
    new mask per element, as ``nn.LSTM``), ``bidirectional=False``, ``proj_size=0`` (only 0),
    ``device``, ``dtype``. Keyword only:

    * ``regularizer``: a registry name (``python train.py --list-regularizers``), a
      :class:`lm.config.RegularizerConfig` or a :class:`lm.regularizers.Regularizer`; a name alone
      gets :data:`lm.nn.regularizer_args.DEFAULT_RATES`, ``**options`` set rates by the registry's names
      (``weight_p``, ``sigma``, ``perturb_ih``, ``resample_per_step``, ``hidden_p``, ``cell_p``,
      ``zoneout_c``, ``zoneout_h``, ``input_p``, ``between_p``, ``output_p``, ``init_sigma``,
      ``prior_sigma``), checked by the registry (a rate the regularizer would ignore is an error);
    * ``layer_sizes``: units of each layer when they differ (the language model's tied last
      layer); :meth:`forward` then needs ``hx=None`` (the state cannot be stacked), use :meth:`run`.

    ``regularizer=None`` is the language model's stack (:class:`lm.nn.model.LanguageModel`): the
    model owns the regularizer (it also drops embeddings, input and output), attaches it to
    :attr:`layers` and passes it to :meth:`run`; :meth:`forward` is then refused.

    Granularity in training mode (one forward call = one sequence; "per example" = each example
    of the batch draws its own noise; "shared" = one draw for the whole batch):

    ========================  ==============================================================
    ``none``                  no noise
    ``dropout``               input/output dropout, per example, per time step
    ``variational``           mask on ``h_{t-1}``, per example, held over the sequence
    ``semeniuta``             mask on the cell update, per example, per time step
    ``zoneout``               keep-old masks on ``c``/``h``, per example, per time step
    ``weight_drop``, ``gauss`` ``ΔŴ`` of ``W_hh`` per sequence, shared by the batch
    ``wd_flipout``,           ``ΔŴ`` per sequence, flipout signs per example per sequence
    ``gauss_flipout``         (``resample_per_step=True``: new signs every step)
    ``bbb``                   posterior sample per sequence, shared by the batch
    ``bbb_flipout``           posterior sample per sequence, flipout signs per example
    ========================  ==============================================================

    ``eval()`` computes the deterministic form: the mean weights, no dropout, zoneout's expectation
    ``z·old + (1-z)·new`` (so zoneout alone differs from ``nn.LSTM`` in eval, by definition).
    ``input_p``/``output_p`` apply to the input and output of the whole stack, ``between_p`` (the
    regularizer's locked mask, one per example per sequence) and ``dropout`` between layers.

    Not supported: ``PackedSequence`` input (one-line error naming the alternative),
    ``proj_size > 0``, TorchScript (the layers run Python control flow, a custom autograd Function
    and a C extension through ctypes); ``torch.compile`` falls back to eager around those parts.
    ``torch.func.functional_call`` or ``nn.DataParallel`` replicas that swap the weights for plain
    tensors are refused with an error (the layers read their own parameters).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *,
                 regularizer: str | RegularizerConfig | Regularizer | None = "wd_flipout",
                 layer_sizes: Sequence[int] | None = None, **options) -> None:
        super().__init__()
        if proj_size:
            raise UserError(f"proj_size={proj_size} is not supported by RegularizedLSTM: use proj_size=0 and "
                            "an nn.Linear on the output")
        if not 0 <= dropout < 1 or isinstance(dropout, bool):
            raise UserError(f"dropout={dropout!r} is invalid: expected a probability in [0, 1)")
        sizes = list(layer_sizes) if layer_sizes is not None else [hidden_size] * num_layers
        if not sizes or min(sizes) < 1 or input_size < 1:
            raise UserError(f"input_size={input_size}, hidden_size={hidden_size}, num_layers={num_layers} is "
                            "invalid: expected positive sizes and at least one layer")
        if dropout > 0 and len(sizes) == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers=1")
        self.input_size, self.hidden_size, self.num_layers = input_size, sizes[-1], len(sizes)
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, 0
        self.layer_sizes = sizes
        dirs = 2 if bidirectional else 1
        ins = [input_size, *(dirs * n for n in sizes[:-1])]
        # A plain list, not a ModuleList: the parameters are registered below under nn.LSTM's names only
        self._stack = [LSTMLayer(n_in, n, bias=bias) for n_in, n in zip(ins, sizes) for _ in range(dirs)]
        for i, layer in enumerate(self._stack):
            for w in _WEIGHTS if bias else _WEIGHTS[:2]:
                self.register_parameter(self._name(w, i), getattr(layer.rnn, f"{w}_l0"))
        if regularizer is None:  # the enclosing model's regularizer drives run() (and owns its parameters)
            if options:
                raise UserError(f"regularizer options {sorted(options)} need a regularizer: pass regularizer='<name>'")
            self.regularizer = None
        else:
            self.regularizer = make_regularizer(regularizer, options)
            self.regularizer.attach(self._stack)  # e.g. bbb's posterior scales, one per perturbed weight
            self.register_load_state_dict_pre_hook(_plain_lstm_state)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _name(self, weight: str, i: int) -> str:
        """``nn.LSTM``'s name of ``weight`` of layer-direction ``i`` (``weight_hh_l1_reverse``)."""
        dirs = 2 if self.bidirectional else 1
        return f"{weight}_l{i // dirs}{'_reverse' if i % dirs else ''}"

    @property
    def layers(self) -> tuple[LSTMLayer, ...]:
        """The layers the regularizer drives, in order (with ``bidirectional``: forward, reverse per layer)."""
        return tuple(self._stack)

    @property
    def granularity(self) -> str:
        """The regularizer's sampling granularity (one forward call is one window)."""
        return self._own_regularizer().granularity or "no noise"

    def _own_regularizer(self) -> Regularizer:
        if self.regularizer is None:
            raise UserError("this RegularizedLSTM has regularizer=None (a language model's stack): call run() "
                            "with the model's regularizer, or build it with regularizer='<name>'")
        return self.regularizer

    def kl(self) -> torch.Tensor:
        """``KL(q ‖ p)`` of the Bayesian variants (``bbb``, ``bbb_flipout``): a 0-d tensor, differentiable.
        Add ``kl() / N`` (N: training examples or tokens, as your loss averages) to the loss for the ELBO."""
        if not hasattr(self._own_regularizer(), "kl"):
            raise UserError(f"kl() needs a Bayesian regularizer (bbb, bbb_flipout), this layer has "
                            f"{self.regularizer.name!r}: build it with regularizer='bbb_flipout'")
        return self.regularizer.kl()

    # -- the weights are shared with the layers: keep them linked -----------------------------
    def _link(self) -> None:
        """Point each layer's ``nn.LSTM`` at the parameters registered here (after ``load_state_dict(assign=True)``
        or a device move that made new ones)."""
        for i, layer in enumerate(self._stack):
            for w in _WEIGHTS if self.bias else _WEIGHTS[:2]:
                mine = self._parameters.get(self._name(w, i))
                if getattr(layer.rnn, f"{w}_l0") is mine:
                    continue
                if not isinstance(mine, nn.Parameter):
                    raise UserError(f"RegularizedLSTM's {self._name(w, i)} was replaced by a plain tensor "
                                    "(torch.func.functional_call, nn.DataParallel): the layers read their "
                                    "own parameters; set an nn.Parameter, or use DistributedDataParallel")
                setattr(layer.rnn, f"{w}_l0", mine)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._link()
        for layer in self._stack:  # as nn.LSTM does after a move: one contiguous chunk for cuDNN
            layer.rnn.flatten_parameters()
        return self

    # -- forward ----------------------------------------------------------------------------
    def run(self, x: torch.Tensor, state: list[State],
            regularizer: Regularizer | None = None) -> tuple[torch.Tensor, list[State]]:
        """The stack on a time-major window: ``x`` ``(T, B, in)``, ``state`` one ``(h, c)`` of ``(B, H_k)``
        per layer-direction. Returns the last layer's output ``(T, B, D·H)`` and the new states
        (between layers: the regularizer's ``drop_between`` and ``dropout``; no input/output dropout).
        ``regularizer``: the one attached to :attr:`layers` by an enclosing model (default: this module's)."""
        self._link()
        reg = regularizer if regularizer is not None else self._own_regularizer()
        dirs = 2 if self.bidirectional else 1
        steps, batch = x.shape[:2]
        new: list[State] = []
        for k in range(self.num_layers):
            if k:
                x = reg.drop_between(x)
                if self.dropout and self.training:
                    x = F.dropout(x, self.dropout, True)
            outs = []
            for d in range(dirs):
                i = k * dirs + d
                layer = self._stack[i]
                inp = x.flip(0) if d else x  # the reverse direction reads the sequence backwards
                out, s = layer(inp, state[i], reg.layer_noise(layer, batch, steps))
                outs.append(out.flip(0) if d else out)
                new.append(s)
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
        return x, new

    def forward(self, input: torch.Tensor, hx: State | None = None) -> tuple[torch.Tensor, State]:
        """``nn.LSTM``'s forward. ``input``: ``(T, B, in)``, ``(B, T, in)`` with ``batch_first``, or
        unbatched ``(T, in)``; ``hx``: ``(h_0, c_0)`` each ``(D·L, B, H)`` (``(D·L, H)`` unbatched), or
        None for zeros. Returns ``output`` ``(T, B, D·H)`` (batch first / unbatched likewise) and
        ``(h_n, c_n)`` each ``(D·L, B, H)``."""
        if isinstance(input, PackedSequence):
            raise UserError("RegularizedLSTM does not take a PackedSequence: pass the padded batch "
                            "(torch.nn.utils.rnn.pad_packed_sequence) and read each sequence's output at its "
                            "last step (output[lengths - 1, range(B)]), or batch sequences of equal length")
        if input.dim() not in (2, 3):
            raise UserError(f"RegularizedLSTM: expected input of 2 (unbatched) or 3 dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise UserError(f"RegularizedLSTM: input.size(-1) must be equal to input_size. Expected "
                            f"{self.input_size}, got {input.size(-1)}")
        batched = input.dim() == 3
        x = input if not batched or not self.batch_first else input.transpose(0, 1)
        x = x if batched else x.unsqueeze(1)
        batch, n = x.size(1), len(self._stack)
        if hx is None:
            state = [(x.new_zeros(batch, layer.hidden_size), x.new_zeros(batch, layer.hidden_size))
                     for layer in self._stack]
        else:
            if len(set(self.layer_sizes)) > 1:
                raise UserError("RegularizedLSTM with layer_sizes of different units takes hx=None in forward(); "
                                "pass the per-layer states to run()")
            want = (n, batch, self.hidden_size) if batched else (n, self.hidden_size)
            for name, t in zip(("h_0", "c_0"), hx):
                if tuple(t.shape) != want:
                    raise UserError(f"RegularizedLSTM: expected {name} of shape {want}, got {tuple(t.shape)}")
            h0, c0 = (t if batched else t.unsqueeze(1) for t in hx)
            state = list(zip(h0.unbind(0), c0.unbind(0)))
        reg = self._own_regularizer()
        x = reg.drop_input(x)
        out, new = self.run(x, state, reg)
        out = reg.drop_output(out)
        h_n, c_n = torch.stack([h for h, _ in new]), torch.stack([c for _, c in new])
        if not batched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        for key, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        if len(set(self.layer_sizes)) > 1:
            s += f", layer_sizes={self.layer_sizes}"
        return s


def _plain_lstm_state(module: RegularizedLSTM, state_dict: dict, prefix: str, *args) -> None:
    """Let a plain ``nn.LSTM`` state dict load into a Bayesian variant: when it holds none of the
    regularizer's own keys (``regularizer.rho_hh.0``, ...), those keep their current values."""
    own = module.regularizer.state_dict()
    if own and not any(key.startswith(prefix + "regularizer.") for key in state_dict):
        state_dict.update({f"{prefix}regularizer.{k}": v for k, v in own.items()})


def convert(model: nn.Module, regularizer: str | RegularizerConfig = "wd_flipout", **options) -> nn.Module:
    """Replace every ``nn.LSTM`` inside ``model`` by a :class:`RegularizedLSTM` with the same
    configuration, weights, device and dtype, in place; each gets its own regularizer.

    Returns ``model`` (or the new module when ``model`` itself is an ``nn.LSTM``).
    """
    if isinstance(model, nn.LSTM):
        return _from_lstm(model, regularizer, options)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LSTM):
            setattr(model, name, _from_lstm(child, regularizer, options))
        elif not isinstance(child, RegularizedLSTM):
            convert(child, regularizer, **options)
    return model


def _from_lstm(lstm: nn.LSTM, regularizer: str | RegularizerConfig, options: dict) -> RegularizedLSTM:
    w = lstm.weight_ih_l0
    new = RegularizedLSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                          lstm.dropout, lstm.bidirectional, lstm.proj_size, device=w.device, dtype=w.dtype,
                          regularizer=regularizer, **options)
    new.load_state_dict(lstm.state_dict())
    return new.train(lstm.training)
