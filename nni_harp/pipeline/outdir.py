"""The output folder of a run: what a run may write into, its lock, and what killed writes left.

- A run writes into an empty (or new) folder, into a folder that holds a run of the same
  settings (``resume``; :class:`~.checkpoint.RunStore` compares them), or into a folder named
  with ``overwrite``, where it replaces only the files a run writes (:func:`run_files` and
  ``checkpoints/``) and leaves everything else alone. A folder with other content is refused,
  naming what is there.
- A file where the folder (or one of its parents) should be, a parent that cannot be created or
  a folder without write permission is refused with the path and the fix
  (:func:`check_output_dir`), before any work starts.
- One run at a time per folder: :class:`RunLock` holds an ``flock`` on ``.nni-harp.lock`` for the
  whole run. The kernel drops it when the process ends, however it ends, so a killed run never
  leaves its folder locked.
- The temporary files of atomic writes that a killed process left behind are removed when the
  next run opens the folder (while it holds the lock, so no live write is touched).

Every refusal is a :class:`~.checkpoint.ResumeError` (the command line: exit status 2).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from graph_passes._atomic import remove_stray_temp_files, temp_target

from .checkpoint import CHECKPOINT_DIR, PROGRESS_FILE, ResumeError

try:  # POSIX; elsewhere runs are not locked (see RunLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "check_contents", "check_output_dir", "open_output_dir", "run_files"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".nni-harp.lock"


def run_files() -> frozenset[str]:
    """The names a prune run writes at the top of its output folder (``checkpoints/`` aside)."""
    from ..loading import META_FILE, MODEL_FILE, PLAN_FILE
    from .artefacts import DENSE_MODEL_FILE, ONNX_FILE, PLOT_HISTORY, PLOT_RATES

    reports = {f"report.{ext}" for ext in ("json", "md")}
    return frozenset({MODEL_FILE, META_FILE, PLAN_FILE, ONNX_FILE, DENSE_MODEL_FILE, PLOT_RATES, PLOT_HISTORY,
                      LOCK_FILE, *reports})


def _writable(folder: Path) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=effective)


def check_output_dir(path: str | os.PathLike[str], option: str = "--output-dir") -> None:
    """Refuse an output folder that cannot be written, without writing anything: a file in its
    place (or in a parent's), a missing parent that cannot be created, no write permission."""
    out = Path(path)
    if out.is_dir():
        for folder in (out, out / CHECKPOINT_DIR):
            if folder.exists() and not folder.is_dir():
                raise ResumeError(f"{option} {out}: {folder} is a file, not a folder; move it away or choose "
                                  f"another {option}")
            if folder.is_dir() and not _writable(folder):
                raise ResumeError(f"{option} {out}: {folder} is read-only (no permission to write there); make it "
                                  f"writable (chmod u+w {folder}) or choose another {option}")
        return
    if out.exists() or out.is_symlink():
        raise ResumeError(f"{option} {out} is a file, not a folder (or a broken link); move it away or choose "
                          f"another {option}")
    parent = out.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ResumeError(f"cannot create {option} {out}: {parent} is a file, not a folder; choose another {option}")
    if not _writable(parent):
        raise ResumeError(f"cannot create {option} {out}: no permission to write in {parent}; choose an "
                          f"{option} you can write to")


def _is_run_debris(name: str, owned: frozenset[str]) -> bool:
    target = temp_target(name)
    return target is not None and target in owned


def check_contents(path: str | os.PathLike[str], resume: bool, overwrite: bool, option: str = "--output-dir") -> None:
    """Refuse a folder that holds neither nothing nor a run, unless ``overwrite``; names what is
    there. Whether a run there may be resumed or replaced is :meth:`RunStore.start`'s call."""
    out = Path(path)
    if overwrite or not out.is_dir() or (out / CHECKPOINT_DIR / PROGRESS_FILE).is_file():
        return
    owned = run_files()
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir()
                     if e.name != LOCK_FILE and not _is_run_debris(e.name, owned))
    if not entries:
        return
    shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
    replaced = [e for e in entries if e in owned or e == f"{CHECKPOINT_DIR}/"]
    effect = (f"it replaces {', '.join(replaced)} and leaves the rest alone" if replaced
              else "it writes its files beside these and changes none of them")
    state = "holds no run to resume" if resume else "is not empty and holds no nni-harp run"
    raise ResumeError(
        f"{option} {out} {state}: it holds {shown}. A run writes only into an empty folder or one that holds "
        f"a run; choose another {option}, or pass --overwrite to write the run there anyway ({effect})"
    )


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.nni-harp.lock``, which says who holds it.

    The lock belongs to the open file, so the kernel releases it when the holder exits, SIGKILL
    included: a dead run never leaves its folder locked. The file itself stays (removing it would
    let two runs lock two different files of the same name). Without ``fcntl`` (Windows) runs are
    not locked.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, option: str = "--output-dir") -> "RunLock":
        if fcntl is None:  # pragma: no cover - Windows
            logger.warning("no file locking on this platform: two runs in %s would not be stopped", self.folder)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process that just started"
            os.close(fd)
            raise ResumeError(
                f"{option} {self.folder} is in use by another nni-harp run ({holder}); wait for it to end or "
                f"choose another {option} (a run that was killed holds no lock)"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_output_dir(path: str | os.PathLike[str], resume: bool, overwrite: bool,
                    option: str = "--output-dir") -> RunLock:
    """Check ``path`` (:func:`check_output_dir`, :func:`check_contents`), create it and lock it;
    with ``overwrite`` remove the run files at its top (``checkpoints/`` is
    :meth:`RunStore.start`'s); remove what killed atomic writes left. Returns the held lock."""
    out = Path(path)
    check_output_dir(out, option)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResumeError(f"cannot create {option} {out}: {exc.strerror or exc}; choose another {option}") from exc
    lock = RunLock(out).acquire(option)
    try:
        check_contents(out, resume, overwrite, option)  # again: it may have changed before the lock was ours
        owned = run_files()
        if overwrite:
            for name in sorted(owned - {LOCK_FILE}):
                target = out / name
                if target.is_file() or target.is_symlink():
                    target.unlink()
        removed = remove_stray_temp_files(out, lambda name: name in owned)
        removed += remove_stray_temp_files(out / CHECKPOINT_DIR)
        if removed:
            logger.info("removed %d unfinished temporary file(s) of an interrupted run: %s", len(removed),
                        ", ".join(str(p) for p in removed))
    except BaseException:
        lock.release()
        raise
    return lock
