"""The language model: input (embedding or one-hot) -> stacked LSTM layers -> linear decoder.

Every stochastic part goes through the model's regularizer (:mod:`lm.regularizers`), which
is a submodule, so ``print(model)`` shows its rates. Layout is time-major: tokens ``(T, B)``,
logits ``(T, B, V)``, state one ``(h, c)`` of ``(B, H)`` per layer.

The paper's char model (App. D.1) feeds one-hot characters into a 1x1000 LSTM: a one-hot
vector times ``W_ih`` is a column lookup, so it costs no more than an embedding, and with a
50-symbol vocabulary the model has 4*1000*(50+1000) + 2*4000 + 1000*50 + 50 = 4,258,050
parameters. The word model (2x650, untied 650-d embeddings, 10k words) has 19,780,400.
With tied weights the last layer has ``emb_size`` units (AWD-LSTM's rule, Merity et al. 2017):
AWD's word model, 3 layers of 1150, 1150, 400 units on 400-d embeddings, has 24,221,600.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig, RegularizerConfig
from lm.errors import UserError
from lm.nn.decoder_loss import decoder_cross_entropy
from lm.nn.lstm import LSTMLayer
from lm.nn.noise import State
from lm.nn.regularized import RegularizedLSTM
from lm.regularizers import Regularizer, build_regularizer


class LanguageModel(nn.Module):
    """LSTM language model.

    Args:
        cfg: model section of the config.
        regularizer: a :class:`Regularizer` (or its config) that perturbs the forward pass.
        vocab_size: ``V``.
    """

    def __init__(self, cfg: ModelConfig, regularizer: Regularizer | RegularizerConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.onehot = cfg.input == "onehot"
        in_size = vocab_size if self.onehot else cfg.emb_size
        self.encoder = None if self.onehot else nn.Embedding(vocab_size, cfg.emb_size)
        sizes = cfg.layer_sizes  # tied: the last layer has emb_size units (AWD-LSTM)
        reg = regularizer if isinstance(regularizer, Regularizer) else build_regularizer(regularizer)
        if self.onehot and reg.cfg.embed_p > 0:
            raise UserError("config key regularizer.embed_p needs model.input=embedding (one-hot input has no "
                            "embedding matrix): set it to 0")
        # the stack; the model's regularizer drives it (and the embedding, input and output dropout)
        self.lstm = RegularizedLSTM(in_size, sizes[-1], len(sizes), regularizer=None, layer_sizes=sizes)
        self.decoder = nn.Linear(sizes[-1], vocab_size)
        if cfg.tie_weights:
            assert self.encoder is not None
            self.decoder.weight = self.encoder.weight
        self.regularizer = reg  # registered last: its parameters follow the decoder's (optimizer state order)
        self.regularizer.attach(self.layers)  # e.g. bbb's posterior scales, one per perturbed weight
        self.register_load_state_dict_pre_hook(_rename_stack_keys)
        self.reset_parameters()

    @property
    def layers(self) -> tuple[LSTMLayer, ...]:
        """The LSTM layers, bottom first (those of :attr:`lstm`)."""
        return self.lstm.layers

    def reset_parameters(self) -> None:
        """'uniform': AWD-LSTM (embeddings/decoder U(-r, r), decoder bias 0, LSTM PyTorch's
        U(-1/sqrt(H), 1/sqrt(H))). 'orthogonal': each H x in gate block of W_ih and W_hh
        orthogonal, LSTM biases 0 (paper App. D.1, char model)."""
        r = self.cfg.init_range
        if self.encoder is not None:
            nn.init.uniform_(self.encoder.weight, -r, r)
        if not self.cfg.tie_weights:
            nn.init.uniform_(self.decoder.weight, -r, r)
        nn.init.zeros_(self.decoder.bias)
        for layer in self.layers:
            layer.rnn.reset_parameters()
            if self.cfg.init == "orthogonal":
                with torch.no_grad():
                    for w in (layer.weight_ih, layer.weight_hh):
                        for block in w.chunk(4, 0):
                            nn.init.orthogonal_(block)
                    layer.rnn.bias_ih_l0.zero_()
                    layer.rnn.bias_hh_l0.zero_()

    def init_state(self, batch_size: int) -> list[State]:
        """Zero ``(h, c)`` per layer, each ``(B, H_layer)``."""
        w = self.decoder.weight
        return [(w.new_zeros(batch_size, layer.hidden_size), w.new_zeros(batch_size, layer.hidden_size))
                for layer in self.layers]

    def forward(self, tokens: torch.Tensor, state: list[State], return_outputs: bool = False,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, list[State]] | tuple:
        """Args: tokens ``(T, B)`` ids; state from :meth:`init_state` or the previous window;
        ``return_outputs``: also return the last layer's outputs (for AR/TAR, Merity et al. 2017);
        ``targets``: ``(T, B)`` next-token ids, to get the mean cross-entropy instead of the logits
        (the training loss: :mod:`lm.nn.decoder_loss` never keeps a ``(T, B, V)`` tensor beside it).
        Returns: logits ``(T, B, V)`` (or the float32 loss, a scalar, given ``targets``) and the new
        state (not detached); with ``return_outputs`` a third item ``(raw, dropped)``, the last
        layer's output before and after ``drop_output``, each ``(T, B, H_last)``."""
        reg = self.regularizer
        if self.encoder is None:
            x = F.one_hot(tokens, self.vocab_size).to(self.decoder.weight.dtype)
        else:
            x = F.embedding(tokens, reg.embedding_weight(self.encoder.weight))
        x = reg.drop_input(x)
        x, new_state = self.lstm.run(x, state, reg)
        dropped = reg.drop_output(x)
        if targets is None:
            out = self.decoder(dropped)
        else:
            out = decoder_cross_entropy(dropped.flatten(0, 1), self.decoder.weight, self.decoder.bias,
                                        targets.flatten())
        return (out, new_state, (x, dropped)) if return_outputs else (out, new_state)


def _rename_stack_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load state dicts that name the layers' weights per layer (``layers.K.rnn.weight_ih_l0``, the
    checkpoints of earlier versions) as :class:`RegularizedLSTM` names them (``lstm.weight_ih_lK``)."""
    for key in [k for k in state_dict if k.startswith(prefix + "layers.")]:
        _, k, _, name = key[len(prefix):].split(".", 3)  # layers, K, rnn, weight_ih_l0
        state_dict[f"{prefix}lstm.{name[:-1]}{k}"] = state_dict.pop(key)


def detach_state(state: list[State]) -> list[State]:
    """Cut the graph between windows (truncated BPTT) while carrying the values."""
    return [(h.detach(), c.detach()) for h, c in state]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
