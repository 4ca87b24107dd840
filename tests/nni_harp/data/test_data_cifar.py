from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from nni_harp.data import DatasetError, build_datasets, build_loaders
from nni_harp.data._transforms import ResizeClamp
from nni_harp.data.cifar import CIFAR10_MEAN, CIFAR10_STD


def _as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 255.0


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_round_trips_pixels_and_labels(
    tmp_path: Path, cifar_writer: Callable, bytes_keys: bool
) -> None:
    train_ref, test_ref = cifar_writer(tmp_path, bytes_keys=bytes_keys)
    train, test, info = build_datasets("cifar10", tmp_path)
    assert (len(train), len(test)) == (20, 6)
    assert (info.name, info.num_classes, info.in_chans, info.image_size) == ("cifar10", 10, 3, 32)
    assert info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD
    assert info.class_names[0] == "airplane" and info.class_names[9] == "truck"
    for k in range(len(test)):
        x, y = test[k]
        assert y == int(test_ref.labels[k])
        assert x.dtype == torch.float32
        assert torch.equal(x, _as_float(test_ref.images[k]))
    assert torch.equal(train.labels, torch.from_numpy(train_ref.labels))  # batches 1..5 in order


def test_cifar_accepts_the_batches_folder_itself(tmp_path: Path, cifar_writer: Callable) -> None:
    _, test_ref = cifar_writer(tmp_path)
    _, test, _ = build_datasets("cifar10", tmp_path / "cifar-10-batches-py")
    assert torch.equal(test[2][0], _as_float(test_ref.images[2]))


def test_cifar_train_augmentation_is_pad_crop_and_flip(
    tmp_path: Path, cifar_writer: Callable, crop_matcher: Callable
) -> None:
    train_ref, _ = cifar_writer(tmp_path)
    train, _, _ = build_datasets("cifar10", tmp_path)
    original = _as_float(train_ref.images[3])
    torch.manual_seed(0)
    flips: set[bool] = set()
    for _ in range(30):
        x, y = train[3]
        assert y == int(train_ref.labels[3]) and x.shape == (3, 32, 32)
        found = crop_matcher(original, x)
        assert found, "augmented sample is not a padded crop of the original"
        flips |= found
    assert flips == {False, True}


def test_cifar_resizes_to_image_size(tmp_path: Path, cifar_writer: Callable) -> None:
    train_ref, test_ref = cifar_writer(tmp_path)
    train, test, info = build_datasets("cifar10", tmp_path, image_size=48)
    assert info.image_size == 48
    x, _ = test[1]
    assert x.shape == (3, 48, 48)
    torch.testing.assert_close(x, ResizeClamp(48)(_as_float(test_ref.images[1])))
    xt, _ = train[0]
    assert xt.shape == (3, 48, 48) and 0.0 <= float(xt.min()) and float(xt.max()) <= 1.0


def test_cifar_loaders_order_and_seed(tmp_path: Path, cifar_writer: Callable) -> None:
    train_ref, test_ref = cifar_writer(tmp_path)
    train_loader, test_loader, _ = build_loaders("cifar10", tmp_path, batch_size=4, seed=1)
    batches = list(test_loader)
    assert [len(b[1]) for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(test_ref.labels))
    assert torch.equal(torch.cat([b[0] for b in batches]), _as_float(test_ref.images))

    def order(seed: int) -> list[int]:
        loader, _, _ = build_loaders("cifar10", tmp_path, batch_size=4, seed=seed)
        return list(loader.sampler)

    first = order(1)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert first == order(1) and first != order(2)
    again, _, _ = build_loaders("cifar10", tmp_path, batch_size=4, seed=1)
    assert list(again.sampler) == first and list(again.sampler) != first  # a new order every epoch
    fresh, _, _ = build_loaders("cifar10", tmp_path, batch_size=4, seed=1)
    labels = torch.cat([b[1] for b in fresh])
    assert labels.tolist() == train_ref.labels[first].tolist()


def _remove(path: Path) -> None:
    path.unlink()


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a pickle")


def _wrong_shape(path: Path) -> None:
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=2))


def _cifar100(path: Path) -> None:
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}, protocol=2))


def _bad_labels(path: Path) -> None:
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, protocol=2))


def _label_count(path: Path) -> None:
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, protocol=2))


@pytest.mark.parametrize(
    ("file", "damage", "words"),
    [
        ("test_batch", _remove, "missing"),
        ("data_batch_3", _garbage, "not a readable python pickle"),
        ("data_batch_1", _wrong_shape, "uint8 [N, 3072]"),
        ("data_batch_2", _cifar100, "CIFAR-100"),
        ("test_batch", _bad_labels, "0..9"),
        ("data_batch_5", _label_count, "'labels' must be 2 integers"),
    ],
)
def test_cifar_malformed_files_raise(
    tmp_path: Path, cifar_writer: Callable, file: str, damage: Callable[[Path], None], words: str
) -> None:
    cifar_writer(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / file
    damage(target)
    with pytest.raises(DatasetError) as err:
        build_datasets("cifar10", tmp_path)
    assert str(target) in str(err.value) and words in str(err.value)
    assert "the python version of CIFAR-10" in str(err.value)  # the expected layout is spelled out


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_pickles_with_code(tmp_path: Path, cifar_writer: Callable) -> None:
    cifar_writer(tmp_path)
    marker = tmp_path / "pwned"
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    target.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load global") as err:
        build_datasets("cifar10", tmp_path)
    assert str(target) in str(err.value)
    assert not marker.exists()


def test_cifar_missing_folder_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        build_datasets("cifar10", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "data_batch_1" in message and "test_batch" in message


def test_cifar_points_at_unextracted_archive(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="extract it"):
        build_datasets("cifar10", tmp_path)


def test_cifar_bad_meta_raises(tmp_path: Path, cifar_writer: Callable) -> None:
    cifar_writer(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=2))
    with pytest.raises(DatasetError, match="label_names") as err:
        build_datasets("cifar10", tmp_path)
    assert str(meta) in str(err.value)
