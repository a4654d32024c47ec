"""The optimizer and its schedule: Merity et al. (2017)'s nonmonotonic criterion, lr decay, NT-ASGD.

:class:`Optimization` owns the optimizer, the base learning rate and the criterion's log, and
saves/restores them for last.pt; the trainer asks it for a step's lr and for the weights to
validate (the ASGD averages once NT-ASGD is on).

The criterion: 
After each validation: trigger when more than ``n`` validations are logged and the current
loss is worse than the best of all but the last ``n`` (AWD-LSTM ``main.py``: ``len(log) > n and
val > min(log[:-n])``, checked before the current loss is appended).

Choices the Flipout paper leaves open (App. D.1 says only "decayed the learning rate by a
factor of 4 based on the nonmonotonic criterion"): ``n`` = ``optim.nonmono`` (default 5, AWD's
default, one validation per epoch); after a decay the log is cleared
(``optim.reset_log_on_decay``, default true) so that the next decay needs ``n`` fresh
validations instead of firing again at once on the same stale minimum.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lm.config import Config


class NonMonotonic:
    """Args: n: the non-monotone interval."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.log: list[float] = []

    def step(self, val_loss: float) -> bool:
        """Record ``val_loss``; return True when the criterion fires."""
        older = self.log[: len(self.log) - self.n]
        fired = len(self.log) > self.n and bool(older) and val_loss > min(older)
        self.log.append(val_loss)
        return fired

    def reset(self) -> None:
        self.log.clear()

    def state_dict(self) -> dict:
        return {"n": self.n, "log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.log = int(state["n"]), [float(v) for v in state["log"]]


def fused_adam_ok(params: list) -> bool:
    """Whether torch's fused Adam applies: every parameter a floating tensor on a CPU or CUDA device.
    It updates each tensor in one kernel instead of about ten ops (the char model's AMSGrad step on
    2 CPU cores: 22 ms -> 2.3 ms, bench/fused_step.py); same algorithm and state_dict, float
    rounding in a different order."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def make_optimizer(cfg: Config, params, asgd: bool = False) -> torch.optim.Optimizer:
    o = cfg.optim
    params = list(params)
    if asgd:  # AWD-LSTM's NT-ASGD: averaging starts at once (t0=0), no lr decay (lambd=0)
        return torch.optim.ASGD(params, lr=o.lr, t0=0, lambd=0.0, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, amsgrad=o.name == "amsgrad",
                            fused=fused_adam_ok(params) or None)


class Optimization:
    """The optimizer of ``model`` with ``optim.schedule`` applied after each validation.

    Attributes:
        optimizer: the current optimizer (replaced by ASGD when NT-ASGD switches).
        lr: the base learning rate (decayed by ``nonmono_decay``).
        asgd: whether NT-ASGD has switched.
    """

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg, self.model = cfg, model
        self.nonmono = NonMonotonic(cfg.optim.nonmono)
        self.asgd = False
        self.optimizer = make_optimizer(cfg, model.parameters())
        self.lr = cfg.optim.lr

    def set_step_lr(self, window: int) -> None:
        """Set the lr of a step on a window of ``window`` rows (AWD's rescale by length / bptt)."""
        t = self.cfg.train
        lr = self.lr * window / t.bptt if t.variable_bptt else self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def after_validation(self, val_loss: float) -> str:
        """Apply the schedule to a validation loss; return the event for the log ('' if none)."""
        o = self.cfg.optim
        if o.schedule == "none" or self.asgd or not self.nonmono.step(val_loss):
            return ""
        if o.schedule == "nonmono_decay":
            self.lr /= o.decay_factor
            if o.reset_log_on_decay:
                self.nonmono.reset()
            return f"lr / {o.decay_factor:g}"
        self.asgd = True
        self.optimizer = make_optimizer(self.cfg, self.model.parameters(), asgd=True)
        return "switched to ASGD"

    @contextlib.contextmanager
    def averaged_weights(self):
        """Under NT-ASGD, temporarily load the averaged weights ``ax`` (AWD evaluates those)."""
        if not self.asgd:
            yield
            return
        backup = {}
        for p in self.model.parameters():
            ax = self.optimizer.state.get(p, {}).get("ax")
            if ax is not None:
                backup[p] = p.detach().clone()
                p.data.copy_(ax)
        try:
            yield
        finally:
            for p, value in backup.items():
                p.data.copy_(value)

    def state_dict(self) -> dict:
        """The keys last.pt has always held for these (``optimizer``, ``asgd``, ``lr``, ``nonmono``)."""
        return {"optimizer": self.optimizer.state_dict(), "asgd": self.asgd, "lr": self.lr,
                "nonmono": self.nonmono.state_dict()}

    def load_state_dict(self, ck: dict) -> None:
        self.asgd = bool(ck["asgd"])
        if self.asgd:
            self.optimizer = make_optimizer(self.cfg, self.model.parameters(), asgd=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.lr = float(ck["lr"])
        self.nonmono.load_state_dict(ck["nonmono"])
