"""Optional TensorBoard logging (``train.tensorboard: true``) beside the always-written metrics.jsonl.

TensorBoard is an optional extra (``pip install -e .[tensorboard]``), never a hard dependency:
it is imported only when the switch is on, and a missing package is a one-line error raised
before training starts. View with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

from pathlib import Path

from lm.errors import UserError


class TensorBoard:
    """Write each validation record's numbers as scalars (tag = the metrics.jsonl key).

    Args:
        log_dir: event-file directory, created at the first record.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard=true needs the tensorboard package: pip install -e .[tensorboard] "
                            "(or pip install tensorboard), or set train.tensorboard false") from None
        self.log_dir = Path(log_dir)
        self._writer_cls = SummaryWriter
        self._writer = None

    def log(self, record: dict, step: int) -> None:
        """Add every int/float of ``record`` at optimizer step ``step``."""
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self.log_dir))
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
