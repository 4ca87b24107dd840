"""timm's no-trace modules without a channel rule are traced through (NormFreeBlock), and stay
leaves where they cannot be; weight-standardised convs lose input channels exactly."""
from __future__ import annotations

import timm
import torch
from timm.layers import ScaledStdConv2d, StdConv2d, register_notrace_module
from timm.models.nfnet import NormFreeBlock
from torch import nn

import graph_passes as gp
from _gp_helpers import assert_same, group_of, outputs


def test_norm_free_blocks_are_traced_through_and_prune_in_place():
    torch.manual_seed(0)
    model, x = timm.create_model("test_nfnet").eval(), torch.randn(2, 3, 64, 64)
    assert any(isinstance(m, NormFreeBlock) for m in model.modules())
    gm = gp.trace(model, x)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), NormFreeBlock) for n in gm.graph.nodes)
    groups = gp.channel_groups(gm, x)
    assert sum(g.prunable for g in groups) >= len(groups) - 1  # all but the logits
    masks = gp.group_masks(model, groups, gp.random_keep(groups, 0.3, 0))
    expected = outputs(gp.masked_copy(model, masks), x)
    gp.ModelSpeedup(model, x, masks).speedup_model()
    assert_same(outputs(model, x), expected)
    assert gp.count_flops(model, x) < 0.7 * gp.count_flops(timm.create_model("test_nfnet").eval(), x)


@register_notrace_module
class ValueBranch(nn.Module):
    """A no-trace module whose branch depends on the input's values: it can be traced neither
    symbolically nor concretely, so it stays a leaf (its channels kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x) if bool(x.sum() > 0) else x


def test_a_no_trace_module_that_cannot_be_traced_through_stays_a_leaf():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ValueBranch(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    gm = gp.trace(model, x)
    assert any(n.op == "call_module" and n.target == "1" for n in gm.graph.nodes)
    group = group_of(gp.channel_groups(gm, x), "0")
    assert not group.prunable and "no channel rule for module 1 (ValueBranch)" in group.reason


class Standardised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = StdConv2d(3, 8, 3)
        self.b = ScaledStdConv2d(8, 6, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_weight_standardised_convs_become_plain_convs_when_their_inputs_go():
    torch.manual_seed(0)
    model, x = Standardised().eval(), torch.randn(2, 3, 8, 8)
    groups = gp.channel_groups(model, x)
    between, out = group_of(groups, "a"), group_of(groups, "b")
    assert between.prunable and out.prunable
    masks = gp.group_masks(model, groups, {between.id: torch.arange(8) % 2 == 0, out.id: torch.arange(6) < 4})
    expected = outputs(gp.masked_copy(model, masks), x)
    gp.ModelSpeedup(model, x, masks).speedup_model()
    assert type(model.a) is StdConv2d and model.a.out_channels == 4  # outputs only: still standardised
    assert type(model.b) is nn.Conv2d and (model.b.in_channels, model.b.out_channels) == (4, 4)
    assert_same(outputs(model, x), expected)
