"""Atomic checkpoint files holding state dicts only, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lm.errors import UserError

FORMAT = "flipout-lm"
VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
