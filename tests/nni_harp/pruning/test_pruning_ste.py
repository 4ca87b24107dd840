"""Top-k straight-through masks and the rate parametrisation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nni_harp.pruning._ste import keep_count, keep_from_rate, rate_for_keep, straight_through_mask
from nni_harp.pruning._topk import topk_mask
from nni_harp.pruning._units import ScoreUnit, hydra_scores


def _layer_loss(weight: torch.Tensor, scores: torch.Tensor, rate: torch.Tensor, coeff: torch.Tensor,
                floor: float, ceiling: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    keep = keep_from_rate(rate, floor, ceiling)
    count = keep_count(float(keep.detach()), scores.numel())
    hard = topk_mask(scores.abs(), count)
    mask = straight_through_mask(scores.abs(), keep, hard)
    return (coeff * (weight * mask)).sum(), mask, count


def test_gradients_reach_scores_and_rate_as_derived_by_hand() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    coeff = torch.randn(3, 4)
    scores = torch.randn(3, 4, requires_grad=True)
    rate = torch.tensor(0.3, requires_grad=True)
    floor, ceiling = 0.2, 1.0
    loss, mask, count = _layer_loss(weight, scores, rate, coeff, floor, ceiling)
    loss.backward()

    # forward: exactly the top-count |scores|
    assert int(mask.sum()) == count == round((floor + (ceiling - floor) * torch.sigmoid(torch.tensor(0.3)).item()) * 12)
    threshold = scores.detach().abs().flatten().sort(descending=True).values[count - 1]
    assert torch.equal(mask.detach(), (scores.detach().abs() >= threshold).float())
    # backward: dL/dmask = coeff * weight; scores get it through |.|, the rate gets its sum
    dmask = coeff * weight
    torch.testing.assert_close(scores.grad, torch.sign(scores.detach()) * dmask)
    sig = torch.sigmoid(torch.tensor(0.3))
    torch.testing.assert_close(rate.grad, dmask.sum() * (ceiling - floor) * sig * (1 - sig))


def test_rate_gradient_matches_finite_difference_of_the_keep_parametrisation() -> None:
    # d k / d r by central differences, times the summed mask gradient, is what the rate receives
    torch.manual_seed(1)
    weight, coeff = torch.randn(20), torch.randn(20)
    scores = torch.randn(20, requires_grad=True)
    rate = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    loss, _, _ = _layer_loss(weight, scores, rate.float(), coeff, 0.05, 0.9)
    loss.backward()
    h = 1e-5
    dk_dr = (keep_from_rate(torch.tensor(-0.7 + h, dtype=torch.float64), 0.05, 0.9)
             - keep_from_rate(torch.tensor(-0.7 - h, dtype=torch.float64), 0.05, 0.9)) / (2 * h)
    expected = float((coeff * weight).sum()) * float(dk_dr)
    assert rate.grad is not None
    assert float(rate.grad) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("direction", [+1.0, -1.0])
def test_rate_can_grow_and_shrink(direction: float) -> None:
    # coeff = -direction * weight makes every dL/dmask = -direction * w^2: a descent step moves k by direction
    torch.manual_seed(2)
    weight = torch.randn(50)
    scores = torch.randn(50, requires_grad=True)
    rate = torch.tensor(0.0, requires_grad=True)
    loss, _, _ = _layer_loss(weight, scores, rate, -direction * weight, 0.1, 1.0)
    loss.backward()
    before = float(keep_from_rate(rate.detach(), 0.1, 1.0))
    with torch.no_grad():
        rate -= 0.1 * rate.grad
    after = float(keep_from_rate(rate.detach(), 0.1, 1.0))
    assert (after - before) * direction > 0


@pytest.mark.parametrize("rate", [-1e6, -80.0, -5.0, 0.0, 5.0, 80.0, 1e6])
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_rate_parametrisation_never_empties_a_layer(rate: float, size: int) -> None:
    floor, ceiling = 0.1 * 0.01, 1.0  # alpha=0.1 of a 99 % sparsity target
    keep = keep_from_rate(torch.tensor(rate), floor, ceiling)
    assert math.isfinite(float(keep))
    assert floor <= float(keep) <= ceiling
    count = keep_count(float(keep), size)
    assert 1 <= count <= size
    mask = topk_mask(torch.randn(size), count)
    assert int(mask.sum()) == count >= 1


def test_rate_for_keep_inverts_the_parametrisation() -> None:
    for keep in (0.01, 0.1, 0.5, 0.93):
        r = rate_for_keep(keep, 0.001, 1.0)
        assert float(keep_from_rate(torch.tensor(r, dtype=torch.float64), 0.001, 1.0)) == pytest.approx(keep, rel=1e-9)
    # at a bound the rate stays finite (clipped just inside the open interval)
    assert math.isfinite(rate_for_keep(1.0, 0.1, 1.0)) and math.isfinite(rate_for_keep(0.1, 0.1, 1.0))


def test_score_unit_on_an_owner_module_starts_at_its_target_and_floors_extreme_rates() -> None:
    owner = nn.Linear(10, 8)
    scores = hydra_scores(owner.weight, fan_in=10)
    # HYDRA init: sqrt(6 / fan_in) * w / max|w|
    torch.testing.assert_close(scores.abs().max(), torch.tensor((6 / 10) ** 0.5))
    unit = ScoreUnit("fc", owner, "weight_harp", scores, floor=0.01, ceiling=1.0, init_keep=0.1, learn_rate=True)
    assert unit.keep_value() == pytest.approx(0.1, rel=1e-5)
    assert unit.count() == 8  # round(0.1 * 80)
    names = {n for n, _ in owner.named_parameters()}
    assert {"weight_harp_score", "weight_harp_rate"} <= names
    with torch.no_grad():
        unit.rate.fill_(-1e4)
    unit.refresh()
    assert unit.count() == 1 == unit.min_count  # floor 0.01 of 80 rounds to 1: never zero
    unit.detach()
    assert not any("harp" in n for n, _ in owner.named_parameters())


def test_a_channel_group_keeps_a_count_on_the_round_to_grid_while_it_learns() -> None:
    """The hard mask of a unit counted in blocks (``round_to``) keeps the grid count nearest to
    ``keep * size`` at every refresh, as the final masks will (budget.round_to_counts), so the
    structure HARP learns on is the one it keeps; a unit too narrow for the grid (graph_passes.grid_step)
    is counted channel by channel."""
    wide = ScoreUnit("wide", nn.Linear(4, 48), "group", torch.rand(48), floor=0.01, ceiling=1.0, init_keep=0.3,
                     learn_rate=True, round_to=8)
    assert (wide.multiple, wide.count()) == (8, 16)  # 0.3 * 48 = 14.4: 16 on the grid, 14 without it
    for keep, count in ((0.24, 8), (0.26, 16), (0.99, 48), (0.001, 8)):  # 8: the lowest multiple above the floor
        wide.set_keep(keep)
        wide.refresh()
        assert wide.count() == count == wide.target_count(), keep
    narrow = ScoreUnit("narrow", nn.Linear(4, 16), "group", torch.rand(16), floor=0.01, ceiling=1.0, init_keep=0.3,
                       learn_rate=True, round_to=8)
    assert (narrow.multiple, narrow.count()) == (1, 5)
