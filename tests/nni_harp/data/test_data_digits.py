from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from nni_harp.data import DatasetError, DatasetInfo, build_datasets
from nni_harp.data.digits import DIGITS_MEAN, DIGITS_STD, DIGITS_TEST_FRACTION, build_digits, digits_split


@pytest.fixture(scope="module")
def raw() -> tuple[torch.Tensor, np.ndarray]:
    bunch = load_digits()
    return torch.from_numpy(bunch.images.astype(np.float32) / 16.0), bunch.target


@pytest.mark.parametrize("image_size", [8, 32])
def test_digits_shapes_range_and_info(image_size: int) -> None:
    train, test, info = build_datasets("digits", image_size=image_size)
    assert (len(train), len(test)) == (1437, 360)
    assert info == DatasetInfo(
        "digits", 10, 3, image_size, DIGITS_MEAN, DIGITS_STD, tuple(str(d) for d in range(10))
    )
    for ds in (train, test):
        x, y = ds[len(ds) - 1]
        assert x.dtype == torch.float32 and x.shape == (3, image_size, image_size)
        assert isinstance(y, int) and 0 <= y < 10
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey repeated to 3 channels


def test_digits_native_size_round_trips_pixels(raw: tuple[torch.Tensor, np.ndarray]) -> None:
    images, targets = raw
    train, test, _ = build_datasets("digits", image_size=8, seed=3)
    train_idx, test_idx = digits_split(torch.from_numpy(targets), 3)
    for ds, idx in ((train, train_idx), (test, test_idx)):
        for k in (0, 17, len(ds) - 1):
            x, y = ds[k]
            assert y == targets[idx[k]]
            assert torch.equal(x[0], images[idx[k]])  # values 0..16 scaled to [0, 1]


@pytest.mark.parametrize("image_size", [20, 128])  # 128 exceeds the precompute budget: resized per sample
def test_digits_resize_is_bilinear(raw: tuple[torch.Tensor, np.ndarray], image_size: int) -> None:
    images, targets = raw
    _, test, _ = build_datasets("digits", image_size=image_size, seed=0)
    _, test_idx = digits_split(torch.from_numpy(targets), 0)
    x, _ = test[5]
    expected = F.interpolate(
        images[test_idx[5]][None, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )[0, 0]
    torch.testing.assert_close(x[1], expected.clamp(0, 1), atol=1e-6, rtol=0)


def test_digits_split_is_deterministic_per_seed() -> None:
    a_train, a_test, _ = build_datasets("digits", seed=7)
    b_train, b_test, _ = build_datasets("digits", seed=7)
    c_train, _, _ = build_datasets("digits", seed=8)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)


def test_digits_split_is_stratified_disjoint_and_complete(raw: tuple[torch.Tensor, np.ndarray]) -> None:
    _, targets = raw
    train_idx, test_idx = digits_split(torch.from_numpy(targets), 11)
    assert len(set(train_idx) & set(test_idx)) == 0
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(len(targets)))
    total = np.bincount(targets, minlength=10)
    in_test = np.bincount(targets[test_idx], minlength=10)
    assert np.all(np.abs(in_test - 0.2 * total) <= 1.0), (in_test, total)


def test_digits_statistics_match_the_train_split() -> None:
    train, _, info = build_datasets("digits", image_size=8, seed=0)
    pixels = train.images.float()
    assert abs(float(pixels.mean()) - info.mean[0]) < 0.01
    assert abs(float(pixels.std()) - info.std[0]) < 0.01


def test_digits_samples_are_copies() -> None:
    train, _, _ = build_datasets("digits")
    x, _ = train[0]
    before = x.clone()
    x.add_(5.0)
    again, _ = train[0]
    assert torch.equal(again, before)


def test_digits_ignores_data_dir(tmp_path: object) -> None:
    train, _, info = build_datasets("digits", data_dir=tmp_path / "not-there")  # type: ignore[operator]
    assert info.name == "digits" and len(train) == 1437


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_digits_test_fraction_holds_out_a_stratified_share(raw: tuple[torch.Tensor, np.ndarray], fraction: float) -> None:
    _, targets = raw
    train_idx, test_idx = digits_split(torch.from_numpy(targets), 4, test_fraction=fraction)
    assert len(set(train_idx) & set(test_idx)) == 0 and len(train_idx) + len(test_idx) == len(targets)
    assert abs(len(test_idx) - fraction * len(targets)) <= 1
    in_test = np.bincount(targets[test_idx], minlength=10)
    assert np.all(np.abs(in_test - fraction * np.bincount(targets, minlength=10)) <= 1.0), in_test
    train, test, _ = build_digits(None, 8, 4, test_fraction=fraction)
    assert (len(train), len(test)) == (len(train_idx), len(test_idx))
    assert torch.equal(test.labels, torch.from_numpy(targets[test_idx]))


def test_digits_default_split_is_unchanged_by_the_option() -> None:
    labels = torch.from_numpy(load_digits().target)
    default_train, default_test = digits_split(labels, 5)
    explicit_train, explicit_test = digits_split(labels, 5, test_fraction=DIGITS_TEST_FRACTION)
    assert np.array_equal(default_train, explicit_train) and np.array_equal(default_test, explicit_test)
    _, test, _ = build_datasets("digits", seed=5)  # what the pipeline gets: the registry's 80/20
    assert len(test) == len(default_test) == 360


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, True, "0.5"])
def test_digits_rejects_bad_test_fraction(fraction: object) -> None:
    with pytest.raises(DatasetError, match="test_fraction"):
        digits_split(torch.from_numpy(load_digits().target), 0, test_fraction=fraction)  # type: ignore[arg-type]
