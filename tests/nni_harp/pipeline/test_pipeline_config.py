"""PipelineConfig / EvaluateConfig validation: every error names the field and the allowed range."""
from __future__ import annotations

import dataclasses

import pytest

from nni_harp.pipeline.config import ConfigError, EvaluateConfig, PipelineConfig, suggest_models


def test_defaults_are_valid_and_frozen(tmp_path):
    cfg = PipelineConfig(model="test_resnet", output_dir=str(tmp_path))
    assert cfg.mode == "unstructured" and cfg.dataset == "digits"
    assert cfg.target_keep == pytest.approx(1 - cfg.sparsity)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("sparsity", 1.5, "(0, 1)"),
        ("sparsity", 0.0, "(0, 1)"),
        ("flops_target", 1.0, "(0, 1)"),
        ("flops_target", float("nan"), "(0, 1)"),
        ("eps", 0.0, "(0, 1]"),
        ("mode", "channels", "unstructured, structured"),
        ("adv_loss", "fgsm", "pgd, trades, mart"),
        ("dataset", "mnist", "digits"),
        ("image_size", 4, "[8, 1024]"),
        ("batch_size", 0, "in [1, 65536]"),
        ("attack_steps", 0, "[1, 1000]"),
        ("prune_epochs", 0, "[1, 100000]"),
        ("autoattack", "fast", "apgd-ce"),
        ("max_train_batches", 0, ">= 1"),
        ("resume", "yes", "True or False"),
        ("init_allocation", "random", "uniform, dense, erk, magnitude, lamp"),
        ("init_keep", 0.05, "at least the target 0.1"),
        ("init_keep", 1.5, "(0, 1]"),
    ],
)
def test_bad_values_name_field_and_range(field, value, fragment):
    with pytest.raises(ConfigError) as info:
        PipelineConfig(model="test_resnet", **{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert fragment in str(info.value)


def test_pretraining_needed_without_checkpoint():
    with pytest.raises(ConfigError, match="pretrain_epochs"):
        PipelineConfig(model="test_resnet", pretrain_epochs=0)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError) as info:
        PipelineConfig(model="resnet1")
    assert info.value.field == "model"
    assert "did you mean" in str(info.value) and "resnet18" in str(info.value)
    assert "resnet50" in suggest_models("resnet05") or "resnet50" in suggest_models("renset50")


def test_data_dir_checks(tmp_path):
    with pytest.raises(ConfigError, match="data_dir: --data-dir is required"):
        PipelineConfig(model="test_resnet", dataset="imagefolder")
    with pytest.raises(ConfigError, match="does not exist"):
        PipelineConfig(model="test_resnet", dataset="imagefolder", data_dir=str(tmp_path / "missing"))
    cfg = PipelineConfig(model="test_resnet", dataset="imagefolder", data_dir=str(tmp_path))
    assert cfg.data_dir == str(tmp_path)


def test_round_trip_and_unknown_keys():
    cfg = PipelineConfig(model="test_resnet", mode="structured", flops_target=0.3)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="flops"):
        PipelineConfig.from_dict({**cfg.to_dict(), "flops": 0.3})


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="resume"):
        PipelineConfig(model="test_resnet", resume=True, overwrite=True)


def test_evaluate_config_needs_existing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        EvaluateConfig(model="test_resnet", checkpoint=str(tmp_path / "nope.pt"))
    (tmp_path / "w.pt").write_bytes(b"")
    assert EvaluateConfig(model="test_resnet", checkpoint=str(tmp_path / "w.pt")).autoattack == "apgd-ce+apgd-t"
