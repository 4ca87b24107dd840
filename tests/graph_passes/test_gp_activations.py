"""CostModel.activations: the elements of the tensors a model's ops produce, as a function of
the kept channel fractions (a memory-traffic proxy), against counts on the pruned models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graph_passes as gp
from _gp_helpers import prune
from test_gp_cost import fractions
from test_gp_layers import ConvBn


class ViewHead(nn.Module):
    """conv -> relu -> flatten -> view -> linear: the flatten and view move no data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x)).flatten(1)
        return self.fc(y.view(y.shape[0], -1))


def test_activations_count_every_produced_tensor_by_hand():
    model = ConvBn().eval()
    x = torch.randn(2, 3, 8, 8)
    cm = gp.cost(model, x)
    # conv, bn and relu each produce a [2, 8, 8, 8] tensor; the head conv a [2, 4, 8, 8] one.
    assert cm.total_activations == 3 * 2 * 8 * 8 * 8 + 2 * 4 * 8 * 8
    # Keeping half of the 8 hidden channels halves the first three tensors, not the head's.
    (hidden,) = [g for g in gp.channel_groups(model, x) if g.prunable]
    assert float(cm.activations({hidden.id: 0.5})) == 3 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8


def test_views_are_not_counted_as_activations():
    model = ViewHead().eval()
    x = torch.randn(1, 3, 4, 4)
    cm = gp.cost(model, x)
    assert cm.total_activations == 6 * 4 * 4 * 2 + 5  # conv and relu outputs, the logits


class PermuteCopy(nn.Module):
    """conv -> permute (a view) -> contiguous (a copy) -> linear over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1).contiguous())


def test_a_copy_counts_and_a_view_does_not():
    model = PermuteCopy().eval()
    x = torch.randn(1, 3, 4, 4)
    cm = gp.cost(model, x)
    assert cm.total_activations == 6 * 16 + 6 * 16 + 2 * 16  # conv, contiguous copy, linear
    (hidden,) = [g for g in gp.channel_groups(model, x) if g.prunable]
    assert float(cm.activations({hidden.id: 0.5})) == 3 * 16 + 3 * 16 + 2 * 16


def test_predicted_activations_through_exact_statistics_norms():
    # convnext_atto's LayerNorms become ExactStatsNorm modules when pruned; the hand-built and
    # timm test_* cases (no such norms in most) are checked in test_gp_cost.py
    import timm  # a hard dependency: a missing timm must fail, not skip
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    cm = gp.cost(model, x)
    r = prune(model, x)
    assert any(isinstance(m, gp.ExactStatsNorm) for m in r.pruned.modules())
    frac = fractions(r.groups, r.keep)
    assert float(cm.activations(frac)) == pytest.approx(gp.cost(r.pruned, x).total_activations, rel=1e-9)


def test_activations_are_differentiable_in_the_fractions():
    model = ConvBn().eval()
    x = torch.randn(1, 3, 8, 8)
    cm = gp.cost(model, x)
    frac = {g.id: torch.tensor(0.5, requires_grad=True) for g in gp.channel_groups(model, x) if g.prunable}
    cm.activations(frac).backward()
    assert all(f.grad is not None and f.grad > 0 for f in frac.values())
