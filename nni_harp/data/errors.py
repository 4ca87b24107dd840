"""The one error type of :mod:`nni_harp.data`."""
from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset cannot be built: unknown name, bad argument, missing or malformed files.

    The message always names what is wrong (the argument or the path) and how to fix it (the
    allowed values, or the on-disk layout that was expected). Errors raised while reading a file
    are chained with ``from`` so that the original cause stays visible.
    """
