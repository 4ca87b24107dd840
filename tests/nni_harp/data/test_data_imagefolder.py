from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from nni_harp.data import DatasetError, build_datasets, build_loaders
from nni_harp.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD


def _colour_tensor(colour: tuple[int, int, int], size: int) -> torch.Tensor:
    return (torch.tensor(colour, dtype=torch.float32) / 255.0).view(3, 1, 1).expand(3, size, size)


def test_imagefolder_round_trips_labels_and_pixels(
    tmp_path: Path, imagefolder_writer: Callable, colour_of: Callable
) -> None:
    imagefolder_writer(tmp_path, classes=("zebra", "cat", "dog"))
    train, test, info = build_datasets("imagefolder", tmp_path, image_size=24)
    assert info.class_names == ("cat", "dog", "zebra") and info.num_classes == 3
    assert (info.mean, info.std, info.image_size) == (IMAGENET_MEAN, IMAGENET_STD, 24)
    assert (len(train), len(test)) == (6, 6)
    for k in range(len(test)):
        x, y = test[k]
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 24, 24)
        assert Path(test.samples[k][0]).parent.name == info.class_names[y]
        image_index = int(Path(test.samples[k][0]).stem.split("_")[1])
        torch.testing.assert_close(x, _colour_tensor(colour_of(y, image_index), 24), atol=1 / 255, rtol=0)
    x, y = train[5]  # random-resized crop of a uniform image keeps its colour
    assert x.shape == (3, 24, 24) and y == 2
    torch.testing.assert_close(x, _colour_tensor(colour_of(2, 1), 24), atol=1 / 255, rtol=0)


def test_imagefolder_falls_back_to_test_split(tmp_path: Path, imagefolder_writer: Callable) -> None:
    imagefolder_writer(tmp_path, splits=("train",))
    imagefolder_writer(tmp_path, splits=("test",), per_class=1)
    _, test, _ = build_datasets("imagefolder", tmp_path)
    assert len(test) == 3 and Path(test.root).name == "test"


def test_imagefolder_prefers_val_over_test(tmp_path: Path, imagefolder_writer: Callable) -> None:
    imagefolder_writer(tmp_path, splits=("train", "val"), per_class=2)
    imagefolder_writer(tmp_path, splits=("test",), per_class=1)
    _, test, _ = build_datasets("imagefolder", tmp_path)
    assert len(test) == 6 and Path(test.root).name == "val"


def test_imagefolder_converts_grey_to_rgb(tmp_path: Path, imagefolder_writer: Callable) -> None:
    imagefolder_writer(tmp_path)
    Image.new("L", (20, 20), 100).save(tmp_path / "val" / "dog" / "img_0.png")
    _, test, _ = build_datasets("imagefolder", tmp_path, image_size=16)
    index = [Path(p).parent.name for p, _ in test.samples].index("dog")
    x, _ = test[index]
    torch.testing.assert_close(x, torch.full((3, 16, 16), 100 / 255), atol=1 / 255, rtol=0)


def test_imagefolder_loaders(tmp_path: Path, imagefolder_writer: Callable) -> None:
    imagefolder_writer(tmp_path)
    train_loader, test_loader, _ = build_loaders("imagefolder", tmp_path, image_size=16, batch_size=4)
    x, y = next(iter(train_loader))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert torch.cat([b[1] for b in test_loader]).tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_unreadable_image_names_the_file(tmp_path: Path, imagefolder_writer: Callable) -> None:
    imagefolder_writer(tmp_path)
    broken = tmp_path / "val" / "cat" / "img_0.png"
    broken.write_bytes(b"not a png")
    _, test, _ = build_datasets("imagefolder", tmp_path)
    with pytest.raises(DatasetError) as err:
        test[0]
    assert str(broken) in str(err.value)


def _no_train(root: Path) -> Path:
    shutil.rmtree(root / "train")
    return root / "train"


def _no_eval(root: Path) -> Path:
    shutil.rmtree(root / "val")
    return root / "val"


def _class_mismatch(root: Path) -> Path:
    (root / "val" / "zebra").rename(root / "val" / "horse")
    return root / "val"


def _one_class(root: Path) -> Path:
    for split in ("train", "val"):
        for name in ("dog", "zebra"):
            shutil.rmtree(root / split / name)
    return root / "train"


def _empty_class(root: Path) -> Path:
    for image in (root / "train" / "dog").iterdir():
        image.unlink()
    return root / "train"


def _no_class_folders(root: Path) -> Path:
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    return root / "val"


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_no_train, "does not exist"),
        (_no_eval, "no evaluation split"),
        (_class_mismatch, "class folders differ"),
        (_one_class, "need at least 2"),
        (_empty_class, "cannot index"),
        (_no_class_folders, "cannot index"),
    ],
)
def test_imagefolder_bad_layouts_raise(
    tmp_path: Path, imagefolder_writer: Callable, damage: Callable[[Path], Path], words: str
) -> None:
    imagefolder_writer(tmp_path)
    path = damage(tmp_path)
    with pytest.raises(DatasetError) as err:
        build_datasets("imagefolder", tmp_path)
    message = str(err.value)
    assert str(path) in message and words in message and "<data_dir>/train/<class>" in message
