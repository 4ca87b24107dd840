"""Structured HARP (granularity='out_channel'): channel groups, coupled masks, FLOPs budget.

Most tests use channel groups and a cost model built by hand for a two-branch conv net, so they do
not depend on graph_passes' analysis; the last one runs the real passes on timm's test_resnet.
"""
from __future__ import annotations

import copy
from typing import Any

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn

from graph_passes.cost_model import CostModel, Factor, LayerCost
from graph_passes.groups import ChannelGroup, Member, group_masks, keep_from_masks
from nni_harp.pruning import ConfigListError, HARPPruner, HydraPruner, StructureError, apply_masks

from _pruning_helpers import Digits, make_evaluator


class TwoBranch(nn.Module):
    """conv1 -> bn1 -> relu -> (conv2a + conv2b) -> relu -> mean -> fc; conv2a/conv2b outputs are
    coupled by the add, so they form one channel group with fc's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2a = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.conv2b = nn.Conv2d(16, 24, 1, bias=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2a(x) + self.conv2b(x))
        return self.fc(x.mean((2, 3)))


def _ids(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def hand_groups(fc_group_prunable: bool = True) -> list[ChannelGroup]:
    a, b, c = _ids(16), _ids(24), _ids(10)
    return [
        ChannelGroup(0, 16, (
            Member("conv1", "weight", 0, a, a, "out"), Member("conv1", "bias", 0, a, a, "out"),
            Member("bn1", "weight", 0, a, a, "norm"), Member("bn1", "bias", 0, a, a, "norm"),
            Member("bn1", "running_mean", 0, a, a, "norm"),
            Member("conv2a", "weight", 1, a, a, "in"), Member("conv2b", "weight", 1, a, a, "in"),
        )),
        ChannelGroup(1, 24, (
            Member("conv2a", "weight", 0, b, b, "out"), Member("conv2b", "weight", 0, b, b, "out"),
            Member("conv2b", "bias", 0, b, b, "out"), Member("fc", "weight", 1, b, b, "in"),
        ), prunable=fc_group_prunable, reason=None if fc_group_prunable else "test"),
        ChannelGroup(2, 10, (Member("fc", "weight", 0, c, c, "out"), Member("fc", "bias", 0, c, c, "out")),
                     prunable=False, reason="model output"),
    ]


def hand_cost() -> CostModel:
    hw = 16 * 16  # FLOPs per sample of a 16 x 16 input, 2 per multiply-accumulate
    g0, g1 = Factor(16, ((0, 16),)), Factor(24, ((1, 24),))
    return CostModel((
        LayerCost("conv1", "conv", 2 * hw * 16 * 3 * 9, 448, (Factor(3, ()), g0), (g0,)),
        LayerCost("conv2a", "conv", 2 * hw * 24 * 16 * 9, 3456, (g0, g1), (g0, g1)),
        LayerCost("conv2b", "conv", 2 * hw * 24 * 16, 408, (g0, g1), (g0, g1)),
        LayerCost("fc", "linear", 2 * 24 * 10, 250, (g1, Factor(10, ())), (g1,)),
    ))


class HandBuiltHARP(HARPPruner):
    groups: list[ChannelGroup] = hand_groups()

    def _channel_structure(self, model: nn.Module, example_inputs: Any) -> tuple[list[ChannelGroup], CostModel]:
        return list(self.groups), hand_cost()


class HandBuiltHydra(HydraPruner):
    def _channel_structure(self, model: nn.Module, example_inputs: Any) -> tuple[list[ChannelGroup], CostModel]:
        return hand_groups(), hand_cost()


STRUCTURED = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}]


def _flops_kept(cost: CostModel, groups: list[ChannelGroup], masks: dict) -> float:
    keep = keep_from_masks(groups, masks)
    return float(cost.flops({g.id: keep[g.id].float().mean().item() for g in groups if g.prunable}) / cost.total_flops)


def assert_coupled_masks_agree(model: nn.Module, groups: list[ChannelGroup], masks: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every member of every group keeps exactly the same channels, and the masks are exactly the
    ones graph_passes.group_masks builds from those channels (``model``: an unwrapped copy)."""
    for group in groups:
        alive = []
        for m in group.members:
            mask = masks.get(m.module, {}).get(m.param)
            if mask is None:
                continue
            rows = mask.index_select(m.dim, torch.tensor(m.index)).movedim(m.dim, 0).reshape(len(m.index), -1)
            channel_alive = torch.zeros(group.size, dtype=torch.bool)
            channel_alive[torch.tensor(m.channel)[(rows != 0).any(1)]] = True
            alive.append((m.qualified_name, channel_alive))
        for name, vector in alive[1:]:
            assert torch.equal(vector, alive[0][1]), f"group {group.id}: {name} disagrees with {alive[0][0]}"
    rebuilt = group_masks(model, groups, keep_from_masks(groups, masks))
    assert rebuilt
    for module, targets in rebuilt.items():
        for param, mask in targets.items():
            torch.testing.assert_close(masks[module][param], mask)


