from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from nni_harp.data import DatasetError, build_datasets, build_loaders
from nni_harp.data.svhn import SVHN_MEAN, SVHN_STD


def test_svhn_round_trips_pixels_and_maps_label_10_to_0(tmp_path: Path, svhn_writer: Callable) -> None:
    train_ref, test_ref = svhn_writer(tmp_path)
    raw_y = scipy.io.loadmat(tmp_path / "test_32x32.mat")["y"][:, 0]
    assert 10 in raw_y and 0 not in raw_y  # the fixture really uses the 10-means-0 convention
    train, test, info = build_datasets("svhn", tmp_path)
    assert (len(train), len(test)) == (12, 7)
    assert (info.name, info.num_classes, info.mean, info.std) == ("svhn", 10, SVHN_MEAN, SVHN_STD)
    labels = [test[k][1] for k in range(len(test))]
    assert labels == test_ref.labels.tolist() and 0 in labels
    for k in range(len(test)):
        x, _ = test[k]
        assert x.shape == (3, 32, 32)
        assert torch.equal(x, torch.from_numpy(test_ref.images[k]).float() / 255.0)
    assert torch.equal(train.labels, torch.from_numpy(train_ref.labels))


def test_svhn_train_augmentation_crops_but_never_flips(
    tmp_path: Path, svhn_writer: Callable, crop_matcher: Callable
) -> None:
    train_ref, _ = svhn_writer(tmp_path)
    train, _, _ = build_datasets("svhn", tmp_path)
    original = torch.from_numpy(train_ref.images[4]).float() / 255.0
    torch.manual_seed(0)
    for _ in range(20):
        x, _ = train[4]
        assert crop_matcher(original, x) == {False}


def test_svhn_loader_batches(tmp_path: Path, svhn_writer: Callable) -> None:
    _, test_ref = svhn_writer(tmp_path)
    train_loader, test_loader, info = build_loaders("svhn", tmp_path, image_size=16, batch_size=5)
    x, y = next(iter(test_loader))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and info.image_size == 16
    assert y.tolist() == test_ref.labels[:5].tolist()
    assert sum(len(b[1]) for b in train_loader) == 12


@pytest.mark.parametrize(
    ("file", "content", "words"),
    [
        ("test_32x32.mat", None, "missing"),
        ("train_32x32.mat", b"not a mat file", "not a readable .mat file"),
        ("test_32x32.mat", {"y": np.ones((2, 1), np.uint8)}, "needs variables 'X' and 'y'"),
        (
            "test_32x32.mat",
            {"X": np.zeros((3, 32, 32, 2), np.uint8), "y": np.ones((2, 1), np.uint8)},
            "uint8 [32, 32, 3, N]",
        ),
        (
            "train_32x32.mat",
            {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]], np.uint8)},
            "1..10",
        ),
        (
            "train_32x32.mat",
            {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)},
            "N=2",
        ),
    ],
)
def test_svhn_malformed_files_raise(
    tmp_path: Path, svhn_writer: Callable, file: str, content: object, words: str
) -> None:
    svhn_writer(tmp_path)
    target = tmp_path / file
    if content is None:
        target.unlink()
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        scipy.io.savemat(target, content)
    with pytest.raises(DatasetError) as err:
        build_datasets("svhn", tmp_path)
    message = str(err.value)
    assert str(target) in message and words in message and "train_32x32.mat" in message


def test_svhn_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as err:
        build_datasets("svhn", missing)
    assert str(missing) in str(err.value) and "test_32x32.mat" in str(err.value)
