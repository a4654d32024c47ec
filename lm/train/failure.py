"""An unexpected failure after training has started never loses the training.

An exception that is neither bad input (:class:`lm.errors.UserError`), nor a divergence, nor a
failed write (those have their own one-line messages) ends the run with exit code
:data:`EXIT_FAILED` after three things:

* the full traceback goes to ``<run dir>/traceback.txt``;
* ``last.pt`` is written from the last good state, by where the failure happened (``trainer.phase``):
  - ``validation`` (evaluating, checkpointing, logging): the state taken when that validation
    began (:func:`before_validation`), marked ``pending_validation``, so a resume repeats that
    validation first and continues exactly as the uninterrupted run would;
  - ``loop`` (between steps: bookkeeping, the progress bar, the thread policy): the current state;
  - ``step`` (inside a training step, whose weights, noise and optimizer state may be half
    updated) and ``finish`` (after the last validation): nothing new; the ``last.pt`` written at
    the last validation keeps the last good state;
* stderr gets one line: the error, what was saved, the traceback file and the resume command.

Before the first step there is nothing to keep: the run directory then holds no checkpoint, and
the same command starts it afresh (:func:`lm.train.rundir.check_target`).
"""

from __future__ import annotations

import io
import sys
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from lm.files import atomic_write
from lm.train.checkpoint import FORMAT, VERSION
from lm.train.rundir import TRACEBACK

EXIT_FAILED = 4


def before_validation(trainer) -> bytes | None:
    """``last.pt``'s bytes for the state before the validation about to run (on every rank: the payload
    gathers every process's state; only rank 0 keeps the bytes)."""
    payload = trainer._payload()
    if not trainer.dist.is_main:
        return None
    buffer = io.BytesIO()
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload, "pending_validation": True}, buffer)
    except Exception:  # noqa: BLE001  # a safety net only: without it a failed validation keeps the older last.pt
        return None
    return buffer.getvalue()


def _write_traceback(run_dir: Path) -> str:
    text = traceback.format_exc()
    try:
        atomic_write(run_dir / TRACEBACK, lambda tmp: tmp.write_text(text))
    except OSError as e:
        return f"the traceback could not be written to {run_dir / TRACEBACK} ({e})"
    return f"traceback in {run_dir / TRACEBACK}"


def _rescue(trainer) -> str:
    """Write last.pt from the last good state where there is one to write; say what the run directory keeps."""
    run_dir, phase = trainer.run_dir, trainer.phase
    resume = f"resume with: python train.py --run-dir {run_dir} --resume"
    problem = ""
    if trainer.step > 0 and phase in ("validation", "loop"):
        try:
            if phase == "validation" and trainer.before is not None:
                before = trainer.before
                atomic_write(run_dir / "last.pt", lambda tmp: tmp.write_bytes(before))
                trainer.saved_step = trainer.step
                return (f"saved {run_dir}/last.pt at step {trainer.step}, before the failed validation, which a "
                        f"resume repeats first; {resume}")
            if phase == "loop" and trainer.dist.world == 1:
                trainer.save("last.pt")
                return f"saved {run_dir}/last.pt at step {trainer.step}; {resume}"
        except Exception as e:  # noqa: BLE001  # the rescue itself failed: say what is still intact
            problem = f"last.pt could not be saved ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
    if trainer.saved_step is not None and (run_dir / "last.pt").is_file():
        return f"{problem}{run_dir}/last.pt (step {trainer.saved_step}) keeps the last good state; {resume}"
    return f"{problem}no checkpoint was written yet: the same command starts the run afresh"


def report(trainer, error: BaseException) -> int:
    """Handle ``error`` (called inside the ``except`` block): traceback file, rescue, one stderr line."""
    if not trainer.dist.is_main:
        return EXIT_FAILED
    where = _write_traceback(trainer.run_dir)
    kept = _rescue(trainer)
    first = (str(error).strip().splitlines() or [""])[0][:200]
    tqdm.write(f"error: training failed at step {trainer.step} ({trainer.phase}) with {type(error).__name__}: "
               f"{first}; {kept}; {where}", file=sys.stderr)
    return EXIT_FAILED
