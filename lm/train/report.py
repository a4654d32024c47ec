"""What a training tells its user: the start-up summary and the progress bar's span and label.

The summary is printed line by line as the facts become known (config, run directory, device,
threads and precision at once; data after loading; parameters after building the model), each
line flushed, so a redirected log (``nohup``, a batch system) says within a second what runs
where, instead of staying empty until the first validation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from lm.config import Config
from lm.data.ptb import data_root
from lm.nn import cext, steps

_REGULARIZER_KEYS = ("weight_p", "sigma", "perturb_ih", "resample_per_step", "hidden_p", "cell_p", "zoneout_c",
                     "zoneout_h", "embed_p", "input_p", "between_p", "output_p")


def log(message: str) -> None:
    """A line above the progress bar, flushed so that ``nohup``/redirected logs stay current."""
    tqdm.write(message)
    sys.stdout.flush()


def validation_line(record: dict, m: str, lr: float, wall: float, improved: bool, event: str) -> str:
    """The one line a validation prints (``m``: 'bpc' or 'ppl'); bbb's KL figures when present."""
    return (f"| epoch {record['epoch']:6.2f} | step {record['step']:7d} | lr {lr:.3g} | train {m} "
            f"{record[f'train_{m}']:8.3f} | valid {m} {record[f'valid_{m}']:8.3f} | {record['tokens_per_s']:8.0f} "
            f"tok/s | {wall:7.0f}s{' *' if improved else ''}{f' [{event}]' if event else ''}"
            + "".join(f" | {k} {record[k]:.3g}" for k in ("kl", "kl_weight", "sigma_mean") if k in record))


def say(line: str) -> None:
    """Print one summary line at once (also when stdout is a file or a pipe)."""
    print(line, flush=True)
    sys.stdout.flush()


def precision_of(cfg: Config) -> str:
    return getattr(cfg.train, "precision", "fp32")


def describe_config(cfg: Config) -> str:
    m, o, t = cfg.model, cfg.optim, cfg.train
    inp = "one-hot input" if m.input == "onehot" else f"{m.emb_size}-d embedding{', tied' if m.tie_weights else ''}"
    stop = [f"up to {t.max_epochs} epochs"]
    if t.max_steps is not None:
        stop.append(f"at most {t.max_steps} steps")
    if t.patience:
        stop.append(f"patience {t.patience}")
    sched = "" if o.schedule == "none" else f", {o.schedule}"
    return (f"{cfg.data.level if cfg.data.path is None else 'own corpus'}, {m.num_layers}x{m.hidden_size} LSTM, "
            f"{inp}; {o.name} lr {o.lr:g}, clip {o.clip:g}{sched}; batch {t.batch_size} x bptt {t.bptt}"
            f"{' (variable)' if t.variable_bptt else ''}; {', '.join(stop)}; seed {t.seed}")


def describe_regularizer(cfg: Config) -> str:
    r = cfg.regularizer
    rates = [f"{k}={getattr(r, k):g}" if not isinstance(getattr(r, k), bool) else k
             for k in _REGULARIZER_KEYS if getattr(r, k, 0)]
    return f"{r.name}" + (f" ({', '.join(rates)})" if rates else " (no rates set)")


def describe_source(cfg: Config) -> str:
    """Where the data will come from, said before it is loaded (mirrors lm.data.ptb.find_ptb's order)."""
    d = cfg.data
    if d.path is not None:
        return f"{d.path} ({d.tokenizer or d.level} tokens)"
    prepared = data_root() / "ptb" / d.level / "train.txt"
    if prepared.is_file():
        where = f"{prepared.parent.parent} (prepared copy)"
    elif d.ptb_dir:
        where = f"{d.ptb_dir} (data.ptb_dir)"
    elif os.environ.get("PTB_DIR"):
        where = f"{os.environ['PTB_DIR']} ($PTB_DIR)"
    else:
        where = "download into data/ptb (no local copy)"
    cap = f", first {d.train_tokens:,} training tokens" if d.train_tokens else ""
    return f"PTB {d.level} level from {where}{cap}"


def startup_lines(cfg: Config, run_dir: Path, resume: bool, device: str, threads: str) -> list[str]:
    """The summary lines known before any data is read."""
    return [
        f"flipout-lm: {'resuming' if resume else 'training'} {run_dir} (resolved config: {run_dir}/config.yaml)",
        f"  config      {describe_config(cfg)}",
        f"  regularizer {describe_regularizer(cfg)}",
        f"  device      {device} | threads {threads} | precision {precision_of(cfg)}",
        f"  data        {describe_source(cfg)} ... loading",
    ]


def precision_lines(precision) -> list[str]:
    """What runs in which dtype (``precision`` line), then its notices (a float32 fallback, bf16
    slower than fp32 on this CPU)."""
    plan, notices = precision.plan()
    return [f"  precision   {plan}", *notices]


def data_line(corpus, steps_per_epoch: int) -> str:
    sizes = " | ".join(f"{s} {corpus.split(s).numel():,}" for s in ("train", "valid", "test"))
    return f"  data        {sizes} tokens, vocabulary {len(corpus.vocab):,}; {steps_per_epoch:,} steps per epoch"


def model_line(params: int) -> str:
    return f"  model       {params:,} parameters ({params * 4 / 1e6:.1f} MB of fp32 weights)"


def kernel_line(device: str) -> str:
    """How the window kernel's recurrence steps run: the fused C step on a CPU (built now, once,
    or loaded from the cache; its one-time build cost is printed), else torch ops, or what
    ``FLIPOUT_LM_STEP`` chose (lm.nn.steps)."""
    chosen = steps.describe(device)
    if chosen:
        return f"  steps       {chosen}"
    if not device.startswith("cpu"):
        return "  steps       torch ops (the fused C step is CPU-only; FLIPOUT_LM_STEP=triton: the Triton step)"
    return f"  steps       {cext.status('lstm_step').describe()}"


def memory_line(text: str) -> str:
    """What glibc's malloc does with large blocks in a CPU training (lm/train/malloc.py)."""
    return f"  memory      {text}"


def noise_line(generator: str) -> str:
    """Which generator draws the training noise (``philox`` or ``torch``, and why not Philox)."""
    return f"  noise       {generator}"


# -- the progress bar ---------------------------------------------------------------------

def bar_span(windows: int, done: int, step: int, max_steps: int | None) -> int:
    """The bar's total for the current epoch: its windows, or fewer when ``max_steps`` ends the run first.

    Args:
        windows: windows in the epoch; done: windows already trained in it (after a resume);
        step: optimizer steps so far; max_steps: ``train.max_steps`` (None = no cap).
    """
    if max_steps is None:
        return windows
    return min(windows, done + max(0, max_steps - step))


def bar_label(epoch: int, max_epochs: int, step: int, max_steps: int | None, windows: int, done: int) -> str:
    """``epoch 3/50``, plus where the run stops when ``max_steps`` falls inside this epoch."""
    label = f"epoch {epoch + 1}/{max_epochs}"
    if max_steps is not None and done + max_steps - step < windows:
        label += f" (run ends at step {max_steps:,})"
    return label
