"""Checks on the ``data_dir`` argument shared by the datasets read from disk."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DatasetError

__all__ = ["require_data_dir"]


def require_data_dir(name: str, data_dir: Path | None, layout: str) -> Path:
    """Return ``data_dir`` as an existing directory, or raise naming the path and ``layout``."""
    if data_dir is None:
        raise DatasetError(
            f"dataset {name!r} is read from disk and needs a data directory: pass --data-dir "
            f"(data_dir=...); {layout}. Nothing is ever downloaded."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DatasetError(f"data directory {path} for dataset {name!r} {what}; {layout}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"data directory {path} for dataset {name!r} is not readable; {layout}")
    return path
