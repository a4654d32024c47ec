"""The end of a training: ``best.pt`` scored on the validation and test splits, and ``results.json``."""

from __future__ import annotations

import json

from lm.eval.metrics import metric_name
from lm.files import atomic_write
from lm.nn.model import count_parameters
from lm.train.checkpoint import load_checkpoint
from lm.train.report import log


def finish(self) -> dict:
    """Evaluate best.pt on valid and test and write results.json (a method of :class:`lm.train.trainer.Trainer`)."""
    if self.dist.is_main:  # only rank 0 evaluates, and only its file system surely has best.pt
        self.model.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["model"])
    results = {
        "level": self.level, "regularizer": self.cfg.regularizer.name, "seed": self.cfg.train.seed,
        "params": count_parameters(self.model), "epochs": self.epoch + self.pos / max(1, self.train_data.size(0) - 1),
        "steps": self.step, "best_epoch": self.best_epoch, "best_step": self.best_step,
        "best_valid_tokens": self.best_tokens,  # the tokens the choice of best.pt was scored on
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
