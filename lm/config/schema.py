"""The config schema: one typed dataclass per section, each field with its default and help text.

Sections: ``data``, ``model``, ``regularizer``, ``optim``, ``train``, ``eval``. Each dataclass's
``__post_init__`` checks the values (lm/config/load.py merges and type-checks the layers). Every
field carries its help text in ``metadata["help"]`` so ``--help`` can list all keys with defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from lm.errors import UserError



def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f"config key {key}={value!r} is invalid: expected one of {', '.join(map(str, choices))}")


def _check(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise UserError(f"config key {key}={value!r} is invalid: expected {expected}")


def _prob(key: str, value: float) -> None:
    _check(key, 0.0 <= value < 1.0, "a probability in [0, 1)", value)


@dataclass
class DataConfig:
    level: str = _f("char", "tokenization of PTB: 'char' (50 symbols) or 'word' (10k words)")
    ptb_dir: Optional[str] = _f(None, "PTB directory, used when data/ptb holds no prepared copy "
                                "(default: $PTB_DIR; neither: download)")
    train_tokens: Optional[int] = _f(None, "use only the first N training tokens (reduced-data studies); null = all")
    # Your own corpus (lm/data/custom.py; docs/data.md); all null = PTB.
    path: Optional[str] = _f(None, "your own UTF-8 corpus instead of PTB: a directory with train.txt, valid.txt, "
                             "test.txt, or one text file cut by data.split_fractions; null = PTB")
    tokenizer: Optional[str] = _f(None, "tokenization of data.path: 'char', 'word' or 'sentencepiece' "
                                  "(null = data.level)")
    vocab_size: Optional[int] = _f(None, "data.path only: word/char = keep the N most frequent symbols, the rest "
                                   "become <unk> (null = no cap); sentencepiece = size of the trained vocabulary "
                                   "(required)")
    split_fractions: Optional[list[float]] = _f(None, "data.path is one file: train/valid/test fractions of its "
                                                "lines, e.g. [0.9, 0.05, 0.05] (null = that)")

    def __post_init__(self) -> None:
        _choice("data.level", self.level, ["char", "word"])
        if self.train_tokens is not None:
            _check("data.train_tokens", self.train_tokens > 0, "a positive token count or null", self.train_tokens)
        if self.path is None:
            for key in ("tokenizer", "vocab_size", "split_fractions"):
                if getattr(self, key) is not None:
                    raise UserError(f"config key data.{key} needs data.path (your own corpus): PTB uses "
                                    "data.level; set data.path or remove data." + key)
            return
        if self.ptb_dir is not None:
            raise UserError("config keys data.path and data.ptb_dir contradict each other: keep one")
        if self.tokenizer is not None:
            _choice("data.tokenizer", self.tokenizer, ["char", "word", "sentencepiece"])
        if self.vocab_size is not None:
            _check("data.vocab_size", self.vocab_size >= 2, "an integer >= 2 or null", self.vocab_size)
        elif self.tokenizer == "sentencepiece":
            raise UserError("config key data.vocab_size is required with data.tokenizer=sentencepiece: "
                            "set it, e.g. --data.vocab_size 1000")
        if self.split_fractions is not None:
            f = self.split_fractions
            _check("data.split_fractions", len(f) == 3 and all(x > 0 for x in f) and abs(sum(f) - 1) < 1e-6,
                   "three positive train/valid/test fractions summing to 1", f)


@dataclass
class ModelConfig:
    input: str = _f("embedding", "'embedding' lookup or 'onehot' input (the paper's char model)")
    emb_size: int = _f(650, "embedding size (ignored for onehot input, which has the vocabulary size)")
    hidden_size: int = _f(650, "LSTM units per layer")
    num_layers: int = _f(2, "number of stacked LSTM layers")
    tie_weights: bool = _f(False, "share the embedding and decoder matrices; the last LSTM layer then has "
                           "emb_size units (AWD-LSTM), the others hidden_size")
    init: str = _f("uniform", "'uniform' (AWD: embeddings/decoder U(-r,r), LSTM U(-1/sqrt(H),1/sqrt(H))) "
                   "or 'orthogonal' (orthogonal gate blocks, zero biases; the paper's char model)")
    init_range: float = _f(0.1, "r for the uniform embedding/decoder initialisation")

    def __post_init__(self) -> None:
        _choice("model.input", self.input, ["embedding", "onehot"])
        _choice("model.init", self.init, ["uniform", "orthogonal"])
        for key in ("emb_size", "hidden_size", "num_layers"):
            _check(f"model.{key}", getattr(self, key) > 0, "a positive integer", getattr(self, key))
        if self.tie_weights and self.input == "onehot":
            raise UserError("config key model.tie_weights=true needs model.input=embedding")
        if self.tie_weights and self.num_layers == 1 and self.emb_size != self.hidden_size:
            raise UserError("config key model.tie_weights=true with one layer needs model.emb_size == "
                            "model.hidden_size (the tied last layer has emb_size units): make them equal")

    @property
    def layer_sizes(self) -> list[int]:
        """Units of each LSTM layer: ``hidden_size``, except a tied last layer, which has ``emb_size``
        so that its output feeds the tied decoder (AWD-LSTM: 3 layers of 1150, 1150, 400)."""
        last = self.emb_size if self.tie_weights else self.hidden_size
        return [self.hidden_size] * (self.num_layers - 1) + [last]


@dataclass
class RegularizerConfig:
    name: str = _f("none", "regularizer name (python train.py --list-regularizers)")
    weight_p: float = _f(0.0, "DropConnect probability on W_hh (weight_drop; wd_flipout needs 0.5)")
    sigma: float = _f(0.0, "std of multiplicative Gaussian weight noise W(1+sigma*eps) (gauss, gauss_flipout)")
    perturb_ih: bool = _f(False, "also perturb the input-to-hidden weights W_ih (paper App. E.4)")
    resample_per_step: bool = _f(False, "flipout: draw new sign vectors every time step (default: once per window)")
    hidden_p: float = _f(0.0, "variational: dropout on the recurrent h_{t-1}, one mask per window")
    cell_p: float = _f(0.0, "semeniuta: dropout on the cell update g_t, new mask every step")
    zoneout_c: float = _f(0.0, "zoneout probability of the cell state")
    zoneout_h: float = _f(0.0, "zoneout probability of the hidden state")
    embed_p: float = _f(0.0, "embedding dropout: drop whole rows of the embedding matrix")
    input_p: float = _f(0.0, "dropout on the first LSTM layer's input")
    between_p: float = _f(0.0, "dropout on the outputs of inner LSTM layers (between layers)")
    output_p: float = _f(0.0, "dropout on the last LSTM layer's output")
    # Bayes by Backprop (bbb, bbb_flipout; lm/regularizers/bayes.py, docs/bayes.md)
    init_sigma: float = _f(0.05, "bbb: initial posterior std softplus(rho) of every perturbed weight")
    prior_sigma: float = _f(0.1, "bbb: std of the Gaussian prior N(0, prior_sigma^2) on the perturbed weights")
    kl_scale: float = _f(1.0, "bbb: multiply the KL term by this factor (1 = the ELBO; Wen et al. App. E.2 used 0.1)")
    kl_warmup_steps: int = _f(0, "bbb: raise the KL term's weight linearly from 1/K to 1 over K steps (0 = off)")
    ar: float = _f(0.0, "AR (Merity et al. 2017): alpha * mean of the squared dropped output of the last layer, "
                   "added to the training loss")
    tar: float = _f(0.0, "TAR (Merity et al. 2017): beta * mean of the squared change between consecutive raw "
                    "(undropped) outputs of the last layer, added to the training loss")

    def __post_init__(self) -> None:
        _check("regularizer.init_sigma", self.init_sigma > 0, "a positive std", self.init_sigma)
        _check("regularizer.prior_sigma", self.prior_sigma > 0, "a positive std", self.prior_sigma)
        _check("regularizer.kl_scale", self.kl_scale >= 0, "a non-negative factor", self.kl_scale)
        _check("regularizer.kl_warmup_steps", self.kl_warmup_steps >= 0, "a non-negative integer",
               self.kl_warmup_steps)
        for key in ("weight_p", "hidden_p", "cell_p", "zoneout_c", "zoneout_h", "embed_p", "input_p",
                    "between_p", "output_p"):
            _prob(f"regularizer.{key}", getattr(self, key))
        for key in ("sigma", "ar", "tar"):
            _check(f"regularizer.{key}", getattr(self, key) >= 0, "a non-negative number", getattr(self, key))


@dataclass
class OptimConfig:
    name: str = _f("sgd", "'sgd', 'adam' or 'amsgrad' (Adam with amsgrad=True)")
    lr: float = _f(30.0, "learning rate")
    weight_decay: float = _f(0.0, "L2 weight decay")
    clip: float = _f(0.25, "gradient clipping threshold on the global norm (0 = off)")
    schedule: str = _f("none", "'none', 'nonmono_decay' (divide lr by decay_factor on Merity's criterion) "
                       "or 'nt_asgd' (switch SGD to averaged SGD on the criterion)")
    nonmono: int = _f(5, "n of the nonmonotonic criterion: compare with the best of all but the last n validations")
    decay_factor: float = _f(4.0, "nonmono_decay: divide the lr by this factor")
    reset_log_on_decay: bool = _f(True, "nonmono_decay: clear the validation log after a decay, so the next "
                                  "decay waits at least n more validations")

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ["sgd", "adam", "amsgrad"])
        _choice("optim.schedule", self.schedule, ["none", "nonmono_decay", "nt_asgd"])
        _check("optim.lr", self.lr > 0, "a positive learning rate", self.lr)
        _check("optim.clip", self.clip >= 0, "a non-negative norm", self.clip)
        _check("optim.weight_decay", self.weight_decay >= 0, "a non-negative number", self.weight_decay)
        _check("optim.nonmono", self.nonmono >= 0, "a non-negative integer", self.nonmono)
        _check("optim.decay_factor", self.decay_factor > 1, "a factor > 1", self.decay_factor)
        if self.schedule == "nt_asgd" and self.name != "sgd":
            raise UserError("config key optim.schedule=nt_asgd needs optim.name=sgd")


@dataclass
class TrainConfig:
    seed: int = _f(1, "random seed (fixes data order, init and noise)")
    batch_size: int = _f(40, "training batch size (parallel token streams)")
    bptt: int = _f(35, "BPTT window length")
    variable_bptt: bool = _f(False, "AWD variable window length (bptt or bptt/2, jittered) with lr rescale")
    variable_bptt_max: Optional[int] = _f(None, "with variable_bptt: the longest window drawn, longer draws are "
                                          "cut to it (bounds a window's memory; AWD's main.py has this guard "
                                          "at bptt + 10, commented out); null = no cap")
    max_epochs: int = _f(100, "maximum number of epochs")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (smoke runs); null = no cap")
    eval_every_steps: int = _f(0, "validate every K steps (0 = once per epoch)")
    patience: int = _f(0, "early stopping: stop after this many validations without improvement (0 = off)")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    threads: int = _f(0, "torch CPU threads; 0 = share the cores with the other flipout-lm trainings on this "
                      "machine (lm/train/threads.py)")
    progress: bool = _f(True, "show a tqdm progress bar on a terminal")
    tensorboard: bool = _f(False, "also log each validation to TensorBoard in <run dir>/tensorboard "
                           "(needs pip install -e .[tensorboard])")
    precision: str = _f("fp32", "'fp32', 'bf16' or 'fp16' (autocast; fp16 with loss scaling); parameters, "
                        "optimizer state, the LSTM state and the loss stay float32 (docs/hardware.md)")
    tf32: bool = _f(False, "allow TF32 for float32 matmuls and cuDNN on GPUs (off: IEEE float32 everywhere)")
    cuda_graphs: bool = _f(False, "capture each training window's forward and backward in a CUDA graph per "
                           "window length (docs/gpu.md); eager where capture is impossible, with the reason "
                           "in the start-up summary")
    cuda_graph_lengths: int = _f(8, "with variable_bptt: how many of the most likely window lengths get a graph "
                                 "(the rest run eagerly; each graph holds about one step's activations)")

    def __post_init__(self) -> None:
        for key in ("batch_size", "bptt", "max_epochs"):
            _check(f"train.{key}", getattr(self, key) > 0, "a positive integer", getattr(self, key))
        if self.variable_bptt_max is not None:
            _check("train.variable_bptt_max", self.variable_bptt_max >= self.bptt, "an integer >= train.bptt or null",
                   self.variable_bptt_max)
        if self.max_steps is not None:
            _check("train.max_steps", self.max_steps > 0, "a positive integer or null", self.max_steps)
        _check("train.eval_every_steps", self.eval_every_steps >= 0, "a non-negative integer", self.eval_every_steps)
        _check("train.patience", self.patience >= 0, "a non-negative integer", self.patience)
        _check("train.threads", self.threads >= 0, "a non-negative integer", self.threads)
        _check("train.cuda_graph_lengths", self.cuda_graph_lengths > 0, "a positive integer", self.cuda_graph_lengths)
        _choice("train.device", self.device, ["auto", "cpu", "cuda"])
        _choice("train.precision", self.precision, ["fp32", "bf16", "fp16"])


@dataclass
class EvalConfig:
    batch_size: int = _f(10, "evaluation batch size: streams of len/B tokens; smaller keeps more context "
                         "and drops fewer tail tokens (N mod B), larger is faster")
    bptt: int = _f(100, "evaluation window (hidden state carries across windows, so it only affects speed)")
    max_tokens: Optional[int] = _f(None, "score only the first N tokens of valid/test (smoke runs); null = all")

    def __post_init__(self) -> None:
        _check("eval.batch_size", self.batch_size > 0, "a positive integer", self.batch_size)
        _check("eval.bptt", self.bptt > 0, "a positive integer", self.bptt)
        if self.max_tokens is not None:
            _check("eval.max_tokens", self.max_tokens > 1, "an integer > 1 or null", self.max_tokens)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # section -> dataclass
