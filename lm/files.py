"""Writing files so that a reader never sees half of one (data caches, configs, checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

from lm.errors import StorageError


def storage_error(path: Path, e: BaseException) -> StorageError:
    """A one-line :class:`StorageError` for a failed write of ``path`` (``e``: OSError or torch's RuntimeError)."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:  # torch.save reports a full disk as "[enforce fail at inline_container.cc:...] unexpected pos ..."
        reason = "write failed (" + ((str(e).strip().splitlines() or [type(e).__name__])[0][:80]) + "); is the disk full?"
    return StorageError(f"cannot write {path}: {reason}")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file.

    A failed write (disk full, read-only file system; torch's writer raises RuntimeError) leaves
    ``path`` as it was, removes the temporary file and raises a :class:`StorageError`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except StorageError:
        raise
    except OSError as e:
        raise storage_error(path, e) from None
    except RuntimeError as e:
        if "inline_container" in str(e) or "PytorchStreamWriter" in str(e) or "file write failed" in str(e):
            raise storage_error(path, e) from None
        raise
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
