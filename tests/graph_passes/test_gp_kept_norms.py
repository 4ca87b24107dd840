"""Norms that stay fast after pruning (#11): a masked model whose LayerNorm-family norms were swapped
for KeptStatsNorm (statistics over the kept channels) is pruned into plain norms of the kept width
(nn.LayerNorm, nn.RMSNorm, ChannelsFirstNorm) and still equals the masked model; without the swap
the speedup keeps its exact-statistics norms; a keep the speedup does not follow is a clear error."""
from __future__ import annotations

import copy

import onnx
import pytest
import timm
import torch
from torch import nn

import graph_passes as gp
from _gp_helpers import apply_masks, assert_same, group_of, outputs, random_keep


def _setup(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, *model.pretrained_cfg.get("input_size", (3, 32, 32)))
    groups = gp.channel_groups(copy.deepcopy(model), x)
    keep = random_keep(groups, seed)
    return model, x, groups, keep, gp.group_masks(model, groups, keep)


def _types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("name, plain", [
    ("test_vit", nn.LayerNorm),  # LayerNorm over tokens' last dim
    ("test_convnext", gp.ChannelsFirstNorm),  # timm LayerNorm2d (channels first) and LayerNorm
    ("test_vit4", nn.RMSNorm),  # timm RmsNorm
    ("test_efficientnet_ln", gp.ChannelsFirstNorm),  # timm LayerNormAct2d: norm, then its act
])
def test_kept_stats_model_equals_its_speedup_with_plain_norms(name, plain):
    model, x, _, _, masks = _setup(name)
    exact_masked = apply_masks(model, masks)
    state_keys = set(model.state_dict())
    swapped = gp.kept_stats_norms(model, masks, x)
    assert swapped and all(isinstance(model.get_submodule(n), gp.KeptStatsNorm) for n in swapped)
    assert set(model.state_dict()) == state_keys  # the keep buffer is not persistent; drop/act keep their names
    masked = apply_masks(model, masks)
    # the swap changes the function (statistics over fewer channels): the comparison below means something
    assert (outputs(masked, x)[0] - outputs(exact_masked, x)[0]).abs().max() > 1e-4
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(masked, x), atol=1e-5)
    kinds = _types(pruned)
    assert plain in kinds and not kinds & {gp.ExactStatsNorm, gp.KeptStatsNorm}, kinds


def test_plain_masks_still_give_exact_statistics_norms():
    model, x, _, _, masks = _setup("test_convnext")
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(apply_masks(model, masks), x), atol=1e-5)
    kinds = _types(pruned)
    assert gp.ExactStatsNorm in kinds and gp.ChannelsFirstNorm not in kinds


def test_in_place_speedup_puts_layer_norms_of_the_kept_width_into_the_model():
    model, x, _, _, masks = _setup("test_vit")
    gp.kept_stats_norms(model, masks, x)
    masked = apply_masks(model, masks)
    gp.ModelSpeedup(model, x, masks).speedup_model()
    assert_same(outputs(model, x), outputs(masked, x), atol=1e-5)
    norm = model.blocks[0].norm1
    assert type(norm) is nn.LayerNorm and norm.normalized_shape == (int(masks["blocks.0.norm1"]["weight"].sum()),)


def test_onnx_export_has_layer_normalization_and_far_fewer_nodes(tmp_path):
    model, x, _, _, masks = _setup("test_vit")
    exact = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    gp.kept_stats_norms(model, masks, x)
    kept = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    nodes = {}
    for label, pruned in (("exact", exact), ("kept", kept)):
        path = gp.export_onnx(pruned.eval(), (x,), tmp_path / f"{label}.onnx")
        nodes[label] = [n.op_type for n in onnx.load(str(path)).graph.node]
    norms = sum(1 for m in kept.modules() if isinstance(m, nn.LayerNorm))
    assert norms >= 10 and nodes["kept"].count("LayerNormalization") == norms
    assert "LayerNormalization" not in nodes["exact"]
    assert len(nodes["kept"]) < 0.6 * len(nodes["exact"]), {k: len(v) for k, v in nodes.items()}


def test_a_keep_the_speedup_does_not_follow_is_a_clear_error():
    model, x, groups, keep, masks = _setup("test_vit")
    group = group_of(groups, "blocks.0.norm1")
    other = dict(keep)
    other[group.id] = ~keep[group.id]  # the norms count the channels the speedup removes
    gp.kept_stats_norms(model, gp.group_masks(model, groups, other), x)
    with pytest.raises(gp.SpeedupError, match=r"KeptStatsNorm\) normalises over channels .* that the speedup removes"):
        gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)


