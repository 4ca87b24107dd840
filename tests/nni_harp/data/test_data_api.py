from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

import nni_harp.data as data
from nni_harp.data import DATASETS, DatasetError, DatasetInfo, build_datasets, build_loaders


def test_public_api() -> None:
    assert DATASETS == ("digits", "cifar10", "svhn", "imagefolder")
    assert set(data.__all__) == {"DATASETS", "DatasetInfo", "DatasetError", "build_datasets", "build_loaders",
                                "drops_last_batch"}
    assert issubclass(DatasetError, ValueError)


def test_unknown_name_lists_the_datasets() -> None:
    with pytest.raises(DatasetError) as err:
        build_datasets("mnist")
    assert "'mnist'" in str(err.value) and all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "imagefolder"])
def test_missing_data_dir_says_pass_data_dir(name: str) -> None:
    with pytest.raises(DatasetError, match="--data-dir") as err:
        build_datasets(name)
    assert name in str(err.value)


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(DatasetError, match="is not a directory") as err:
        build_datasets("svhn", not_a_dir)
    assert str(not_a_dir) in str(err.value)


@pytest.mark.parametrize("image_size", [7, 1025, 0, 32.0, True, "32"])
def test_image_size_out_of_range(image_size: object) -> None:
    with pytest.raises(DatasetError, match=r"image_size .*\[8, 1024\]"):
        build_datasets("digits", image_size=image_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(DatasetError, match="seed"):
        build_datasets("digits", seed=seed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"distributed": 1}, "distributed"),
        ({"drop_last": "yes"}, "drop_last"),
    ],
)
def test_bad_loader_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(DatasetError, match=field):
        build_loaders("digits", **kwargs)  # type: ignore[arg-type]


def _info(**overrides: object) -> DatasetInfo:
    fields: dict[str, object] = {
        "name": "x", "num_classes": 10, "in_chans": 3, "image_size": 32,
        "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2],
    }
    fields.update(overrides)
    return DatasetInfo(**fields)  # type: ignore[arg-type]


def test_dataset_info_is_frozen_and_normalised() -> None:
    info = _info()
    assert info.mean == (0.5, 0.5, 0.5) and isinstance(info.std, tuple) and info.class_names == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": ""}, "DatasetInfo.name"),
        ({"num_classes": 1}, "DatasetInfo.num_classes"),
        ({"in_chans": 0}, "DatasetInfo.in_chans"),
        ({"image_size": 4}, "DatasetInfo.image_size"),
        ({"mean": (0.5, 0.5)}, "DatasetInfo.mean"),
        ({"mean": (0.5, 0.5, 2.0)}, "DatasetInfo.mean"),
        ({"std": (0.2, 0.0, 0.2)}, "DatasetInfo.std"),
        ({"std": (0.2, float("nan"), 0.2)}, "DatasetInfo.std"),
        ({"class_names": ("a", "b")}, "DatasetInfo.class_names"),
    ],
)
def test_dataset_info_validation_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(DatasetError, match=field.replace(".", r"\.")):
        _info(**overrides)


def test_plain_loaders_and_drop_last() -> None:
    train_loader, test_loader, info = build_loaders("digits", batch_size=1000, drop_last=True)
    assert isinstance(train_loader.sampler, RandomSampler)
    assert isinstance(test_loader.sampler, SequentialSampler)
    assert len(train_loader) == 1 and len(test_loader) == 1  # 1437 // 1000 kept; all 360 test samples kept
    x, y = next(iter(test_loader))
    assert x.shape == (360, 3, 32, 32) and y.shape == (360,) and info.num_classes == 10


def test_distributed_without_process_group_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert not dist.is_initialized()
    with caplog.at_level(logging.WARNING, logger="nni_harp.data.loaders"):
        train_loader, _, _ = build_loaders("digits", distributed=True)
    assert isinstance(train_loader.sampler, RandomSampler)
    assert "not initialised" in caplog.text


def test_distributed_uses_distributed_samplers(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train_loader, test_loader, _ = build_loaders("digits", batch_size=64, seed=5, distributed=True)
    finally:
        dist.destroy_process_group()
    assert isinstance(train_loader.sampler, DistributedSampler)
    assert isinstance(test_loader.sampler, DistributedSampler)
    assert train_loader.sampler.shuffle and train_loader.sampler.seed == 5
    assert not test_loader.sampler.shuffle and list(test_loader.sampler) == list(range(360))


def test_workers_reproduce_augmentation(tmp_path: Path, cifar_writer: Callable) -> None:
    cifar_writer(tmp_path)

    def first_batch(seed: int) -> tuple[torch.Tensor, list[int]]:
        loader, _, _ = build_loaders("cifar10", tmp_path, batch_size=20, seed=seed, num_workers=1)
        order = list(loader.sampler)  # the sampler's own generator: the same order as the epoch below
        loader, _, _ = build_loaders("cifar10", tmp_path, batch_size=20, seed=seed, num_workers=1)
        return next(iter(loader))[0], order

    torch.manual_seed(1)
    a, order_a = first_batch(3)
    torch.manual_seed(2)  # the main process RNG must not matter: workers are seeded by the loader
    b, order_b = first_batch(3)
    assert order_a == order_b and torch.equal(a, b)
    c, order_c = first_batch(4)
    c_in_a_order = c[[order_c.index(i) for i in order_a]]
    assert not torch.equal(a, c_in_a_order)  # same images, different augmentation