def test_structured_compress_keeps_coupled_channels_together_and_meets_flops(digits: Digits) -> None:
    torch.manual_seed(0)
    model = TwoBranch()
    pruner = HandBuiltHARP(model, STRUCTURED, make_evaluator(model, digits), gamma_0=0.5)
    pruned, masks = pruner.compress(max_epochs=2)

    # every member of a controlled group is masked, including the BatchNorm and the Linear's input
    assert {"conv1", "bn1", "conv2a", "conv2b", "fc"} <= set(masks)
    assert_coupled_masks_agree(TwoBranch(), hand_groups(), masks)
    assert torch.all(masks["fc"]["bias"] == 1)  # fc's outputs are the unprunable model output
    assert (masks["conv2a"]["weight"] == 0).any() and (masks["conv1"]["weight"] == 0).any()
    # FLOPs kept (recomputed from the masks with the cost model) is within 1 pp of 50 %
    kept = _flops_kept(hand_cost(), hand_groups(), masks)
    assert abs(kept - 0.5) <= 0.01
    assert kept == pytest.approx(pruner.kept_fraction())
    assert pruner.budget_kind == "flops"
    rates = pruner.layer_rates()
    assert set(rates) == {"conv1", "conv2a"}  # groups named by their first producing module
    keep = keep_from_masks(hand_groups(), masks)
    assert rates["conv1"] == pytest.approx(keep[0].float().mean().item())
    assert all(rate >= 0.1 * 0.5 - 1e-9 for rate in rates.values())
    # the wrapped model computes exactly what its unwrapped self with the masks baked in computes
    pruner.unwrap_model()
    masked = apply_masks(copy.deepcopy(pruned), masks)
    pruner.wrap_model()
    pruned.eval(), masked.eval()
    torch.testing.assert_close(pruned(digits.x_test[:8]), masked(digits.x_test[:8]))


def _hand_forward(d: TwoBranch, x: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, everywhere: bool) -> torch.Tensor:
    """TwoBranch written by hand with explicit channel-mask variables ``v0`` (conv1's group) and
    ``v1`` (the add's group): on the consumers' inputs only, or (``everywhere``) on every member."""
    p0 = v0 if everywhere else torch.ones_like(v0)
    p1 = v1 if everywhere else torch.ones_like(v1)
    h = F.conv2d(x, d.conv1.weight * p0[:, None, None, None], d.conv1.bias * p0, padding=1)
    h = F.relu(F.batch_norm(h, d.bn1.running_mean, d.bn1.running_var, d.bn1.weight * p0, d.bn1.bias * p0, False))
    w2a = d.conv2a.weight * p1[:, None, None, None] * v0[None, :, None, None]
    w2b = d.conv2b.weight * p1[:, None, None, None] * v0[None, :, None, None]
    h = F.relu(F.conv2d(h, w2a, None, padding=1) + F.conv2d(h, w2b, d.conv2b.bias * p1))
    return F.linear(h.mean((2, 3)), d.fc.weight * v1[None, :], d.fc.bias)


