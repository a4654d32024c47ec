"""What overrides do on ``--resume``, checked against last.pt before anything is written.

A resumed run continues from ``last.pt`` with its saved ``config.yaml`` as the base config.
Keys fall in three groups (docs/training.md, "Changing settings on resume"):

* fixed by the run (:data:`FIXED_SECTIONS`, :data:`FIXED_KEYS`): the data (except
  ``data.ptb_dir``, where the checksummed PTB files lie), the model, the regularizer's name, the optimizer
  and its schedule, the batch size and the seed. ``last.pt`` holds weights of that shape, a
  position in those streams, that optimizer's state and that random state, so an override of
  one of them is a one-line error (exit 2) naming the key; start a new run instead.
* applied from the next step: ``optim.lr`` replaces the current learning rate (also a decayed
  one; logged in the ``event`` of the next metrics.jsonl row), ``optim.weight_decay`` and
  ``optim.nonmono`` replace the saved optimizer's and criterion's values;
* everything else (stopping: ``train.max_epochs``, ``max_steps``, ``patience``,
  ``eval_every_steps``; ``train.bptt``, ``variable_bptt``, ``variable_bptt_max``; ``optim.clip``, ``decay_factor``,
  ``reset_log_on_decay``; regularizer rates; ``eval.bptt``; runtime keys) is read live and applies.
* ``eval.max_tokens`` and ``eval.batch_size`` decide which tokens a validation scores: once the
  run has a best validation they are fixed too (:func:`check_scoring`), since a later score on
  other tokens could not be compared with the best.

``last.pt`` itself must belong to the run: its config must agree with ``config.yaml`` on the
fixed keys, else it is a checkpoint copied from another run and is refused.
"""

from __future__ import annotations

import math

from lm.config import Config, flatten, to_dict
from lm.errors import UserError

FIXED_SECTIONS = {"data": "the vocabulary and the data position in last.pt come from it",
                  "model": "the weights in last.pt have that shape"}
FIXED_KEYS = {"regularizer.name": "the weights in last.pt were trained with it",
              "optim.name": "last.pt holds that optimizer's state",
              "optim.schedule": "last.pt holds that schedule's state",
              "train.batch_size": "last.pt holds one hidden state and position per stream",
              "train.seed": "the random state comes from last.pt"}


RELOCATABLE = {"data.ptb_dir"}  # where the files lie; their content is checked by SHA-256 anyway


def _why(key: str) -> str | None:
    if key in RELOCATABLE:
        return None
    return FIXED_KEYS.get(key) or FIXED_SECTIONS.get(key.split(".")[0])


def fixed_differences(a: dict, b: dict) -> list[str]:
    """Fixed keys on which two config dicts differ."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if _why(k) and fa.get(k) != fb.get(k))


def check_resume(saved: dict, checkpoint_config: dict, cfg: Config, run_dir, checkpoint: dict | None = None) -> None:
    """Refuse a foreign last.pt and overrides that cannot apply to a resumed run.

    Args:
        saved: the run's config.yaml; checkpoint_config: ``last.pt["config"]``; cfg: the config
        asked for (config.yaml + --config + overrides); checkpoint: last.pt itself (for its best).
    """
    foreign = fixed_differences(saved, checkpoint_config)
    if foreign:
        fs, fc = flatten(saved), flatten(checkpoint_config)
        shown = "; ".join(f"{k}: {fc.get(k)!r} vs {fs.get(k)!r}" for k in foreign[:3])
        raise UserError(f"{run_dir}/last.pt belongs to another run: its config differs from {run_dir}/config.yaml "
                        f"({shown}): put back this run's last.pt, or start a new run with --run-dir")
    changed = fixed_differences(saved, to_dict(cfg))
    if changed:
        key = changed[0]
        fs, fn = flatten(saved), flatten(to_dict(cfg))
        others = f" (also {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise UserError(f"{key} cannot change on --resume ({fs.get(key)!r} -> {fn.get(key)!r}): {_why(key)}{others}; "
                        "drop the override, or start a new run with --run-dir")
    check_scoring(checkpoint_config, cfg, run_dir, checkpoint or {})


SCORING_KEYS = ("eval.max_tokens", "eval.batch_size")  # which tokens a validation scores (eval.bptt: speed only)


def check_scoring(checkpoint_config: dict, cfg: Config, run_dir, checkpoint: dict) -> None:
    """Refuse an ``eval.*`` change that would score later validations on other tokens than the best so far.

    The best validation loss in last.pt decides which later step becomes ``best.pt``; a score on
    other tokens (``eval.max_tokens``) or other streams (``eval.batch_size``: the ``N mod B`` tail and
    the carried context differ) cannot be compared with it.
    """
    best = float(checkpoint.get("best_val", math.inf))
    if not math.isfinite(best):
        return  # no validation yet: nothing to compare with
    fc, fn = flatten(checkpoint_config), flatten(to_dict(cfg))
    changed = [k for k in SCORING_KEYS if k in fc and fc[k] != fn[k]]
    if not changed:
        return
    key = changed[0]
    tokens = checkpoint.get("best_tokens")
    on = f"{tokens:,} validation tokens" if tokens else f"the validation tokens of {key}={fc[key]!r}"
    raise UserError(f"{key} cannot change on --resume ({fc[key]!r} -> {fn[key]!r}): the best validation so far "
                    f"(step {checkpoint.get('best_step', '?')}) was scored on {on}, and a score on other tokens "
                    f"cannot be compared with it; drop the override (score best.pt on other tokens with python "
                    f"evaluate.py {run_dir}/best.pt --split valid), or start a new run with --run-dir")


def apply_overrides(opt, checkpoint_config: dict, cfg: Config) -> str:
    """Apply the overrides that replace restored state; return the event text for metrics.jsonl ('' if none).

    Args:
        opt: the restored :class:`lm.train.optim.Optimization`.
    """
    old, events = checkpoint_config.get("optim", {}), []
    o = cfg.optim
    if "lr" in old and o.lr != old["lr"]:
        events.append(f"lr set to {o.lr:g} on resume (was {opt.lr:g})")
        opt.lr = o.lr
    if "weight_decay" in old and o.weight_decay != old["weight_decay"]:
        for group in opt.optimizer.param_groups:
            group["weight_decay"] = o.weight_decay
        events.append(f"weight_decay set to {o.weight_decay:g} on resume")
    if "nonmono" in old and o.nonmono != old["nonmono"]:
        opt.nonmono.n = o.nonmono
        events.append(f"nonmono set to {o.nonmono} on resume")
    return "; ".join(events)
