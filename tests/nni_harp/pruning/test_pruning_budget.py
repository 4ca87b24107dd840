"""Budgets (params / FLOPs kept as functions of the rates), the hinge, and the final projection."""
from __future__ import annotations

import pytest
import torch

from graph_passes.cost_model import CostModel, Factor, LayerCost
from nni_harp.pruning import CostBudget, WeightedBudget, hinge, project_keep, round_to_counts
from nni_harp.pruning.budget import uniform_keep


def test_weighted_budget_and_hinge_gradient() -> None:
    budget = WeightedBudget({0: 100.0, 1: 300.0}, target=0.2)
    k = {0: torch.tensor(0.5, requires_grad=True), 1: torch.tensor(0.1, requires_grad=True)}
    kept = budget.kept(k)
    assert float(kept.detach()) == pytest.approx((50 + 30) / 400)
    loss = hinge(kept, budget.target)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)  # exactly at the target: no penalty
    assert hinge(0.3, 0.2) == pytest.approx(0.5) and hinge(0.1, 0.2) == 0.0
    # above the target the hinge pulls each rate with weight w_u / W / target; below it is flat
    k_hi = {0: torch.tensor(0.9, requires_grad=True), 1: torch.tensor(0.5, requires_grad=True)}
    hinge(budget.kept(k_hi), budget.target).backward()
    assert float(k_hi[0].grad) == pytest.approx(100 / 400 / 0.2)
    assert float(k_hi[1].grad) == pytest.approx(300 / 400 / 0.2)
    k_lo = {0: torch.tensor(0.1, requires_grad=True), 1: torch.tensor(0.1, requires_grad=True)}
    hinge(budget.kept(k_lo), budget.target).backward()
    assert float(k_lo[0].grad) == 0.0 and float(k_lo[1].grad) == 0.0


def test_projection_preserves_ratios_and_meets_the_target() -> None:
    budget = WeightedBudget({0: 100.0, 1: 300.0, 2: 600.0}, target=0.1)
    keep = {0: 0.4, 1: 0.2, 2: 0.1}  # kept = 0.16 > 0.1
    floors = {u: 0.001 for u in keep}
    ceilings = {u: 1.0 for u in keep}
    out = project_keep(budget, keep, floors, ceilings)
    assert budget.kept(out) == pytest.approx(0.1, abs=1e-9)
    assert out[0] / out[2] == pytest.approx(4.0) and out[1] / out[2] == pytest.approx(2.0)
    # below the target it scales up, still keeping the ratios
    up = project_keep(budget, {0: 0.04, 1: 0.02, 2: 0.01}, floors, ceilings)
    assert budget.kept(up) == pytest.approx(0.1, abs=1e-9) and up[0] / up[1] == pytest.approx(2.0)


def test_projection_respects_floors_and_ceilings() -> None:
    budget = WeightedBudget({0: 100.0, 1: 100.0}, target=0.3)
    out = project_keep(budget, {0: 0.9, 1: 0.01}, floors={0: 0.0, 1: 0.2}, ceilings={0: 0.35, 1: 1.0})
    assert out[1] >= 0.2 and out[0] <= 0.35
    assert budget.kept(out) == pytest.approx(0.3, abs=1e-9)


def test_round_to_counts_lands_within_one_entry_of_the_target() -> None:
    sizes = {0: 27, 1: 288, 2: 1152, 3: 10}
    budget = WeightedBudget({u: float(n) for u, n in sizes.items()}, target=0.0731)
    keep = project_keep(budget, {0: 0.5, 1: 0.1, 2: 0.05, 3: 0.9}, {u: 0.01 for u in sizes}, {u: 1.0 for u in sizes})
    counts = round_to_counts(budget, keep, sizes, {u: 1 for u in sizes}, dict(sizes))
    kept = sum(counts.values()) / sum(sizes.values())
    assert abs(kept - 0.0731) <= 0.5 / sum(sizes.values()) + 1e-12
    assert all(abs(counts[u] - keep[u] * sizes[u]) <= 1.5 for u in sizes)