def test_while_learning_consumers_are_masked_so_pruned_channels_keep_their_gradient() -> None:
    torch.manual_seed(1)
    model = TwoBranch().eval()
    dense = copy.deepcopy(model)
    evaluator = TorchEvaluator(lambda *a, **k: None, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.1), lambda b, m: 0)
    HandBuiltHARP(model, STRUCTURED, evaluator, dummy_input=torch.zeros(1, 3, 16, 16))  # wraps the model: scores and rates live in its wrappers
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    score0, rate0 = params["conv1._nni_wrapper.harp_group0_score"], params["conv1._nni_wrapper.harp_group0_rate"]
    score1, rate1 = params["conv2a._nni_wrapper.harp_group1_score"], params["conv2a._nni_wrapper.harp_group1_rate"]
    hard0, hard1 = buffers["conv1._nni_wrapper.harp_group0_keep"], buffers["conv2a._nni_wrapper.harp_group1_keep"]
    assert 0 < hard0.sum() < 16 and 0 < hard1.sum() < 24  # started above the target, but below full width

    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    out.square().mean().backward()

    # oracle: while learning, a group's mask multiplies its consumers' inputs only
    v0 = hard0.clone().requires_grad_(True)
    v1 = hard1.clone().requires_grad_(True)
    expected = _hand_forward(dense, x, v0, v1, everywhere=False)
    torch.testing.assert_close(out, expected)
    expected.square().mean().backward()
    for score, rate, v, hard in ((score0, rate0, v0, hard0), (score1, rate1, v1, hard1)):
        sig = torch.sigmoid(rate.detach())
        dk_dr = (1.0 - 0.05) * sig * (1 - sig)
        torch.testing.assert_close(score.grad, torch.sign(score.detach()) * v.grad)
        torch.testing.assert_close(rate.grad, v.grad.sum() * dk_dr)
        # a pruned channel still gets a gradient: it can come back, and its rate hears of it
        assert bool((score.grad[hard == 0] != 0).all())
    # masked on every member (the final masks), a pruned channel is zero everywhere and deaf
    w0 = hard0.clone().requires_grad_(True)
    w1 = hard1.clone().requires_grad_(True)
    _hand_forward(dense, x, w0, w1, everywhere=True).square().mean().backward()
    assert bool((w0.grad[hard0 == 0] == 0).all()) and bool((w1.grad[hard1 == 0] == 0).all())
    # the model's own weights are not HARP's business: no scores on them, and they stay parameters
    assert params["conv2a._nni_wrapper.weight"].shape == (24, 16, 3, 3)


def test_group_control_rules_and_structured_errors(digits: Digits) -> None:
    def build(config: list[dict], cls: type[HARPPruner] = HandBuiltHARP) -> HARPPruner:
        model = TwoBranch()
        return cls(model, config, make_evaluator(model, digits))

    # only fc selected: the group it consumes is controlled (fc is one of its members), conv1's is not
    only_fc = build([{"op_names": ["fc"], "sparse_ratio": 0.5, "granularity": "out_channel"}])
    assert set(only_fc.layer_rates()) == {"conv2a"}
    # fc excluded: the group containing fc is not controlled even though conv2a/conv2b are selected
    no_fc = build([{"op_types": ["Conv2d"], "exclude_op_names": ["fc"], "sparse_ratio": 0.5, "granularity": "out_channel"}])
    assert set(no_fc.layer_rates()) == {"conv1"}
    # HYDRA: rates fixed and uniform, chosen to meet the FLOPs budget
    hydra = build(STRUCTURED, HandBuiltHydra)
    rates = list(hydra.layer_rates().values())
    assert max(rates) - min(rates) <= 1 / 16 + 1e-9
    assert abs(hydra.kept_fraction() - 0.5) <= 0.06  # before compress: uniform counts, not yet projected

    with pytest.raises(StructureError, match="unreachable"):
        build([{"op_names": ["fc"], "sparse_ratio": 0.95, "granularity": "out_channel"}])
    with pytest.raises(ConfigListError, match="same sparse_ratio"):
        build([{"op_names": ["conv1"], "sparse_ratio": 0.5, "granularity": "out_channel"},
               {"op_names": ["fc"], "sparse_ratio": 0.6, "granularity": "out_channel"}])

    class NoPrunable(HandBuiltHARP):
        groups = hand_groups(fc_group_prunable=False)

    with pytest.raises(ConfigListError, match="selects no prunable channel group"):
        build([{"op_names": ["fc"], "sparse_ratio": 0.5, "granularity": "out_channel"}], NoPrunable)


