"""auto_set_dependency_group_ids: NNI config lists in which coupled layers share one mask."""
from __future__ import annotations

import copy

import pytest
import torch
from nni.compression.pruning import L1NormPruner
from torch import fx, nn

import graph_passes as gp
from _gp_helpers import assert_same, outputs
from test_gp_ops import Residual

CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}]


def _l1norm_in_place(model: nn.Module, x: torch.Tensor, config_list: list[dict]) -> dict:
    """NNI's L1NormPruner on ``config_list``, then ModelSpeedup in place; asserts the model equals
    its masked self (the masks as applied) and returns NNI's masks."""
    pruner = L1NormPruner(model, config_list)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    dense = copy.deepcopy(model)
    speedup = gp.ModelSpeedup(model, x, masks)
    speedup.speedup_model()
    assert_same(outputs(model, x), outputs(gp.masked_copy(dense, speedup.applied_masks), x))
    return masks


def _by_name(config_list: list[dict]) -> dict[str, dict]:
    assert all(len(entry["op_names"]) == 1 for entry in config_list)
    return {entry["op_names"][0]: entry for entry in config_list}


def test_producers_of_a_residual_group_share_an_id_and_fixed_outputs_are_left_out():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    entries = _by_name(gp.auto_set_dependency_group_ids(model, x, CONFIG))
    assert set(entries) == {"stem", "a", "b"}  # head: its outputs are the model's
    assert entries["stem"]["dependency_group_id"] == entries["b"]["dependency_group_id"]
    assert "dependency_group_id" not in entries["a"]  # the only producer of its channels
    assert all(e["sparse_ratio"] == 0.5 for e in entries.values())


def test_nni_call_shapes_and_legacy_keys():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    ours = gp.auto_set_dependency_group_ids(model, x, CONFIG)
    assert gp.auto_set_denpendency_group_ids(gp.trace(model, x), CONFIG) == ours  # nni.compression.speedup's
    assert gp.auto_set_denpendency_group_ids(model, CONFIG, x) == ours  # nni.compression.utils'
    with pytest.raises(gp.GraphPassError, match="carries no shapes: pass the example inputs"):
        gp.auto_set_denpendency_group_ids(fx.symbolic_trace(model), CONFIG)
    with pytest.raises(gp.GraphPassError, match="config_list must be a non-empty list of dicts"):
        gp.auto_set_dependency_group_ids(model, x, [])
    legacy = _by_name(gp.auto_set_dependency_group_ids(model, x, [{"op_types": ["Conv2d"], "sparsity": 0.5},
                                                                  {"exclude": True, "op_names": ["a"]}]))
    assert set(legacy) == {"stem", "b"}
    assert legacy["stem"]["target_settings"]["weight"]["sparse_ratio"] == 0.5


class GroupedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.relu(self.expand(x)))))


def test_grouped_convs_are_pruned_by_whole_groups_through_block_granularity():
    torch.manual_seed(0)
    model, x = GroupedBlock().eval(), torch.randn(2, 3, 6, 6)
    config = gp.auto_set_dependency_group_ids(model, x, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}])
    entries = _by_name(config)
    assert entries["expand"]["granularity"] == entries["grouped"]["granularity"] == [4, -1, -1, -1]
    assert entries["expand"]["dependency_group_id"] == entries["grouped"]["dependency_group_id"]
    _l1norm_in_place(model, x, config)
    assert (model.grouped.groups, model.grouped.out_channels, model.expand.out_channels) == (2, 8, 8)


class ConvThenTokens(nn.Module):
    """A conv stem and linear layers writing into one residual stream (a ViT's patch embedding
    and its blocks): weights of two ranks in one channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        t = t + self.fc3(t)
        return self.head(t.mean(1))


def test_layers_of_another_rank_take_the_group_mask_through_align():
    torch.manual_seed(0)
    model, x = ConvThenTokens().eval(), torch.randn(2, 3, 8, 8)
    entries = _by_name(gp.auto_set_dependency_group_ids(model, x, CONFIG))
    assert entries["fc2"]["dependency_group_id"] == entries["fc3"]["dependency_group_id"]
    align = {"module_name": "fc2", "target_name": "weight", "dims": [0]}
    assert entries["stem"]["target_settings"] == {"weight": {"align": align}, "bias": {"align": align}}
    assert "sparse_ratio" not in entries["stem"] and "head" not in entries
    masks = _l1norm_in_place(model, x, list(entries.values()))
    kept = [(masks[n]["weight"].flatten(1) != 0).any(1) for n in ("stem", "fc2", "fc3")]
    assert all(torch.equal(k, kept[0]) for k in kept) and int(kept[0].sum()) == 4
    assert model.stem.out_channels == model.fc3.out_features == model.head.in_features == 4


class PoolThenTokens(nn.Module):
    """PiT's pooling: a grouped conv doubling the channels (two rows per unit, after a stem with
    one) writing into a stream of linear layers, which copy the pooling conv's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.pool = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        t = self.pool(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)
        t = t + self.fc1(t)
        t = t + self.fc2(t)
        return self.head(t.mean(1))


def test_an_aligned_layer_of_a_blocked_group_copies_whole_blocks():
    torch.manual_seed(0)
    model, x = PoolThenTokens().eval(), torch.randn(2, 3, 6, 6)
    entries = _by_name(gp.auto_set_dependency_group_ids(model, x, CONFIG))
    assert entries["stem"]["dependency_group_id"] == entries["pool"]["dependency_group_id"]  # one row vs two per unit
    assert entries["pool"]["granularity"] == [2, -1, -1, -1] and "granularity" not in entries["stem"]
    assert entries["fc1"]["target_settings"]["weight"]["align"]["module_name"] == "pool"
    assert "granularity" not in entries["fc1"]  # the copied rows are whole blocks already
    masks = _l1norm_in_place(model, x, list(entries.values()))
    units = (masks["stem"]["weight"].flatten(1) != 0).any(1)
    rows = [(masks[n]["weight"].flatten(1) != 0).any(1) for n in ("pool", "fc1", "fc2")]
    assert all(torch.equal(r, rows[0]) for r in rows) and torch.equal(rows[0], units.repeat_interleave(2))
    assert model.pool.out_channels == model.fc2.out_features == 4 and model.pool.groups == 2
