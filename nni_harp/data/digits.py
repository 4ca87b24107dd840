"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download needed)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._info import DatasetInfo
from ._registry import register_dataset
from ._tensor_dataset import TensorImageDataset
from ._transforms import ResizeClamp
from .errors import DatasetError

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DIGITS_TEST_FRACTION", "build_digits", "digits_split"]

logger = logging.getLogger(__name__)

#: Pixel mean/std of all 1797 images scaled to [0, 1], at the native 8x8 (same for every channel).
#: Fixed constants, so that the normalisation baked into a model does not depend on the split seed
#: or the image size (bilinear upsampling lowers the std slightly, e.g. to ~0.36 at 32x32).
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3760, 0.3760, 0.3760)
DIGITS_TEST_FRACTION = 0.2
#: Above this many bytes of float32 data the resize happens per sample instead of once up front.
_PRECOMPUTE_LIMIT_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> tuple[Tensor, Tensor]:
    """All images as float32 ``[1797, 1, 8, 8]`` in [0, 1] and labels int64 ``[1797]``."""
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn takes ~1 s to import

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images, labels


def _check_test_fraction(test_fraction: object) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


def digits_split(
    labels: Tensor, seed: int, test_fraction: float = DIGITS_TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``range(len(labels))`` holding out ``test_fraction`` (default ``0.2``:
    80/20), deterministic for a given ``seed`` and ``test_fraction``."""
    from sklearn.model_selection import train_test_split

    test_size = _check_test_fraction(test_fraction)
    indices = np.arange(labels.shape[0])
    train_idx, test_idx = train_test_split(
        indices, test_size=test_size, stratify=labels.numpy(), random_state=seed, shuffle=True
    )
    return np.sort(train_idx), np.sort(test_idx)


@register_dataset("digits")
def build_digits(
    data_dir: Path | None, image_size: int, seed: int, test_fraction: float = DIGITS_TEST_FRACTION
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """Grey 8x8 digits resized (bilinear) to ``image_size`` and repeated to 3 channels.

    No augmentation: the split is the only randomness, so results are reproducible per ``seed``.
    ``test_fraction`` is the stratified held-out share (the registry, hence ``build_datasets`` and
    the pipeline, always uses the default ``0.2``; benchmarks call this builder directly for a
    larger evaluation set).
    """
    if data_dir is not None:
        logger.info("digits ships with scikit-learn; ignoring data_dir=%s", data_dir)
    images, labels = _digits_tensors()
    train_idx, test_idx = digits_split(labels, seed, test_fraction)
    resize = ResizeClamp(image_size)
    transform: ResizeClamp | None = None
    if images.shape[0] * image_size * image_size * 4 <= _PRECOMPUTE_LIMIT_BYTES:
        images = resize(images)
    else:
        transform = resize
    train = TensorImageDataset(images[train_idx], labels[train_idx], transform, name="digits/train")
    test = TensorImageDataset(images[test_idx], labels[test_idx], transform, name="digits/test")
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        in_chans=3,
        image_size=image_size,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        class_names=tuple(str(d) for d in range(10)),
    )
    return train, test, info