def _graph_passes_ready() -> bool:
    try:
        from graph_passes import channel_groups, cost  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _graph_passes_ready(), reason="graph_passes.channel_groups / cost not available yet")
def _random_batches_evaluator(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> TorchEvaluator:
    """A TorchEvaluator whose epoch is one pass over (x, y) in batches of 32, cross-entropy loss."""

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for i in range(0, len(x), 32):
            optimizers.zero_grad()
            training_step((x[i:i + 32], y[i:i + 32]), model).backward()
            optimizers.step()

    return TorchEvaluator(
        training_func, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01),
        lambda batch, m: F.cross_entropy(m(batch[0]), batch[1]), dummy_input=x[:2],
    )


def test_timm_test_resnet_structured_half_flops() -> None:
    import graph_passes
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    reference = copy.deepcopy(model)
    x = torch.rand(96, 3, 32, 32)
    y = torch.randint(0, 10, (96,))
    evaluator = _random_batches_evaluator(model, x, y)
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
    pruner = HARPPruner(model, config, evaluator, gamma_0=0.5)
    pruned, masks = pruner.compress(max_epochs=2)

    groups = graph_passes.channel_groups(reference, x[:2])
    cost = graph_passes.cost(reference, x[:2])
    kept = _flops_kept(cost, groups, masks)
    assert abs(kept - 0.5) <= 0.01
    assert kept == pytest.approx(pruner.kept_fraction())
    assert_coupled_masks_agree(reference, groups, masks)
    # the residual group couples the stem's last conv with layer1's second conv
    assert "conv1.6" in pruner.layer_rates() and len(pruner.layer_rates()) == sum(g.prunable for g in groups)
    pruner.unwrap_model()
    masked = apply_masks(copy.deepcopy(pruned), masks)
    pruner.wrap_model()
    pruned.eval(), masked.eval()
    torch.testing.assert_close(pruned(x[:4]), masked(x[:4]))


def test_structured_counts_are_multiples_of_round_to_in_wide_groups() -> None:
    """resnet-like widths (32 and 64 channels): with round_to=8 every group of >= 32 channels keeps a
    multiple of 8, and the FLOPs target is still met; round_to=1 gives counts off the grid."""
    import graph_passes
    import timm

    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    counts = {}
    for round_to in (8, 1):
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", num_classes=10)
        reference = copy.deepcopy(model)
        evaluator = _random_batches_evaluator(model, x, y)
        config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.6, "granularity": "out_channel"}]
        pruner = HARPPruner(model, config, evaluator, gamma_0=0.5, round_to=round_to)
        _, masks = pruner.compress(max_epochs=1)
        groups = graph_passes.channel_groups(reference, x[:2])
        keep = keep_from_masks(groups, masks)
        wide = [g for g in groups if g.prunable and g.size >= 32]
        assert wide
        counts[round_to] = [int(keep[g.id].sum()) for g in wide]
        assert abs(_flops_kept(graph_passes.cost(reference, x[:2]), groups, masks) - 0.4) <= 0.01
    assert all(c % 8 == 0 for c in counts[8]), counts[8]
    assert any(c % 8 for c in counts[1]), counts[1]
