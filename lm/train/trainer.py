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
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from lm.config import Config, to_dict
from lm.data import Corpus, batchify
from lm.data.batching import num_windows
from lm.data.custom import load_data, save_tokenizer
from lm.eval.evaluation import evaluate
from lm.eval.metrics import add_text_bpc, from_nats, metric_name
from lm.files import atomic_write
from lm.nn.device import resolve_device
from lm.nn.model import LanguageModel, count_parameters, detach_state
from lm.nn.rng import shared_noise
from lm.train import report, snapshot
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
        for line in report.startup_lines(cfg, self.run_dir, resume, str(self.device), self.threads.describe()):
            say(line)  # before data loading: a redirected log says at once what runs where
        self.noise = agree_on_noise(self.dist, self.device)  # every process the same generator, or a one-line error
        self.precision = Precision(cfg.train.precision, self.device, cfg.train.tf32)  # sets the TF32 flags
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
        self.opt = Optimization(cfg, self.model)
        self.act_reg = ActivationRegularizer(cfg.regularizer.ar, cfg.regularizer.tar)  # AR/TAR (Merity 2017)
        self.epoch = self.step = self.pos = self.bad_validations = 0
        self.best_val, self.best_epoch, self.best_step = math.inf, 0, 0
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
            rng_ranks = ck.get("rng_ranks")
            self.resume_event = apply_overrides(self.opt, ck["config"], cfg)
        self.dist.seed_noise(cfg.train.seed, self.step, rng_ranks, self.device)  # no-op in one process
        self.tb = TensorBoard(self.run_dir / "tensorboard") if cfg.train.tensorboard and self.dist.is_main else None

    # -- checkpoints ------------------------------------------------------------------
    _payload = snapshot.payload
    _restore = snapshot.restore

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

    def validate(self, train_loss: float) -> bool:
        """Evaluate, checkpoint, apply the schedule and early stopping; return True to stop."""
        with self.opt.averaged_weights():
            val = self.evaluate("valid")
            improved = val["loss"] < self.best_val
            if improved:
                self.best_val, self.best_epoch, self.best_step = val["loss"], self.epoch, self.step
                self.bad_validations = 0
                self.save("best.pt", {k: v.clone() for k, v in self.model.state_dict().items()})
        if not improved:
            self.bad_validations += 1
        event = "; ".join(e for e in (self.resume_event, self.opt.after_validation(val["loss"])) if e)
        self.resume_event = ""
        m = metric_name(self.level)
        record = {"epoch": self.epoch + self.pos / max(1, self.train_data.size(0) - 1), "step": self.step,
                  "lr": self.opt.lr, "train_loss": train_loss, f"train_{m}": from_nats(train_loss, self.level),
                  "valid_loss": val["loss"], f"valid_{m}": val[m],
                  "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9), "elapsed_s": self.wall,
                  "best": improved, "event": event, **{f"valid_{k}": val[k] for k in ("text_bpc",) if k in val},
                  **self.model.regularizer.log_stats(), **self.act_reg.flush()}  # bbb: kl, kl_weight, sigma_mean
        if self.dist.is_main:
            self._log(record, val, improved, event)
        self.save("last.pt")
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.set_step_lr(x.size(0))
        self.model.train()
        with shared_noise(self.cfg.train.seed, self.step), self.precision.autocast():  # keyed shared noise; bf16/fp16 matmuls
            if self.act_reg.active:
                logits, state, (raw, dropped) = self.net(x, self.state, return_outputs=True)
            else:
                logits, state = self.net(x, self.state)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # reported; AR/TAR and KL only in the gradient
        objective = loss + self.act_reg.penalty(raw.float(), dropped.float()) if self.act_reg.active else loss
        extra = self.model.regularizer.extra_loss(self.step, self.corpus.train.numel())  # bbb: weighted KL/N
        value = guarded_update(objective if extra is None else objective + extra, loss, self.model, self.opt.optimizer,
                               self.scaler, self.cfg.optim.clip, self.dist.mean, self.step + 1)
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
        finally:
            self.threads.stop()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _fit(self) -> int:
        t = self.cfg.train
        m = metric_name(self.level)
        stop = self.epoch >= t.max_epochs or (t.max_steps is not None and self.step >= t.max_steps)
        while not stop:
            windows = num_windows(self.train_data, t.bptt)
            done = min(windows, self.pos // t.bptt)
            bar = tqdm(total=report.bar_span(windows, done, self.step, t.max_steps), initial=done,
                       desc=report.bar_label(self.epoch, t.max_epochs, self.step, t.max_steps, windows, done),
                       disable=None if t.progress and self.dist.is_main else True, leave=False, dynamic_ncols=True)
            for row, x, y in self.dist.windows(self.train_data, t.bptt, self.pos, t.variable_bptt, t.seed, self.epoch):
                start = time.perf_counter()
                loss = self.train_step(x, y)
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
                    stop = self.validate(self._interval_loss()) or capped
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
                    stop = self.validate(self._interval_loss())
                stop = stop or self.epoch >= t.max_epochs
        self.finish()
        return 0

    def _interval_loss(self) -> float:
        """Mean training loss since the last validation; the sums restart (before validate saves last.pt)."""
        mean = self.loss_sum / self.loss_count
        self.loss_sum, self.loss_count = 0.0, 0
        return mean

    def finish(self) -> dict:
        """Evaluate best.pt on valid and test and write results.json."""
        if self.dist.is_main:  # only rank 0 evaluates, and only its file system surely has best.pt
            self.model.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["model"])
        results = {
            "level": self.level, "regularizer": self.cfg.regularizer.name, "seed": self.cfg.train.seed,
            "params": count_parameters(self.model), "epochs": self.epoch + self.pos / max(1, self.train_data.size(0) - 1),
            "steps": self.step, "best_epoch": self.best_epoch, "best_step": self.best_step,
            "train_tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9), "wall_s": self.wall,
            "valid": self.evaluate("valid"), "test": self.evaluate("test"),
            "precision": self.precision.describe(),
        }
        if not self.dist.is_main:
            return results
        text = json.dumps(results, indent=2)
        atomic_write(self.run_dir / "results.json", lambda tmp: tmp.write_text(text + "\n"))
        m = metric_name(self.level)
        log(f"best checkpoint (step {self.best_step}): valid {m} {results['valid'][m]:.4f} | "
                   f"test {m} {results['test'][m]:.4f} -> {self.run_dir}/results.json")
        return results
