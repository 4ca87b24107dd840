"""Name -> builder registry: each dataset module registers its builder with a decorator."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from torch.utils.data import Dataset

from ._info import DatasetInfo
from .errors import DatasetError

__all__ = ["Builder", "register_dataset", "get_builder", "registered_names"]

#: ``builder(data_dir, image_size, seed) -> (train_ds, test_ds, info)``; arguments already validated
#: except ``data_dir``, which each builder checks against its own layout.
Builder: TypeAlias = Callable[[Path | None, int, int], tuple[Dataset, Dataset, DatasetInfo]]

_BUILDERS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name``; registering a name twice is an error."""

    def decorator(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise DatasetError(f"dataset name {name!r} is registered twice (by {_BUILDERS[name]!r})")
        _BUILDERS[name] = builder
        return builder

    return decorator


def registered_names() -> tuple[str, ...]:
    """Registered dataset names, in registration order."""
    return tuple(_BUILDERS)


def get_builder(name: object) -> Builder:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise DatasetError(f"unknown dataset name {name!r}: choose one of {registered_names()}")
    return _BUILDERS[name]
