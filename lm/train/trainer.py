"""The training loop: truncated BPTT, clipping, lr schedule, validation, checkpoints, resume.

One :class:`Trainer` owns one run directory::

    config.yaml     the resolved config
    metrics.jsonl   one JSON object per validation
    best.pt         best validation state (averaged weights once NT-ASGD is on)
    last.pt         everything needed to resume exactly (model, optimizer, schedule, RNG,
                    epoch/step, position in the epoch and the carried hidden state)
    results.json    valid and test figures of best.pt, parameter count, timings
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from lm.config import Config, to_dict
from lm.data import Corpus, batchify
from lm.data.batching import num_windows
from lm.data.custom import load_data, save_tokenizer
from lm.eval.evaluation import evaluate
from lm.eval.metrics import add_text_bpc, from_nats, metric_name
from lm.errors import UserError
from lm.files import atomic_write
from lm.nn import hardware
from lm.nn.device import resolve_device
from lm.nn.model import LanguageModel, count_parameters, detach_state
from lm.nn.rng import shared_noise
from lm.train import failure, graphs, malloc, report, results, snapshot
from lm.train.report import log
from lm.train.activation_reg import ActivationRegularizer
from lm.nn.precision import Precision
from lm.train.checkpoint import load_checkpoint, save_checkpoint
from lm.train.distributed import Single, agree_on_noise, current
from lm.train.optim import Optimization
from lm.train.preflight import allocation_error, check_memory, check_sizes
from lm.train.resume import apply_overrides
from lm.train.rundir import diverged_note, storage_failure
from lm.train.step import Diverged, guarded_update
from lm.train.tensorboard import TensorBoard
from lm.train.threads import ThreadPolicy

EXIT_INTERRUPTED = 128  # + signal number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM
EXIT_DIVERGED = 1


class Trainer:
    """Train ``cfg`` into ``run_dir`` (fresh, or continued from ``run_dir/last.pt`` with ``resume``).

    ``dist`` (default: :func:`lm.train.distributed.current`) makes it one rank of a torchrun job.
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, corpus: Corpus | None = None,
                 dist: Single | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = dist or current()
        self.device = self.dist.device(resolve_device(cfg.train.device))
        self.threads = ThreadPolicy(cfg.train.threads, enabled=self.device.type == "cpu")  # lm/train/threads.py
        self.threads.start()
        say = report.say if self.dist.is_main else (lambda line: None)
        for line in report.startup_lines(cfg, self.run_dir, resume, hardware.describe(self.device),
                                         self.threads.describe()):
            say(line)  # before data loading: a redirected log says at once what runs where
        self.noise = agree_on_noise(self.dist, self.device)  # every process the same generator, or a one-line error
        self.precision = Precision(cfg.train.precision, self.device, cfg.train.tf32)  # sets the TF32 flags
        for line in report.precision_lines(self.precision):  # what runs in which dtype here, and why
            say(line)
        self.scaler = self.precision.scaler()  # fp16 loss scaling; a pass-through otherwise
        torch.manual_seed(cfg.train.seed)
        # a resumed run reuses its own tokenizer; rank 0 loads first (it fills caches, trains SentencePiece)
        self.corpus = corpus or self.dist.main_first(lambda: load_data(cfg, self.run_dir if resume else None),
                                                     lambda c: c.vocab)
        self.level = self.corpus.level
        check_sizes(cfg, self.corpus, self.dist.world)  # a batch larger than its data fails now, not at validation
        check_memory(cfg, len(self.corpus.vocab), self.device)
        try:
            self.model = LanguageModel(cfg.model, cfg.regularizer, len(self.corpus.vocab)).to(self.device)
        except (RuntimeError, MemoryError) as e:
            raise allocation_error(e, cfg, len(self.corpus.vocab)) or e from None
        self.train_data = self.dist.shard(batchify(self.corpus.train, cfg.train.batch_size)).to(self.device)
        self.net = self.dist.wrap(self.model, self.device)  # the model, or DDP around it
        say(report.data_line(self.corpus, num_windows(self.train_data, cfg.train.bptt)))
        say(report.model_line(count_parameters(self.model)))
        say(report.kernel_line(str(self.device)))
        say(report.noise_line(self.noise))
        if self.device.type == "cpu":  # window-long blocks back to the system when freed (lm/train/malloc.py)
            say(report.memory_line(malloc.tune()))
        self.opt = Optimization(cfg, self.model)
        self.act_reg = ActivationRegularizer(cfg.regularizer.ar, cfg.regularizer.tar)  # AR/TAR (Merity 2017)
        self.windows = graphs.for_run(cfg, self.device, self.act_reg.active, self.dist.world, self.forward_backward,
                                      list(self.model.parameters()))
        if cfg.train.cuda_graphs:
            say(self.windows.describe())
        self.epoch = self.step = self.pos = self.bad_validations = 0
        self.best_val, self.best_epoch, self.best_step = math.inf, 0.0, 0
        self.best_tokens: int | None = None  # validation tokens the best score was computed on
        self.pending = False  # a validation that failed before the last exit: repeated first (lm/train/failure.py)
        self.phase, self.before = "start", None  # where the loop is, and last.pt's bytes before a validation
        self.saved_step: int | None = None  # step of the last.pt this process wrote or resumed from
        self.elapsed, self.tokens_seen = 0.0, 0  # training-step seconds and tokens (for tokens/s)
        self.loss_sum, self.loss_count = 0.0, 0  # training losses since the last validation (saved in last.pt)
        self.wall_offset, self._wall_start = 0.0, time.perf_counter()  # wall clock incl. validation
        self.state = self.model.init_state(self.train_data.size(1))
        self.interrupted: int | None = None
        rng_ranks = None  # every process's noise stream from last.pt
        self.resume_event = ""  # overrides applied on resume, logged with the next validation
        if resume:
            ck = load_checkpoint(self.run_dir / "last.pt")
            self._restore(ck)
            self.saved_step = self.step
            rng_ranks = ck.get("rng_ranks")
            self.resume_event = apply_overrides(self.opt, ck["config"], cfg)
        self.dist.seed_noise(cfg.train.seed, self.step, rng_ranks, self.device)  # no-op in one process
        self.tb = TensorBoard(self.run_dir / "tensorboard") if cfg.train.tensorboard and self.dist.is_main else None

    # -- checkpoints ------------------------------------------------------------------
    _payload = snapshot.payload
    _restore = snapshot.restore
    finish = results.finish  # best.pt on valid and test, results.json

    @property
    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self._wall_start

    def save(self, name: str, model_state: dict | None = None) -> None:
        payload = self._payload(model_state)  # on every rank: it gathers the hidden state
        bad = [k for k, v in payload["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never let a checkpoint hold what a diverged step wrote
            raise Diverged(f"non-finite weights ({bad[0]}) at step {self.step}")
        if self.dist.is_main:
            save_checkpoint(self.run_dir / name, payload)
            if name == "last.pt":
                self.saved_step = self.step

    def write_config(self) -> None:
        if not self.dist.is_main:
            return
        save_tokenizer(self.corpus, self.run_dir)
        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        atomic_write(self.run_dir / "config.yaml", lambda tmp: tmp.write_text(text))

    # -- validation and schedule ------------------------------------------------------
    def evaluate(self, split: str) -> dict:
        """Score the current weights on ``split`` (its first ``eval.max_tokens`` tokens if set)."""
        e = self.cfg.eval
        data = self.corpus.split(split)[: e.max_tokens] if e.max_tokens else self.corpus.split(split)
        return self.dist.from_main(lambda: add_text_bpc(evaluate(self.model, data, self.level, e.batch_size, e.bptt,
                                                                 self.precision),
                                                        self.corpus, split))

    @property
    def epochs_done(self) -> float:
        """Fractional epochs trained (the ``epoch`` of metrics.jsonl and ``best_epoch`` of results.json)."""
        return self.epoch + self.pos / max(1, self.train_data.size(0) - 1)

    def validate(self) -> bool:
        """Evaluate, checkpoint, apply the schedule and early stopping; return True to stop."""
        self.phase = "validation"
        self.before = failure.before_validation(self)  # written as last.pt if this validation fails
        train_loss = self._interval_loss()
        with self.opt.averaged_weights():
            val = self.evaluate("valid")
            improved = val["loss"] < self.best_val
            if improved:
                self.best_val, self.best_epoch, self.best_step = val["loss"], self.epochs_done, self.step
                self.best_tokens = int(val["tokens"])
                self.bad_validations = 0
                self.save("best.pt", {k: v.clone() for k, v in self.model.state_dict().items()})
        if not improved:
            self.bad_validations += 1
        event = "; ".join(e for e in (self.resume_event, self.opt.after_validation(val["loss"])) if e)
        self.resume_event = ""
        m = metric_name(self.level)
        record = {"epoch": self.epochs_done, "step": self.step,
                  "lr": self.opt.lr, "train_loss": train_loss, f"train_{m}": from_nats(train_loss, self.level),
                  "valid_loss": val["loss"], f"valid_{m}": val[m], "valid_tokens": int(val["tokens"]),
                  "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9), "elapsed_s": self.wall,
                  "best": improved, "event": event, **{f"valid_{k}": val[k] for k in ("text_bpc",) if k in val},
                  **self.model.regularizer.log_stats(), **self.act_reg.flush()}  # bbb: kl, kl_weight, sigma_mean
        if self.dist.is_main:
            self._log(record, val, improved, event)
        self.loss_sum, self.loss_count, self.pending = 0.0, 0, False  # the interval is done
        self.save("last.pt")
        self.phase, self.before = "loop", None
        return bool(self.cfg.train.patience) and self.bad_validations >= self.cfg.train.patience

    def _log(self, record: dict, val: dict, improved: bool, event: str) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.log(record, self.step)
        log(report.validation_line(record, metric_name(self.level), self.opt.lr, self.wall, improved, event))

    # -- training ---------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.interrupted = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One window's forward, loss and backward into fresh ``.grad`` (what a CUDA graph captures)."""
        with self.precision.autocast():  # bf16/fp16 matmuls
            # the mean cross-entropy, reported; AR/TAR and KL only in the gradient
            if self.act_reg.active:
                loss, state, (raw, dropped) = self.net(x, state, return_outputs=True, targets=y)
            else:
                loss, state = self.net(x, state, targets=y)
        objective = loss + self.act_reg.penalty(raw.float(), dropped.float()) if self.act_reg.active else loss
        extra = self.model.regularizer.extra_loss(self.step, self.corpus.train.numel())  # bbb: weighted KL/N
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective if extra is None else objective + extra).backward()
        return loss.detach(), state

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.set_step_lr(x.size(0))
        self.model.train()
        # keyed shared noise and flipout signs (lm.nn.rng), a graph's redraws too
        with shared_noise(self.cfg.train.seed, self.step, self.dist.rank):
            loss, state = self.windows(x, y, self.state)  # eager, or a CUDA graph (lm/train/graphs.py)
        value = guarded_update(loss, self.model, self.opt.optimizer, self.scaler, self.cfg.optim.clip, self.dist.mean,
                               self.step + 1)
        self.state = detach_state(state)
        return value

    def fit(self) -> int:
        """Train until max_epochs, max_steps, early stopping or a signal. Returns an exit code."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.write_config()
        except OSError as e:
            raise storage_failure(self.run_dir, e) from None
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._wall_start = time.perf_counter()  # wall time counts from the first step, not data loading
        try:
            return self._fit()
        except Diverged as e:
            if self.dist.is_main:
                tqdm.write(f"error: {e}; stopped without saving: {diverged_note(self.run_dir)} (lower optim.lr or "
                           "set optim.clip)", file=sys.stderr)
            return EXIT_DIVERGED
        except OSError as e:  # disk full, read-only file system: atomic writes left the earlier files intact
            raise storage_failure(self.run_dir, e) from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  # unexpected: keep the training, say where it stopped
            return failure.report(self, e)
        finally:
            self.threads.stop()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _fit(self) -> int:
        t = self.cfg.train
        m = metric_name(self.level)
        self.phase = "loop"
        stop = self.validate() if self.pending else False  # the validation that failed before the last exit
        stop = (stop or self.epoch >= t.max_epochs or (t.max_steps is not None and self.step >= t.max_steps)
                or bool(t.patience and self.bad_validations >= t.patience))
        while not stop:
            windows = num_windows(self.train_data, t.bptt)
            done = min(windows, self.pos // t.bptt)
            bar = tqdm(total=report.bar_span(windows, done, self.step, t.max_steps), initial=done,
                       desc=report.bar_label(self.epoch, t.max_epochs, self.step, t.max_steps, windows, done),
                       disable=None if t.progress and self.dist.is_main else True, leave=False, dynamic_ncols=True)
            for row, x, y in self.dist.windows(self.train_data, t.bptt, self.pos, t.variable_bptt, t.seed, self.epoch,
                                                   t.variable_bptt_max):
                start = time.perf_counter()
                self.phase = "step"
                loss = self.train_step(x, y)
                self.phase = "loop"
                self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
                self.elapsed += time.perf_counter() - start
                self.tokens_seen += y.numel() * self.dist.world
                self.step += 1
                self.pos = row + x.size(0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", **{m: f"{from_nats(loss, self.level):.3f}"},
                                tok_s=f"{self.tokens_seen / max(self.elapsed, 1e-9):.0f}")
                if self.threads.maybe_adjust() and self.dist.is_main:
                    log(f"threads: {self.threads.describe()}")
                self.interrupted = self.dist.stop_signal(self.interrupted)
                if self.interrupted is not None:
                    break
                capped = t.max_steps is not None and self.step >= t.max_steps
                if (t.eval_every_steps and self.step % t.eval_every_steps == 0) or capped:
                    stop = self.validate() or capped
                    if stop:
                        break
            bar.close()
            if self.interrupted is not None:
                self.save("last.pt")
                if self.dist.is_main:
                    log(f"interrupted at step {self.step}; saved {self.run_dir}/last.pt. Resume with: "
                               f"python train.py --run-dir {self.run_dir} --resume")
                return EXIT_INTERRUPTED + self.interrupted
            if self.pos >= self.train_data.size(0) - 1:  # epoch complete
                self.epoch, self.pos = self.epoch + 1, 0
                self.state = self.model.init_state(self.train_data.size(1))
                if not stop and self.loss_count and (not t.eval_every_steps or self.epoch >= t.max_epochs):
                    stop = self.validate()
                stop = stop or self.epoch >= t.max_epochs
        self.phase = "finish"
        self.finish()
        return 0

    def _interval_loss(self) -> float:
        """Mean training loss since the last validation (validate restarts the sums before it saves last.pt)."""
        return self.loss_sum / max(1, self.loss_count)
