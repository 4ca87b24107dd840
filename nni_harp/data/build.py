"""``build_datasets``: name -> ``(train_ds, test_ds, info)`` through the dataset registry."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.utils.data import Dataset

# Importing the dataset modules registers their builders, in this order.
from . import cifar as _cifar  # noqa: F401
from . import digits as _digits  # noqa: F401
from . import imagefolder as _imagefolder  # noqa: F401
from . import svhn as _svhn  # noqa: F401
from .._checks import check_int
from ._info import DatasetInfo, check_image_size
from ._registry import get_builder, registered_names
from .errors import DatasetError

__all__ = ["DATASETS", "build_datasets", "check_seed"]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`build_datasets` / ``build_loaders``, in the order of the docs.
DATASETS: tuple[str, ...] = ("digits", "cifar10", "svhn", "imagefolder")
if set(DATASETS) != set(registered_names()):  # pragma: no cover - guards against a broken edit
    raise DatasetError(f"DATASETS {DATASETS} and registered builders {registered_names()} differ")

_MAX_SEED = 2**32 - 1


def check_seed(seed: object) -> int:
    return check_int(seed, 0, _MAX_SEED, error=lambda span: DatasetError(f"seed must be an int {span}, got {seed!r}"))


def build_datasets(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build the train and test datasets called ``name`` (one of :data:`DATASETS`).

    Samples are ``(float32 tensor [3, image_size, image_size] in [0, 1], int label)``, *not*
    normalised: ``info.mean``/``info.std`` are the statistics for the model's normalisation
    wrapper. ``data_dir`` is needed by every dataset except ``digits``; nothing is downloaded.
    ``seed`` fixes the train/test split where the dataset has none of its own (``digits``).

    Raises:
        DatasetError: unknown ``name``, ``image_size`` outside [8, 1024], bad ``seed``, or a missing
            or malformed data directory (the message names the path and the expected layout).
    """
    builder = get_builder(name)
    check_image_size(image_size)
    check_seed(seed)
    path = None if data_dir is None else Path(data_dir)
    train, test, info = builder(path, image_size, seed)
    logger.debug(
        "built %s: %d train / %d test samples, %s", name, len(train), len(test), info  # type: ignore[arg-type]
    )
    return train, test, info
