"""What ``last.pt`` holds for an exact resume, and putting it back.

Model, optimizer and schedule (:class:`lm.train.optim.Optimization`), fp16's gradient scaler,
every process's random state, the position in the epoch, the carried hidden state, the
bookkeeping of validation and timing, and the running training-loss sums. The functions take
the trainer as ``self`` (they are its methods, kept apart to keep the loop readable).
"""

from __future__ import annotations

import torch

from lm.config import to_dict
from lm.nn.model import count_parameters
from lm.train.streams import rng_state


def payload(self, model_state: dict | None = None) -> dict:
    """Everything ``last.pt`` holds to resume ``self`` (a :class:`lm.train.trainer.Trainer`) exactly."""
    rng = rng_state(self.device)
    return {
        "config": to_dict(self.cfg), "vocab": self.corpus.vocab, "params": count_parameters(self.model),
        "model": model_state or self.model.state_dict(), **self.opt.state_dict(), "rng": rng,
        "rng_ranks": self.dist.gather_rng(rng),  # every process's stream, for an exact resume
        "epoch": self.epoch, "step": self.step, "pos": self.pos,
        # clone: the carried state can be a view of the whole window's output, which torch.save would store
        "hidden": [[h.cpu().clone(), c.cpu().clone()] for h, c in self.dist.gather_state(self.state)],
        "best_val": self.best_val, "best_epoch": self.best_epoch, "best_step": self.best_step,
        "best_tokens": self.best_tokens, "pending_validation": self.pending,
        "bad_validations": self.bad_validations, "elapsed": self.elapsed, "tokens_seen": self.tokens_seen,
        "wall": self.wall, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
        **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
    }


def restore(self, ck: dict) -> None:
    """Put ``self`` (a :class:`lm.train.trainer.Trainer`) back in the state :func:`payload` saved."""
    self.model.load_state_dict(ck["model"])
    self.opt.load_state_dict(ck)
    if "scaler" in ck and self.scaler.is_enabled():
        self.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["cpu"])
    if "cuda" in ck["rng"] and self.device.type == "cuda":
        torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
    for key in ("epoch", "step", "pos", "best_step", "bad_validations", "tokens_seen"):
        setattr(self, key, int(ck[key]))
    self.best_epoch = float(ck["best_epoch"])
    self.best_tokens = int(ck["best_tokens"]) if ck.get("best_tokens") is not None else None
    self.pending = bool(ck.get("pending_validation", False))  # a validation that failed: repeated first
    self.best_val, self.elapsed = float(ck["best_val"]), float(ck["elapsed"])
    self.wall_offset = float(ck["wall"])
    self.loss_sum, self.loss_count = float(ck.get("loss_sum", 0.0)), int(ck.get("loss_count", 0))
    self.state = self.dist.shard_state([(h.to(self.device), c.to(self.device)) for h, c in ck["hidden"]])