def _conv_chain_cost() -> CostModel:
    # conv_a: 3 -> group 0 (4 ch); conv_b: group 0 -> group 1 (6 ch); fc: group 1 -> 3 outputs
    return CostModel(
        layers=(
            LayerCost("conv_a", "conv", 1000, 108, (Factor(3, ()), Factor(4, ((0, 4),))), (Factor(4, ((0, 4),)),)),
            LayerCost("conv_b", "conv", 4000, 216, (Factor(4, ((0, 4),)), Factor(6, ((1, 6),))),
                      (Factor(4, ((0, 4),)), Factor(6, ((1, 6),)))),
            LayerCost("fc", "linear", 36, 18, (Factor(6, ((1, 6),)), Factor(3, ())), (Factor(6, ((1, 6),)),)),
        ),
    )


def test_cost_budget_is_differentiable_through_both_groups_of_a_layer() -> None:
    budget = CostBudget(_conv_chain_cost(), {10: 0, 11: 1}, target=0.5)
    k0 = torch.tensor(0.5, requires_grad=True)
    k1 = torch.tensor(0.25, requires_grad=True)
    kept = budget.kept({10: k0, 11: k1})
    assert float(kept.detach()) == pytest.approx((1000 * 0.5 + 4000 * 0.5 * 0.25 + 36 * 0.25) / 5036)
    kept.backward()
    # d/dk0 = (1000 + 4000 * k1) / total, d/dk1 = (4000 * k0 + 36) / total: FLOPs scale with k_in * k_out
    assert float(k0.grad) == pytest.approx((1000 + 4000 * 0.25) / 5036)
    assert float(k1.grad) == pytest.approx((4000 * 0.5 + 36) / 5036)
    params = CostBudget(_conv_chain_cost(), {10: 0, 11: 1}, target=0.5, metric="params")
    assert float(params.kept({10: 1.0, 11: 1.0})) == pytest.approx(1.0)


def test_uniform_keep_is_the_one_fraction_that_meets_the_flops_target() -> None:
    # kept FLOPs with k in both groups: (1000 k + 4000 k^2 + 36 k) / 5036 = 0.5
    k = uniform_keep(_conv_chain_cost(), [0, 1], 0.5)
    assert (1036 * k + 4000 * k * k) / 5036 == pytest.approx(0.5, abs=1e-9)
    assert k == pytest.approx((-1036 + (1036**2 + 4 * 4000 * 2518) ** 0.5) / 8000, abs=1e-9)  # the quadratic's root


def test_round_to_counts_keeps_multiples_where_asked_and_still_meets_the_target() -> None:
    sizes = {0: 64, 1: 128, 2: 256, 3: 10}
    budget = WeightedBudget({u: float(n) for u, n in sizes.items()}, target=0.37)
    keep = project_keep(budget, {0: 0.6, 1: 0.4, 2: 0.3, 3: 0.9}, {u: 0.01 for u in sizes}, {u: 1.0 for u in sizes})
    multiples = {0: 8, 1: 8, 2: 8, 3: 8}  # unit 3 (10 entries) has only 8 and 10 on its grid
    counts = round_to_counts(budget, keep, sizes, {u: 1 for u in sizes}, dict(sizes), multiples)
    assert all(counts[u] % 8 == 0 for u in (0, 1, 2))
    assert counts[3] in (8, 10)
    kept = sum(counts.values()) / sum(sizes.values())
    assert abs(kept - 0.37) <= 4 / sum(sizes.values())  # within half the coarsest step (8 entries)
    assert all(abs(counts[u] - keep[u] * sizes[u]) <= 12 for u in sizes)


def test_round_to_counts_counts_one_by_one_when_the_bounds_hold_no_multiple() -> None:
    sizes = {0: 7, 1: 100}
    budget = WeightedBudget({u: float(n) for u, n in sizes.items()}, target=0.5)
    keep = {0: 0.5, 1: 0.5}
    counts = round_to_counts(budget, keep, sizes, {0: 1, 1: 1}, dict(sizes), {0: 8, 1: 1})
    assert 1 <= counts[0] <= 7 and abs(sum(counts.values()) - 53.5) <= 0.5
