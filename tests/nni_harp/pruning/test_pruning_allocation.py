"""Where HARP's rates start: the allocations of ``HARPSettings.init_allocation`` at ``start_keep``."""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nni_harp.pruning import HARPPruner, HARPSettings, HydraPruner, SettingsError, WeightedBudget
from nni_harp.pruning._allocation import UnitStats, allocate, lamp_scores

from _pruning_helpers import Digits, make_evaluator

CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "global_group_id": 0}]


def _layers() -> tuple[WeightedBudget, dict[int, UnitStats]]:
    """Three layers of very different size and magnitude scale."""
    gen = torch.Generator().manual_seed(0)
    shapes = {0: (8, 3, 3, 3), 1: (64, 32, 3, 3), 2: (10, 64)}
    scales = {0: 1.0, 1: 0.05, 2: 0.3}
    stats = {u: UnitStats(torch.randn(shape, generator=gen).abs() * scales[u], shape) for u, shape in shapes.items()}
    budget = WeightedBudget({u: float(math.prod(s)) for u, s in shapes.items()}, target=0.1)
    return budget, stats


@pytest.mark.parametrize("kind", ["uniform", "magnitude", "lamp", "erk"])
def test_allocations_start_at_the_requested_fraction_within_floors_and_ceilings(kind: str) -> None:
    budget, stats = _layers()
    floors = {u: 0.01 for u in stats}
    ceilings = {u: 1.0 for u in stats}
    keep = allocate(kind, budget, 0.3, stats, floors, ceilings)
    total = sum(budget.weights.values())
    assert sum(budget.weights[u] * k for u, k in keep.items()) / total == pytest.approx(0.3, abs=2e-3)
    assert all(floors[u] <= k <= ceilings[u] for u, k in keep.items())
    if kind == "uniform":
        assert max(keep.values()) - min(keep.values()) < 1e-6
    else:
        assert max(keep.values()) - min(keep.values()) > 0.05  # every other allocation is non-uniform


def test_magnitude_is_one_global_threshold_and_lamp_rescales_each_layer() -> None:
    budget, stats = _layers()
    floors = {u: 0.0 for u in stats}
    ceilings = {u: 1.0 for u in stats}
    magnitude = allocate("magnitude", budget, 0.3, stats, floors, ceilings)
    # layer 1 has the smallest weights (scale 0.05): one global |w| threshold prunes it hardest
    assert magnitude[1] == min(magnitude.values())
    # the kept entries are exactly those above one threshold
    threshold = min(float(s.magnitudes.flatten().sort(descending=True).values[round(magnitude[u] * s.magnitudes.numel()) - 1])
                    for u, s in stats.items() if magnitude[u] > 0)
    for u, s in stats.items():
        assert int((s.magnitudes >= threshold).sum()) == pytest.approx(magnitude[u] * s.magnitudes.numel(), abs=1)
    # LAMP scores cancel each layer's scale: the largest entry of every layer scores 1
    lamp = allocate("lamp", budget, 0.3, stats, floors, ceilings)
    assert lamp[1] > magnitude[1]
    for s in stats.values():
        scores = lamp_scores(s.magnitudes)
        assert float(scores.max()) == pytest.approx(1.0)
        assert scores.shape == s.magnitudes.shape


def test_lamp_scores_follow_their_definition() -> None:
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    # sorted squares 0.25, 1, 4, 9: each over the sum of itself and the larger ones
    expected = torch.tensor([9 / 9, 1 / 14, 4 / 13, 0.25 / 14.25])
    torch.testing.assert_close(lamp_scores(w.abs()), expected.to(torch.float64))


def test_dense_starts_at_the_ceilings_and_erk_needs_a_weight_shape() -> None:
    budget, stats = _layers()
    assert allocate("dense", budget, 0.3, stats, {u: 0.0 for u in stats}, {u: 0.9 for u in stats}) == {0: 0.9, 1: 0.9, 2: 0.9}
    channels = {u: UnitStats(s.magnitudes.flatten()[:16]) for u, s in stats.items()}
    with pytest.raises(SettingsError, match="init_allocation.*structured"):
        allocate("erk", budget, 0.3, channels, {u: 0.0 for u in stats}, {u: 1.0 for u in stats})


def test_start_keep_is_the_geometric_middle_unless_given() -> None:
    assert HARPSettings().start_keep(0.01) == pytest.approx(0.1)  # the authors' 10 % start for 99 %
    assert HARPSettings().start_keep(0.25) == pytest.approx(0.5)
    assert HARPSettings(init_keep=0.4).start_keep(0.25) == pytest.approx(0.4)
    assert HARPSettings(learn_rates=False).start_keep(0.25) == pytest.approx(0.25)  # HYDRA: fixed at the target
    with pytest.raises(SettingsError, match="init_keep"):
        HARPSettings(init_keep=0.1).start_keep(0.25)
    with pytest.raises(SettingsError, match="init_allocation"):
        HARPSettings(init_allocation="random")


@pytest.mark.parametrize("kind", ["uniform", "magnitude", "lamp", "erk", "dense"])
def test_pruner_rates_start_above_the_target(kind: str, pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    model = pretrained()
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), init_allocation=kind)
    start = pruner.kept_fraction()
    expected = 1.0 if kind == "dense" else math.sqrt(0.1)
    assert start == pytest.approx(expected, abs=0.02)
    rates = pruner.layer_rates()
    assert all(r >= 0.01 - 1e-9 for r in rates.values())
    hydra = HydraPruner(pretrained(), CONFIG, make_evaluator(model, digits), init_allocation=kind)
    assert hydra.kept_fraction() == pytest.approx(0.1, abs=1e-3)  # HYDRA ignores the allocation
