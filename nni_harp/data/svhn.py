"""``svhn``: Street View House Numbers (cropped digits, 32x32), read from the official .mat files.

Like :mod:`.cifar`, this reads the files itself instead of using ``torchvision.datasets.SVHN``,
which insists on the md5 sums of the official files: the structure is validated instead. The
``extra_32x32.mat`` split is not used.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch import Tensor

from ._info import DatasetInfo
from ._paths import require_data_dir
from ._registry import register_dataset
from ._tensor_dataset import TensorImageDataset
from ._transforms import tensor_transform
from .errors import DatasetError

__all__ = ["SVHN_MEAN", "SVHN_STD", "SVHN_FILES", "build_svhn", "read_svhn_mat"]

logger = logging.getLogger(__name__)

SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
LAYOUT = (
    "expected <data_dir>/train_32x32.mat and <data_dir>/test_32x32.mat (SVHN format 2, cropped "
    "digits: 'X' uint8 [32, 32, 3, N], 'y' [N, 1] with labels 1..10, 10 meaning digit 0)"
)
_NATIVE = 32


def read_svhn_mat(path: Path) -> tuple[Tensor, Tensor]:
    """One .mat file -> images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]`` (0..9)."""
    if not path.is_file():
        raise DatasetError(f"SVHN file {path} is missing; {LAYOUT}")
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise DatasetError(f"SVHN file {path} is a MATLAB v7.3 file, expected v5 ({exc}); {LAYOUT}") from exc
    except (ValueError, TypeError, OSError, scipy.io.matlab.MatReadError) as exc:
        raise DatasetError(f"SVHN file {path} is not a readable .mat file ({exc}); {LAYOUT}") from exc
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"SVHN file {path} needs variables 'X' and 'y', has {found}; {LAYOUT}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (_NATIVE, _NATIVE, 3):
        raise DatasetError(
            f"SVHN file {path}: 'X' must be uint8 [32, 32, 3, N], got {x.dtype} {list(x.shape)}; {LAYOUT}"
        )
    n = x.shape[3]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f"SVHN file {path}: 'y' must hold N={n} integer labels ([N, 1]), got {y.dtype} {list(y.shape)}; "
            f"{LAYOUT}"
        )
    if n and (y.min() < 1 or y.max() > 10):
        raise DatasetError(
            f"SVHN file {path}: labels must be in 1..10 (10 meaning digit 0), got {y.min()}..{y.max()}; "
            f"{LAYOUT}"
        )
    labels = np.where(y == 10, 0, y).astype(np.int64)
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # [H, W, C, N] -> [N, C, H, W]
    return torch.from_numpy(images), torch.from_numpy(labels)


@register_dataset("svhn")
def build_svhn(
    data_dir: Path | None, image_size: int, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """Train: random crop (pad 4) at 32x32, no flip (digits are not mirror-symmetric), then resize."""
    root = require_data_dir("svhn", data_dir, LAYOUT)
    train_images, train_labels = read_svhn_mat(root / SVHN_FILES["train"])
    test_images, test_labels = read_svhn_mat(root / SVHN_FILES["test"])
    logger.info("svhn from %s: %d train, %d test images", root, len(train_labels), len(test_labels))
    train = TensorImageDataset(
        train_images,
        train_labels,
        tensor_transform(image_size, _NATIVE, train=True, flip=False),
        "svhn/train",
    )
    test = TensorImageDataset(
        test_images, test_labels, tensor_transform(image_size, _NATIVE, train=False), "svhn/test"
    )
    class_names = tuple(str(d) for d in range(10))
    info = DatasetInfo("svhn", 10, 3, image_size, SVHN_MEAN, SVHN_STD, class_names)
    return train, test, info
