"""Directories and files that only this user can have written: the C build cache
(:mod:`lm.nn.cext`) and the registry of CPU trainings (:mod:`lm.train.threads`).

On a shared machine (a cluster's shared ``$HOME``, ``/tmp``, a cache pointed at a shared
directory) a file at a predictable name may have been put there by someone else: a shared
library whose constructor would run inside training, a symlink that turns a write or an unlink
into one elsewhere, a FIFO that blocks a read forever. So, as a careful system tool does:

* a directory is created with mode 0700, opened without following a symlink (``O_NOFOLLOW``),
  and used only if it is a directory owned by this user and not writable by group or others
  (:func:`dir_problem`); files in it are then reached through that open descriptor, so a
  directory swapped in after the check is never used;
* a file is opened without following a symlink and without blocking (a FIFO), and used only if
  the open descriptor is a regular file owned by this user and not writable by group or others
  (:func:`file_problem`).

The two decision functions take a ``stat`` result and a user id, so that each rule can be
tested directly, also where running as root would mask an attack (root may write anywhere).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class Untrusted(OSError):
    """A directory or file that fails a check: its message says which and why."""


def uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def _owner_and_mode(st: os.stat_result, me: int) -> str:
    if st.st_uid != me:
        return f"is owned by uid {st.st_uid}, not by this user (uid {me})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def dir_problem(st: os.stat_result, me: int) -> str:
    """'' when a directory with status ``st`` may be trusted by user ``me``, else why not."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory (a symlink or another kind of file)"
    return _owner_and_mode(st, me)


def file_problem(st: os.stat_result, me: int) -> str:
    """'' when a file with status ``st`` may be trusted by user ``me``, else why not."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a symlink, FIFO, device or directory)"
    return _owner_and_mode(st, me)


def open_dir(path: Path, create: bool = True) -> int:
    """A descriptor of the private directory ``path`` (created with mode 0700, its parents as
    usual); raises :class:`Untrusted` when it fails a check, OSError when it cannot be made."""
    path = Path(path)
    if create and not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        if os.path.islink(path) or e.errno in (getattr(os, "ELOOP", -1), getattr(os, "ENOTDIR", -1)):
            raise Untrusted(f"{path} is not a directory (a symlink or another kind of file)") from None
        raise
    return _checked(fd, dir_problem, path)


def open_file(name: str, dir_fd: int | None = None, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A descriptor of the file ``name`` (in the directory ``dir_fd``), checked by :func:`file_problem`;
    raises :class:`Untrusted` when it fails, FileNotFoundError when it is absent."""
    try:
        fd = os.open(name, flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (getattr(os, "ELOOP", -1), getattr(os, "ENXIO", -1), getattr(os, "EMLINK", -1)):
            raise Untrusted(f"{name} is not a regular file (a symlink, FIFO, device or directory)") from None
        raise
    return _checked(fd, file_problem, name)


def _checked(fd: int, problem, label) -> int:
    """``fd`` if ``problem`` finds nothing wrong with what it refers to, else closed and :class:`Untrusted`."""
    why = problem(os.fstat(fd), uid())
    if why:
        os.close(fd)
        raise Untrusted(f"{label} {why}")
    return fd


def read_small(name: str, dir_fd: int | None = None, limit: int = 256) -> bytes:
    """The first ``limit`` bytes of the checked file ``name``."""
    fd = open_file(name, dir_fd)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_atomic(name: str, data: bytes, dir_fd: int, mode: int = 0o600) -> None:
    """Write ``data`` to ``name`` in the directory ``dir_fd``: a new file (never an existing one,
    never through a symlink) renamed over ``name``, so that a reader sees all of it or none."""
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
