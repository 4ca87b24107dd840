"""ModelSpeedup's mask reconciliation, its input model left alone, and PruningPlan round trips."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import graph_passes as gp
from _gp_helpers import apply_masks, assert_same, group_of, outputs, prune, random_keep
from test_gp_attention import Attention
from test_gp_layers import ConvBn
from test_gp_ops import Residual


def test_disagreeing_masks_keep_the_channel_and_match_the_masked_model():
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = gp.channel_groups(model, x)
    g = group_of(groups, "stem")
    assert group_of(groups, "b").id == g.id
    # stem drops channels 0-3; b drops only 0-1 (so 2-3 are kept by b); the layer-scale bias masks nothing
    stem_mask = torch.ones_like(model.stem.weight)
    stem_mask[:4] = 0
    b_mask = torch.ones_like(model.b.weight)
    b_mask[:2] = 0
    masks = {"stem": {"weight": stem_mask, "bias": (stem_mask[:, 0, 0, 0] != 0).float()},
             "b": {"weight": b_mask, "bias": (b_mask[:, 0, 0, 0] != 0).float()},
             "": {"bias": torch.cat([torch.zeros(2), torch.ones(6)]).view(8, 1, 1)}}
    masked = apply_masks(model, masks)
    speedup = gp.ModelSpeedup(model, x, masks)
    pruned = speedup.speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(masked, x))
    assert speedup.keep[g.id].tolist() == [False, False] + [True] * 6
    assert pruned.stem.out_channels == pruned.b.out_channels == 6
    assert pruned.head.in_channels == 6
    # channels 2-3 survive with stem's (zeroed) weights baked in
    assert torch.count_nonzero(pruned.stem.weight[:2]) == 0 and torch.count_nonzero(pruned.b.weight[:2]) != 0


def test_partly_zero_channel_is_kept():
    model = ConvBn().eval()
    x = torch.randn(1, 3, 6, 6)
    mask = torch.ones_like(model.conv.weight)
    mask[0, 0] = 0  # one input slice of filter 0: the filter is still alive
    mask[1] = 0
    speedup = gp.ModelSpeedup(model, x, {"conv": {"weight": mask}})
    pruned = speedup.speedup_model(inplace=False)
    assert pruned.conv.out_channels == 7 and pruned.bn.num_features == 7
    assert_same(outputs(pruned, x), outputs(apply_masks(model, {"conv": {"weight": mask}}), x))


@pytest.mark.parametrize("factory", [Residual, lambda: Attention(False)], ids=["residual", "attention"])
def test_speedup_does_not_modify_the_input_model(factory):
    torch.manual_seed(0)
    model = factory().train()
    x = torch.randn(2, 3, 8, 8) if factory is Residual else torch.randn(2, 5, 6)
    groups = gp.channel_groups(copy.deepcopy(model), x)
    masks = gp.group_masks(model, groups, random_keep(groups))
    assert masks
    before = copy.deepcopy(model.state_dict())
    modules_before = {n: type(m) for n, m in model.named_modules()}
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    assert model.training  # the caller's model is not switched to eval
    assert pruned.training  # the result comes back in the mode the model was in
    assert_same(outputs(pruned, x), outputs(apply_masks(model, masks), x))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert not any(isinstance(m, torch.fx.GraphModule) for m in model.modules())


def test_pruning_plan_save_load_apply_round_trip(tmp_path):
    model = Attention(True).eval()
    x = torch.randn(2, 5, 6)
    groups = gp.channel_groups(model, x)
    keep = random_keep(groups, seed=3)
    masks = gp.group_masks(model, groups, keep)
    direct = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    plan = gp.PruningPlan.from_masks(model, x, masks)
    assert plan.kept and set(plan.kept) <= set(keep)
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = gp.PruningPlan.load(path)
    assert loaded == plan
    fresh = copy.deepcopy(model)  # same weights, as if rebuilt and loaded
    applied = loaded.apply(fresh, masks=masks)  # input shape from the plan
    assert {k: v.shape for k, v in applied.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    assert_same(outputs(applied, x), outputs(direct, x))
    assert_same(outputs(applied, x), outputs(apply_masks(model, masks), x))
    # structure only (no masks): same shapes, kept channels taken from the unmasked weights
    bare = loaded.apply(fresh)
    assert {k: v.shape for k, v in bare.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    # masks zero only removed channels, so the kept weights are the same with or without them
    direct_state = direct.state_dict()
    for k, v in bare.state_dict().items():
        assert torch.equal(v, direct_state[k]), k


def test_pruning_plan_rejects_a_different_model():
    x = torch.randn(2, 5, 6)
    model = Attention(False).eval()
    groups = gp.channel_groups(model, x)
    plan = gp.PruningPlan.from_keep(groups, random_keep(groups), x)
    with pytest.raises(gp.PlanError):
        plan.apply(Attention(False, dim=24, heads=3).eval())
    with pytest.raises(gp.PlanError):
        plan.apply(ConvBn().eval(), torch.randn(1, 3, 6, 6))
    with pytest.raises(gp.PlanError):
        gp.PruningPlan.from_json('{"format": "something else"}')
    with pytest.raises(gp.PlanError):
        gp.PruningPlan.from_json("not json")


def _saved_plan(tmp_path):
    """A ConvBn model, a plan of it saved as plan.json, and the file's JSON."""
    model = ConvBn().eval()
    x = torch.randn(1, 3, 6, 6)
    groups = gp.channel_groups(model, x)
    path = gp.PruningPlan.from_keep(groups, random_keep(groups), x).save(tmp_path / "plan.json")
    return model, path, json.loads(path.read_text())


