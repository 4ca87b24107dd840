"""Atomic file writes (temporary file in the same folder, fsync, rename): readers see either the
old file or the whole new one. ``nni_harp._io`` builds its checkpoint writer on these."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _mode_for(target: Path) -> int:
    """The permissions a plain ``open(target, 'w')`` would leave: an existing file keeps its own,
    a new one gets 0o666 less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def temp_file_beside(target: Path) -> tuple[int, str]:
    """``mkstemp`` in ``target``'s folder (so the final rename is atomic), with the permissions
    ``target`` should end up with instead of mkstemp's owner-only 0o600."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, _mode_for(target))
    return fd, tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it and rename it over
    ``path``: readers see either the old file or the whole new one."""
    target = Path(path)
    fd, tmp = temp_file_beside(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
