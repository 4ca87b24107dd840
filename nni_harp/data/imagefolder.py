"""``imagefolder``: any ImageNet-style tree of class folders, via ``torchvision.datasets.ImageFolder``.

Layout: ``<data_dir>/train/<class>/<image>`` for training and ``<data_dir>/val/<class>/<image>``
for evaluation; when there is no ``val/``, ``test/`` is used instead (``val/`` wins when both
exist). Both splits must have the same class folders: labels are the sorted folder names' indices.

Transforms (kept simple, the usual ImageNet recipe): train = random-resized crop to
``image_size`` (scale 0.08..1) + horizontal flip; eval = resize the shorter side to
``image_size / 0.875`` + centre crop ``image_size``. Images are converted to RGB. Files are only
opened when a sample is read; an unreadable image then raises :class:`DatasetError` naming it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets import ImageFolder

from ._info import DatasetInfo
from ._paths import require_data_dir
from ._registry import register_dataset
from ._transforms import pil_eval_transform, pil_train_transform
from .errors import DatasetError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EVAL_SPLITS", "build_imagefolder", "find_eval_split"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SPLIT = "train"
#: Evaluation split folders, in order of preference.
EVAL_SPLITS = ("val", "test")
LAYOUT = (
    "expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image> (or test/ "
    "instead of val/), the same class folders in both, images readable by PIL"
)


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image; unreadable files raise :class:`DatasetError`."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); {LAYOUT}") from exc


def find_eval_split(root: Path) -> Path:
    """``root/val`` if it exists, else ``root/test``, else raise."""
    present = [root / name for name in EVAL_SPLITS if (root / name).is_dir()]
    if not present:
        raise DatasetError(
            f"no evaluation split in {root}: neither {root / 'val'} nor {root / 'test'} exists; {LAYOUT}"
        )
    if len(present) > 1:
        logger.info("both %s and %s exist; evaluating on %s", present[0], present[1], present[0])
    return present[0]


def _image_folder(split_dir: Path, transform: Callable[[Image.Image], Tensor]) -> ImageFolder:
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist; {LAYOUT}")
    try:
        return ImageFolder(str(split_dir), transform=transform, loader=load_rgb)
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(f"cannot index {split_dir} as an image folder ({exc}); {LAYOUT}") from exc


@register_dataset("imagefolder")
def build_imagefolder(
    data_dir: Path | None, image_size: int, seed: int
) -> tuple[ImageFolder, ImageFolder, DatasetInfo]:
    root = require_data_dir("imagefolder", data_dir, LAYOUT)
    train = _image_folder(root / TRAIN_SPLIT, pil_train_transform(image_size))
    eval_dir = find_eval_split(root)
    test = _image_folder(eval_dir, pil_eval_transform(image_size))
    if train.class_to_idx != test.class_to_idx:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_eval = sorted(set(test.classes) - set(train.classes))
        raise DatasetError(
            f"class folders differ between {root / TRAIN_SPLIT} and {eval_dir}: only in train "
            f"{only_train[:10]}, only in {eval_dir.name} {only_eval[:10]}; {LAYOUT}"
        )
    if len(train.classes) < 2:
        raise DatasetError(
            f"{root / TRAIN_SPLIT} has {len(train.classes)} class folder(s), need at least 2; {LAYOUT}"
        )
    logger.info(
        "imagefolder from %s: %d classes, %d train, %d %s images",
        root, len(train.classes), len(train), len(test), eval_dir.name,
    )
    info = DatasetInfo(
        "imagefolder", len(train.classes), 3, image_size, IMAGENET_MEAN, IMAGENET_STD, tuple(train.classes)
    )
    return train, test, info
