"""Atomic file writes (temporary file in the same folder, fsync, rename): readers see either the
old file or the whole new one. ``nni_harp._io`` builds its checkpoint writer on these."""
from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

#: The name of a temporary file of :func:`atomic_write` for ``<name>``: ``.<name>.<8 random>.tmp``
#: (``tempfile.mkstemp``'s random part). One left behind was a write that never finished.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


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


def temp_target(name: str) -> str | None:
    """The file name whose atomic write ``name`` is a temporary file of, or None: ``name`` is
    not one."""
    found = _TEMP_NAME.match(name)
    return found.group("name") if found else None


def remove_stray_temp_files(folder: str | os.PathLike[str], targets: Callable[[str], bool] = lambda _: True) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes (a killed process) left in
    ``folder``, for the target names ``targets`` accepts; returns what was removed. Only call it
    while no other process writes there (the pipeline holds its output folder's lock)."""
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        target = temp_target(entry.name)
        if target is not None and targets(target) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


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
