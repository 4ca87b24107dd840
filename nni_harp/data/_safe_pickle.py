"""A restricted unpickler for dataset files: numpy arrays and plain Python values only.

The python version of CIFAR-10 is a set of Python 2 pickles. ``pickle.load`` on a file from the
internet can run arbitrary code, so -- in the spirit of ``torch.load(weights_only=True)`` -- only
the globals needed to rebuild numpy arrays are resolved; anything else is refused.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

__all__ = ["ForbiddenGlobalError", "safe_pickle_load"]

_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy < 2 (the real files)
        ("numpy._core.multiarray", "_reconstruct"),  # pickles written by numpy >= 2
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 encoding of bytes written by Python 3
    }
)


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ForbiddenGlobalError(
                f"refusing to load global {module}.{name}: dataset pickles may only contain "
                "numpy arrays, lists, dicts, strings and numbers"
            )
        return super().find_class(module, name)


def safe_pickle_load(path: Path) -> Any:
    """Unpickle ``path`` (Python 2 strings decoded as latin-1, as torchvision does)."""
    with open(path, "rb") as handle:
        return _RestrictedUnpickler(handle, encoding="latin1").load()
