"""Writers of tiny datasets in exactly the real on-disk formats (CIFAR-10, SVHN, ImageFolder)."""
from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 3, 32, 32] (what a sample should decode to, times 255)
    labels: np.ndarray  # int64 [N], 0..9


def _key(name: str, bytes_keys: bool) -> str | bytes:
    return name.encode("ascii") if bytes_keys else name


def write_cifar10(
    root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0, bytes_keys: bool = False
) -> tuple[Split, Split]:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` as protocol-2 pickles."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str, n: int, label: str) -> Split:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        content = {
            _key("batch_label", bytes_keys): label,
            _key("labels", bytes_keys): [int(v) for v in labels],
            _key("data", bytes_keys): images.reshape(n, 3072),
            _key("filenames", bytes_keys): [f"img_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        return Split(images, labels)

    parts = [batch(f"data_batch_{i}", per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    test = batch("test_batch", n_test, "testing batch 1 of 1")
    meta = {
        _key("num_cases_per_batch", bytes_keys): per_batch,
        _key("label_names", bytes_keys): CIFAR_NAMES,
        _key("num_vis", bytes_keys): 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    return train, test


def write_svhn(root: Path, n_train: int = 12, n_test: int = 7, seed: int = 0) -> tuple[Split, Split]:
    """``root/{train,test}_32x32.mat``: ``X`` uint8 [32, 32, 3, N], ``y`` uint8 [N, 1] in 1..10."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = []
    for name, n in (("train", n_train), ("test", n_test)):
        digits = rng.permutation(np.arange(n) % 10)  # every digit, 0 included, when n >= 10
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        splits.append(Split(np.ascontiguousarray(x.transpose(3, 2, 0, 1)), digits.astype(np.int64)))
    return splits[0], splits[1]


def class_colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    return (40 * class_index + 10, 200 - 30 * image_index, (77 * class_index + 13 * image_index) % 256)


def write_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "zebra"),
    per_class: int = 2,
    splits: tuple[str, ...] = ("train", "val"),
    size: tuple[int, int] = (40, 30),
) -> None:
    """``root/<split>/<class>/img_<i>.png``: uniform-colour RGB PNGs (colour from ``class_colour``)."""
    for split in splits:
        for c, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, class_colour(c, i)).save(folder / f"img_{i}.png")


@pytest.fixture
def cifar_writer() -> Callable[..., tuple[Split, Split]]:
    return write_cifar10


@pytest.fixture
def svhn_writer() -> Callable[..., tuple[Split, Split]]:
    return write_svhn


@pytest.fixture
def imagefolder_writer() -> Callable[..., None]:
    return write_imagefolder


@pytest.fixture
def colour_of() -> Callable[[int, int], tuple[int, int, int]]:
    return class_colour


def crop_match(original: torch.Tensor, augmented: torch.Tensor, padding: int = 4) -> set[bool]:
    """Which ``flipped`` values make ``augmented`` a ``padding``-padded crop of ``original``."""
    size = original.shape[-1]
    padded = F.pad(original, (padding,) * 4)
    found: set[bool] = set()
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = padded[:, i : i + size, j : j + size]
            if crop.equal(augmented):
                found.add(False)
            if crop.flip(-1).equal(augmented):
                found.add(True)
    return found


@pytest.fixture
def crop_matcher() -> Callable[..., set[bool]]:
    return crop_match
