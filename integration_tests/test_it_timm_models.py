"""Prune real timm models end to end: 30 % of every prunable channel group at random (seeded),
physically remove the channels, and check the pruned model against the masked one, its cost, and
its ONNX export run in ONNX Runtime.

Default run: every ``timm.list_models('test_*')`` model plus a small real-family sample.
``-m slow``: one small variant of each of 30 real timm families.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import timm
import torch

import graph_passes as gp
from graph_passes.onnx_export import export_onnx, run_onnx

RATIO = 0.3
SEED = 0
ATOL = 1e-4
RTOL = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    size: int | None = None  # square input side; None: the model's default
    kwargs: dict[str, Any] = field(default_factory=dict)
    slow: bool = True


# Smallest variant per family, at a reduced input where the architecture allows it.
REAL_FAMILIES = [
    Case("resnet10t", 64, slow=False),
    Case("resnext26ts", 64),
    Case("regnetx_002", 64),
    Case("mobilenetv2_035", 64),
    Case("mobilenetv3_small_050", 64, slow=False),
    Case("mobilenetv4_conv_small_035", 64),
    Case("efficientnet_b0", 64),
    Case("ghostnet_050", 64),
    Case("rexnet_100", 64),
    Case("densenet121", 64),
    Case("dla46_c", 64),
    Case("dpn48b", 64),
    Case("cspresnet50", 64),
    Case("hrnet_w18_small", 64),
    Case("inception_v3", 96),
    Case("legacy_xception", 96),
    Case("convnext_atto", 64, slow=False),
    Case("poolformer_s12", 64),
    Case("vit_tiny_patch16_224", 64, {"img_size": 64}, slow=False),
    Case("deit_tiny_patch16_224", 64, {"img_size": 64}),
    Case("swin_tiny_patch4_window7_224", 112, {"img_size": 112}),
    Case("levit_128s", 128, {"img_size": 128}),
    Case("mobilevit_xxs", 128),
    Case("efficientvit_b0", 128),
    Case("fastvit_t8", 64),
    Case("edgenext_xx_small", 64),
    Case("repvgg_a0", 64),
    Case("nf_regnet_b0", 64),
    Case("hgnetv2_b0", 64),
    Case("starnet_s050", 64),
]

TEST_MODELS = [Case(n, slow=False) for n in timm.list_models("test_*")]

# Models with no prunable channel group at all. Each entry is an expected, documented limitation:
# the test asserts it is still true (so a fix shows up as an XPASS-like failure to update here).
NO_PRUNABLE_GROUP: dict[str, str] = {}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    return gp.count_flops(model, x)  # parameters' requires_grad off: attention-pool latent views


def _masked(model: torch.nn.Module, masks: dict[str, dict[str, torch.Tensor]]) -> torch.nn.Module:
    return gp.masked_copy(model, masks)


def _check(case: Case, tmp_path) -> None:
    torch.manual_seed(SEED)
    model = timm.create_model(case.name, pretrained=False, num_classes=10, **case.kwargs).eval()
    size = case.size or model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)

    groups = gp.channel_groups(model, x)
    prunable = [g for g in groups if g.prunable]
    if case.name in NO_PRUNABLE_GROUP:
        assert not prunable, f"{case.name} now has prunable groups: remove it from NO_PRUNABLE_GROUP"
        pytest.xfail(f"expected limitation: {NO_PRUNABLE_GROUP[case.name]}")
    assert prunable, f"{case.name}: no prunable channel group; reasons: {sorted({g.reason for g in groups})[:5]}"

    keep = gp.random_keep(groups, RATIO, SEED)
    masks = gp.group_masks(model, groups, keep)
    masked = _masked(model, masks)
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False).eval()

    # (a) the pruned model computes what the masked model computes
    with torch.no_grad():
        ref = masked(x)
        out = pruned(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=ATOL, rtol=RTOL), f"max abs err {(out - ref).abs().max().item():.3e}"

    # (b) parameters and FLOPs went down
    assert _params(pruned) < _params(model)
    assert _flops(pruned, x) < _flops(model, x)

    # (c) the pruned model exports to ONNX and runs in ONNX Runtime with the same outputs
    path = export_onnx(pruned, x, tmp_path / f"{case.name}.onnx")
    (onnx_out,) = run_onnx(path, x)[:1]
    np.testing.assert_allclose(onnx_out, out.numpy(), atol=ATOL, rtol=RTOL)


# Known failures, open work (strict: a fix turns them into failures to remove from this list).
KNOWN_FAILURES: dict[str, str] = {}


def _params_for(cases: list[Case]) -> list:
    params = []
    for c in cases:
        marks = [pytest.mark.slow] if c.slow else []
        if c.name in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[c.name], strict=True))
        params.append(pytest.param(c, id=c.name, marks=marks))
    return params


@pytest.mark.parametrize("case", _params_for(TEST_MODELS))
def test_it_timm_test_model(case: Case, tmp_path) -> None:
    _check(case, tmp_path)


@pytest.mark.parametrize("case", _params_for(REAL_FAMILIES))
def test_it_timm_real_family(case: Case, tmp_path) -> None:
    _check(case, tmp_path)


def test_it_real_family_list_is_broad() -> None:
    assert len(REAL_FAMILIES) >= 30
    assert sum(not c.slow for c in REAL_FAMILIES) >= 4
