"""``cifar10``: the python version of CIFAR-10, read from ``cifar-10-batches-py/`` without download.

We read the pickled batches ourselves instead of using ``torchvision.datasets.CIFAR10``: that
class verifies md5 sums of the files (so it rejects re-packed or test copies) and unpickles them
unrestricted. Here the structure is validated instead (keys, dtypes, shapes, label range), and the
pickles are loaded with an allow-list of globals (:mod:`._safe_pickle`).
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._info import DatasetInfo
from ._paths import require_data_dir
from ._registry import register_dataset
from ._safe_pickle import safe_pickle_load
from ._tensor_dataset import TensorImageDataset
from ._transforms import tensor_transform
from .errors import DatasetError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_CLASSES", "build_cifar10", "read_cifar_batch"]

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
#: Per-pixel std over the training set (not the often-copied 0.2023/0.1994/0.2010, which is a
#: std of per-image means).
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
BASE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
LAYOUT = (
    f"expected <data_dir>/{BASE_FOLDER}/ holding {', '.join(TRAIN_BATCHES)}, {TEST_BATCH} and "
    f"{META_FILE} (the python version of CIFAR-10, cifar-10-python.tar.gz, extracted)"
)
_NATIVE = 32


def _get(mapping: Mapping[Any, Any], key: str) -> Any:
    """``mapping[key]`` for str or bytes keys (Python 2 pickles read with either encoding)."""
    if key in mapping:
        return mapping[key]
    return mapping.get(key.encode("ascii"))


def _load_dict(path: Path) -> Mapping[Any, Any]:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 file {path} is missing; {LAYOUT}")
    try:
        obj = safe_pickle_load(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DatasetError(f"CIFAR-10 file {path} is not a readable python pickle ({exc}); {LAYOUT}") from exc
    if not isinstance(obj, Mapping):
        raise DatasetError(f"CIFAR-10 file {path} holds a {type(obj).__name__}, expected a dict; {LAYOUT}")
    return obj


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file -> images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]`` (0..9)."""
    batch = _load_dict(path)
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if labels is None and _get(batch, "fine_labels") is not None:
        raise DatasetError(f"{path} has 'fine_labels': this is CIFAR-100, not CIFAR-10; {LAYOUT}")
    if data is None or labels is None:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in batch)
        raise DatasetError(f"CIFAR-10 batch {path} needs keys 'data' and 'labels', has {keys}; {LAYOUT}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _NATIVE * _NATIVE:
        raise DatasetError(
            f"CIFAR-10 batch {path}: 'data' must be uint8 [N, 3072] (rows of R, G, B 32x32 planes), "
            f"got {data.dtype} {list(data.shape)}; {LAYOUT}"
        )
    label_array = np.asarray(labels)
    if label_array.shape != (data.shape[0],) or not np.issubdtype(label_array.dtype, np.integer):
        raise DatasetError(
            f"CIFAR-10 batch {path}: 'labels' must be {data.shape[0]} integers (one per row of "
            f"'data'), got {label_array.dtype} {list(label_array.shape)}; {LAYOUT}"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise DatasetError(
            f"CIFAR-10 batch {path}: labels must be in 0..9, got {label_array.min()}..{label_array.max()}; "
            f"{LAYOUT}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, _NATIVE, _NATIVE).copy())
    return images, torch.from_numpy(label_array.astype(np.int64))


def _read_class_names(folder: Path) -> tuple[str, ...]:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        logger.warning("%s is missing; using the standard CIFAR-10 class names", meta_path)
        return CIFAR10_CLASSES
    names = _get(_load_dict(meta_path), "label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise DatasetError(f"CIFAR-10 meta file {meta_path}: 'label_names' must list 10 names; {LAYOUT}")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def _find_folder(data_dir: Path) -> Path:
    """``data_dir/cifar-10-batches-py``, or ``data_dir`` itself when it already is that folder."""
    folder = data_dir / BASE_FOLDER
    if folder.is_dir():
        return folder
    if (data_dir / TRAIN_BATCHES[0]).is_file():
        return data_dir
    hint = ""
    if (data_dir / "cifar-10-python.tar.gz").is_file():
        hint = f" (found {data_dir / 'cifar-10-python.tar.gz'}: extract it there)"
    raise DatasetError(f"no CIFAR-10 data in {data_dir}{hint}; {LAYOUT}")


@register_dataset("cifar10")
def build_cifar10(
    data_dir: Path | None, image_size: int, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """Train: random crop (pad 4) + horizontal flip at 32x32, then resize; test: resize only."""
    folder = _find_folder(require_data_dir("cifar10", data_dir, LAYOUT))
    parts = [read_cifar_batch(folder / name) for name in TRAIN_BATCHES]
    train_images = torch.cat([images for images, _ in parts])
    train_labels = torch.cat([labels for _, labels in parts])
    test_images, test_labels = read_cifar_batch(folder / TEST_BATCH)
    class_names = _read_class_names(folder)
    logger.info("cifar10 from %s: %d train, %d test images", folder, len(train_labels), len(test_labels))
    train = TensorImageDataset(
        train_images, train_labels, tensor_transform(image_size, _NATIVE, train=True), "cifar10/train"
    )
    test = TensorImageDataset(
        test_images, test_labels, tensor_transform(image_size, _NATIVE, train=False), "cifar10/test"
    )
    info = DatasetInfo("cifar10", 10, 3, image_size, CIFAR10_MEAN, CIFAR10_STD, class_names)
    return train, test, info