@pytest.mark.parametrize(("edit", "fragments"), [
    (lambda d: d["kept"].update({"-2": [0]}), ["field 'kept' names group '-2', which does not exist"]),
    (lambda d: d["kept"].update({"7": [0]}), ["field 'kept' names group '7', which does not exist"]),
    (lambda d: d.pop("kept"), ["field 'kept' is missing"]),
    (lambda d: d["kept"].update({"0": [0, "1"]}), ["group 0: field 'kept' holds '1', not a channel index"]),
    (lambda d: d["kept"].update({"0": [0, 1.0]}), ["group 0: field 'kept' holds 1.0, not a channel index"]),
    (lambda d: d["kept"].update({"0": [0, 8]}), ["group 0: field 'kept' holds channel 8, outside the group's 8"]),
    (lambda d: d["kept"].update({"0": [-1]}), ["group 0: field 'kept' holds channel -1"]),
    (lambda d: d["kept"].update({"0": []}), ["group 0: field 'kept' is empty"]),
    (lambda d: d["kept"].update({"0": [1, 1]}), ["group 0: field 'kept' names a channel twice"]),
    (lambda d: d["groups"][0].update({"size": "8"}), ["group 0: fields 'size' (an integer)"]),
    (lambda d: d.update({"input_shapes": [[1, -3]]}), ["field 'input_shapes'"]),
    (lambda d: d.update({"format": "v0"}), ["field 'format' is 'v0'"]),
], ids=["negative-group", "missing-group", "no-kept", "str-index", "float-index", "index-too-big",
        "negative-index", "empty", "twice", "size-type", "shape", "format"])
def test_plan_file_errors_name_the_file_the_group_and_the_field(tmp_path, edit, fragments):
    # before: an IndexError (group 7), a KeyError ('kept'), a ValueError ('1') or silently
    # skipped group -2 (a Python index) that made loading the weights fail later
    model, path, data = _saved_plan(tmp_path)
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(gp.PlanError) as info:
        gp.PruningPlan.load(path).apply(model)
    assert str(info.value).startswith(f"{path}"), str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_plan_apply_names_the_plan_for_a_different_model(tmp_path):
    _, path, _ = _saved_plan(tmp_path)
    with pytest.raises(gp.PlanError, match=rf"^{path} is for a model with \d+ channel groups"):
        gp.PruningPlan.load(path).apply(Residual().eval(), torch.randn(2, 3, 8, 8))


def test_plans_built_in_python_are_checked_too():
    with pytest.raises(gp.PlanError, match="field 'kept' names group -2"):
        gp.PruningPlan({-2: [0]}, [{"size": 4, "members": ["a.weight:0"]}])
