"""Atomic file writes and safe checkpoint loading, shared by every part that touches disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from graph_passes._atomic import atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_save", "safe_load"]


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through a temporary file in the same directory, then an atomic rename."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors, dicts, lists and plain values only."""
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint not found: {target}")
    return torch.load(target, map_location=map_location, weights_only=True)
