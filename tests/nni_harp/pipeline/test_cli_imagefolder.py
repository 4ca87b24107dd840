"""The pipeline on an image folder from disk: classes come from the folders, errors name the layout."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from nni_harp import load_pruned
from nni_harp.cli import main


def _make_tree(root, classes=("ant", "bee", "cat"), train=6, val=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_run(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    _make_tree(data)
    assert main(["prune", "test_resnet", "--dataset", "imagefolder", "--data-dir", str(data), "--output-dir", str(out),
                 "--pretrain-epochs", "1", "--prune-epochs", "1", "--finetune-epochs", "1", "--batch-size", "6",
                 "--attack-steps", "1", "--eval-attack-steps", "1", "--autoattack", "off", "--latency-runs", "1",
                 "--no-onnx", "--quiet"]) == 0
    meta = json.loads((out / "model_meta.json").read_text())
    assert meta["num_classes"] == 3 and meta["dataset"] == "imagefolder"
    assert json.loads((out / "report.json").read_text())["pruned"]["eval_samples"] == 6
    assert load_pruned("test_resnet", out).model.num_classes == 3


def test_malformed_data_dir_names_the_layout(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert main(["prune", "test_resnet", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nni-harp: error: ") and "train" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