def test_fewer_removed_channels_keep_the_kept_statistics_norm_exactly():
    model, x, groups, keep, masks = _setup("test_vit")
    gp.kept_stats_norms(model, masks, x)
    masked = apply_masks(model, masks)
    group = group_of(groups, "blocks.0.norm1")
    fewer = gp.group_masks(model, groups, {g: k for g, k in keep.items() if g != group.id})  # that group stays whole
    pruned = gp.ModelSpeedup(copy.deepcopy(masked), x, fewer).speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(masked, x), atol=1e-5)
    norm = pruned.get_submodule("blocks.0.norm1")
    assert isinstance(norm, gp.KeptStatsNorm) and int(norm.keep.sum()) == int(keep[group.id].sum())


@pytest.mark.parametrize("kind, axis, reduce_all, bias, plain", [
    ("layer", -1, False, True, nn.LayerNorm),
    ("layer", -1, False, False, nn.LayerNorm),
    ("rms", -1, False, False, nn.RMSNorm),
    ("layer", 1, False, True, gp.ChannelsFirstNorm),
    ("rms", 1, False, False, gp.ChannelsFirstNorm),
    ("layer", 1, True, True, nn.GroupNorm),
    ("simple", -1, False, False, gp.ExactStatsNorm),  # no fused op: exact statistics over the kept ones
])
def test_plain_norm_computes_the_kept_statistics_norm_on_the_kept_channels(kind, axis, reduce_all, bias, plain):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 3) * 3 + 1
    axis_n = axis % x.dim()
    keep = torch.tensor([True, False, True, True, False, True, True, False][: x.shape[axis_n]])
    kept = torch.nonzero(keep).flatten()
    w, b = torch.rand(keep.numel()) + 0.5, (torch.rand(keep.numel()) - 0.5) if bias else None
    ref = gp.kept_stats_norm(x, kind, axis, reduce_all, keep, w, b, 1e-6).index_select(axis_n, kept)
    module = gp.plain_norm(kind, axis, x.dim(), reduce_all, w[kept], None if b is None else b[kept], 1e-6)
    assert type(module) is plain
    torch.testing.assert_close(module(x.index_select(axis_n, kept)), ref, atol=1e-5, rtol=1e-5)


def test_a_pruned_channels_first_norm_is_pruned_again_exactly():
    model, x, _, _, masks = _setup("test_convnext")
    gp.kept_stats_norms(model, masks, x)
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    groups = gp.channel_groups(copy.deepcopy(pruned), x)
    again = gp.group_masks(pruned, groups, random_keep(groups, 1))
    twice = gp.ModelSpeedup(pruned, x, again).speedup_model(inplace=False)
    assert_same(outputs(twice, x), outputs(apply_masks(pruned, again), x), atol=1e-5)
    assert gp.ExactStatsNorm in _types(twice)  # not fine-tuned again: exact statistics, as any plain norm


def test_timm_simple_norm_and_unmasked_norms_are_left_alone():
    from timm.layers import SimpleNorm

    model = nn.Sequential(nn.Linear(8, 8), SimpleNorm(8), nn.Linear(8, 4), nn.LayerNorm(4)).eval()
    x = torch.randn(2, 3, 8)
    groups = gp.channel_groups(copy.deepcopy(model), x)
    masks = gp.group_masks(model, groups, random_keep(groups, 0))
    assert "1" in masks and "3" not in masks  # the SimpleNorm's channels are masked; the output's are not
    assert gp.kept_stats_norms(model, masks, x) == []  # no fused op for a SimpleNorm: it stays exact
    assert type(model[1]) is SimpleNorm and type(model[3]) is nn.LayerNorm


def test_channels_first_norm_exports_as_layer_normalization_between_transposes(tmp_path):
    torch.manual_seed(0)
    module = gp.ChannelsFirstNorm("layer", 6, 1e-6, torch.rand(6) + 0.5, torch.rand(6) - 0.5).eval()
    x = torch.randn(2, 6, 5, 3)
    path = gp.export_onnx(module, (x,), tmp_path / "cf.onnx")
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Transpose", "LayerNormalization", "Transpose"]
    (got,) = gp.run_onnx(path, (x,))
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), module.weight, module.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(torch.from_numpy(got), ref.detach(), atol=1e-5, rtol=1e-5)
