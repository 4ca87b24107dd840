"""A model pruned by ModelSpeedup traces again, its exact-statistics norms (ExactStatsNorm and the
function exact_stats_norm) included: it can be costed and pruned a second time, and the twice-pruned
model still equals the masked once-pruned model."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import graph_passes as gp
from _gp_helpers import assert_same, n_params, outputs

C = 12  # channels of the hand-built models' norms


class TokenNorm(nn.Module):
    """Linear -> LayerNorm over the channels (module or F.layer_norm) -> Linear."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.fc1 = nn.Linear(6, C)
        self.norm = nn.LayerNorm(C)
        self.fc2 = nn.Linear(C, 4)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.functional:
            y = F.layer_norm(y, (C,), self.norm.weight, self.norm.bias)
        else:
            y = self.norm(y)
        return self.fc2(F.gelu(y))


class ConvGroupNorm1(nn.Module):
    """Conv -> one-group GroupNorm (module or F.group_norm) -> Conv: statistics over C, H and W."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.gn = nn.GroupNorm(1, C)
        self.head = nn.Conv2d(C, 4, 1)
        with torch.no_grad():
            self.gn.weight.normal_()
            self.gn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.functional:
            y = F.group_norm(y, 1, self.gn.weight, self.gn.bias)
        else:
            y = self.gn(y)
        return self.head(torch.relu(y))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "layernorm_module": (lambda: TokenNorm(False), (2, 5, 6)),
    "layernorm_functional": (lambda: TokenNorm(True), (2, 5, 6)),
    "groupnorm1_module": (lambda: ConvGroupNorm1(False), (2, 3, 6, 6)),
    "groupnorm1_functional": (lambda: ConvGroupNorm1(True), (2, 3, 6, 6)),
}


def prune_randomly(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[fx.GraphModule, nn.Module]:
    """Prune 30% of every prunable group at random: the pruned model and the masked one."""
    groups = gp.channel_groups(copy.deepcopy(model), x)
    keep = gp.random_keep(groups, 0.3, seed=seed)
    assert keep, "no prunable group"
    masks = gp.group_masks(model, groups, keep)
    return gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False).eval(), gp.masked_copy(model, masks).eval()


def exact_norms(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Every exact-statistics norm of ``gm``: name -> (kept channels, original channels)."""
    found = {}
    for name, m in gm.named_modules():
        if isinstance(m, gp.ExactStatsNorm):
            assert m.num_channels == m.weight.shape[0], name
            found[name] = (m.num_channels, m.original_channels)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is gp.exact_stats_norm:
            weight = gm.get_parameter(str(node.args[5].target))
            found[f"function {node.args[5].target}"] = (weight.shape[0], node.args[4])
    return found


def check_costed_and_pruned_again(model: nn.Module, x: torch.Tensor) -> None:
    once, masked_once = prune_randomly(model.eval(), x, seed=0)
    assert_same(outputs(once, x), outputs(masked_once, x))
    norms_once = exact_norms(once)
    assert norms_once and all(kept < original for kept, original in norms_once.values()), norms_once

    cm = gp.cost(once, x)
    assert cm.total_flops == pytest.approx(gp.count_flops(once, x), rel=0.02)

    twice, masked_twice = prune_randomly(once, x, seed=1)
    assert_same(outputs(twice, x), outputs(masked_twice, x))
    norms_twice = exact_norms(twice)
    # an exact norm stays one and keeps counting the channels of the very first model: the second
    # pruning only slices its weight and bias
    assert set(norms_once) <= set(norms_twice)
    for name, (kept, original) in norms_once.items():
        assert norms_twice[name][1] == original and norms_twice[name][0] <= kept, name
    assert any(norms_twice[name][0] < kept for name, (kept, _) in norms_once.items())
    assert n_params(twice) < n_params(once)


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_hand_built_norm_is_costed_and_pruned_again(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(shape)
    check_costed_and_pruned_again(model, x)


@pytest.mark.parametrize("name", list(CASES))
def test_hand_built_norm_channels_shrink_twice_from_the_original(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(shape)
    once, _ = prune_randomly(model, x, seed=0)
    twice, _ = prune_randomly(once, x, seed=1)
    [(kept_once, original_once)] = exact_norms(once).values()
    [(kept_twice, original_twice)] = exact_norms(twice).values()
    assert original_once == original_twice == C
    assert kept_twice < kept_once < C


@pytest.mark.parametrize("name,size", [("convnext_atto", 64), ("test_vit", None)])
def test_pruned_timm_model_is_costed_and_pruned_again(name, size):
    import timm  # a hard dependency: a missing timm must fail, not skip
    assert name in timm.list_models(name), f"timm has no {name}"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    shape = (3, size, size) if size else model.pretrained_cfg["input_size"]
    check_costed_and_pruned_again(model, torch.randn(1, *shape))
