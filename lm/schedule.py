"""Merity et al. (2017)'s nonmonotonic criterion, used to decay the lr or to switch to ASGD.

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
