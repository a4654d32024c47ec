"""Checks that run before anything in the run directory is touched: sizes and memory.

A batch larger than its data, or a model that cannot fit in memory, must be a one-line
:class:`UserError` at start-up, not a traceback after hours of training (at the first
validation) or after ``--force`` has already removed the previous run.
"""

from __future__ import annotations

import os

import torch

from lm.config import Config, ModelConfig
from lm.errors import UserError

GIB = 1024 ** 3


def check_split_size(name: str, tokens: int, batch: int, key: str, fix: str) -> None:
    """``batchify`` needs at least two rows: ``tokens >= 2 * batch``."""
    if tokens < 2 * batch:
        raise UserError(f"{name} has {tokens} tokens, too few for {key}={batch} (needs at least {2 * batch}): "
                        f"{fix}")


def check_sizes(cfg: Config, corpus, world: int = 1) -> None:
    """Train and eval batch sizes against the split lengths, and train.bptt against the stream length.

    Args:
        corpus: a :class:`lm.data.Corpus` (``train`` already cut to ``data.train_tokens``).
        world: processes under torchrun (``train.batch_size`` is the global batch).
    """
    t, e = cfg.train, cfg.eval
    n = corpus.train.numel()
    check_split_size("the training split", n, t.batch_size, "train.batch_size",
                     "lower train.batch_size" + (" or raise data.train_tokens" if cfg.data.train_tokens else ""))
    rows = n // t.batch_size
    if t.bptt > rows - 1:
        raise UserError(f"train.bptt={t.bptt} is longer than each of the {t.batch_size} training streams "
                        f"({rows} tokens): lower train.bptt or train.batch_size")
    for split in ("valid", "test"):
        size = corpus.split(split).numel()
        if e.max_tokens:
            size = min(size, e.max_tokens)
        check_split_size(f"the {split} split" + (f" (eval.max_tokens={e.max_tokens})" if e.max_tokens else ""),
                         size, e.batch_size, "eval.batch_size",
                         "lower eval.batch_size" + (" or raise eval.max_tokens" if e.max_tokens else ""))
    del world  # divisibility by the process count is checked where the streams are cut (distributed.py)


def parameter_count(m: ModelConfig, vocab: int) -> int:
    """Parameters :class:`lm.nn.model.LanguageModel` will have, computed from the config (no allocation)."""
    count = 0 if m.input == "onehot" else vocab * m.emb_size
    n_in = vocab if m.input == "onehot" else m.emb_size
    for h in m.layer_sizes:  # a tied last layer has emb_size units (AWD-LSTM)
        count += 4 * h * (n_in + h) + 8 * h
        n_in = h
    count += vocab  # decoder bias
    if not m.tie_weights:
        count += n_in * vocab
    return count


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CPU: MemAvailable of /proc/meminfo), or None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: Config, vocab: int, device: torch.device) -> int:
    """Refuse a model whose weights, gradients and optimizer state alone exceed the free memory.

    A lower bound on what training needs (activations come on top): 4 bytes per parameter for
    the weights and as many for the gradients, plus 8 for Adam's two moments (SGD: 0; NT-ASGD
    adds its average later). Returns the estimate in bytes.
    """
    params = parameter_count(cfg.model, vocab)
    copies = 2 + (2 if cfg.optim.name in ("adam", "amsgrad") else 0) + (1 if cfg.optim.name == "amsgrad" else 0)
    need = 4 * params * copies
    free = available_memory(device)
    if free is not None and need > free:
        m = cfg.model
        raise UserError(f"the model is too large for this machine: {params:,} parameters (model.hidden_size="
                        f"{m.hidden_size}, model.num_layers={m.num_layers}, model.emb_size={m.emb_size}, vocabulary "
                        f"{vocab}) need at least {need / GIB:.1f} GiB for weights, gradients and optimizer state, "
                        f"but {free / GIB:.1f} GiB is free on {device}: lower model.hidden_size or model.num_layers")
    return need


def allocation_error(e: BaseException, cfg: Config, vocab: int) -> UserError | None:
    """A one-line error for an out-of-memory failure while building the model, else None."""
    text = str(e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
            or "out of memory" in text.lower():
        params = parameter_count(cfg.model, vocab)
        return UserError(f"out of memory while building the model ({params:,} parameters, "
                         f"model.hidden_size={cfg.model.hidden_size}): lower model.hidden_size or model.num_layers")
    return None
