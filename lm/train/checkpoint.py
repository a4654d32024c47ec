"""Atomic checkpoint files holding state dicts only, loaded with ``weights_only=True``, and the model they hold."""

from __future__ import annotations

from pathlib import Path

import torch

from lm.config import load_config
from lm.errors import UserError
from lm.files import atomic_write
from lm.nn.device import resolve_device
from lm.nn.model import LanguageModel

FORMAT = "flipout-lm"
VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` (plain containers and tensors) atomically, tagged with the format."""
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on CPU; a missing, corrupt or foreign file is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: give the path of a best.pt or last.pt in a run directory")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"checkpoint {path} is corrupt or not a flipout-lm checkpoint ({first}): "
                        "use another checkpoint or retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a flipout-lm checkpoint: give a best.pt or last.pt "
                        "written by train.py")
    if payload.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {payload.get('version')}, this code reads "
                        f"{VERSION}: use the matching flipout-lm version")
    return payload


def load_model(path: str | Path, device: str = "auto") -> tuple[LanguageModel, dict]:
    """Model (in eval mode, on ``device``) rebuilt from a checkpoint's own config, and the raw checkpoint dict."""
    ck = load_checkpoint(path)
    try:
        cfg = load_config(base=ck["config"])
        model = LanguageModel(cfg.model, cfg.regularizer, len(ck["vocab"]))
        model.load_state_dict(ck["model"])
    except (KeyError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"checkpoint {path} does not match its stored config ({first}): it is damaged") from None
    bad = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {path} has non-finite weights (NaN or inf in {bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): it comes from a diverged run; "
                        "use an earlier checkpoint or retrain with a lower optim.lr")
    return model.to(resolve_device(device)).eval(), ck
