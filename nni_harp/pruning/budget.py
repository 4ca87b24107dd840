"""The resource HARP's hardware loss counts, as a function of the units' kept fractions.

Units are indexed by ``int``. A budget maps ``{unit: k}`` (floats or differentiable 0-dim tensors)
to the kept fraction of its resource:

- :class:`WeightedBudget`: ``sum(w_u * k_u) / sum(w_u)`` -- unstructured pruning, where ``w_u`` is a
  layer's parameter count (``'params'``) or dense FLOPs (``'flops'``);
- :class:`CostBudget`: ``CostModel.flops(keep) / total_flops`` (or params, or the latency a
  :class:`graph_passes.LatencyModel` predicts) -- structured pruning, where a layer's cost scales
  with the kept fractions of its input *and* output channel groups.

:func:`project_keep` rescales kept fractions onto the budget preserving their ratios, and
:func:`round_to_counts` turns them into whole entry counts as close to the target as the units'
granularity allows; together they make the final kept fraction meet the target by construction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Mapping, Protocol, Sequence, Union

import torch
from torch import Tensor

from graph_passes.cost_model import CostModel
from graph_passes.groups import ChannelGroup
from graph_passes.latency import LatencyModel

from ._ste import count_grid, nearest_count

__all__ = [
    "Budget",
    "WeightedBudget",
    "CostBudget",
    "hinge",
    "project_keep",
    "project_budgets",
    "uniform_keep",
    "lowest_latency",
    "bisect_increasing",
    "round_to_counts",
    "final_counts",
]

_logger = logging.getLogger(__name__)

Fraction = Union[float, Tensor]


class Budget(Protocol):
    target: float

    @property
    def units(self) -> tuple[int, ...]:
        """The units whose kept fractions the budget reads."""
        ...

    def kept(self, keep: Mapping[int, Fraction]) -> Fraction:
        """Kept fraction of the resource; units not in ``keep`` count as fully kept."""
        ...


@dataclass(frozen=True)
class WeightedBudget:
    """Kept fraction ``sum(w_u * k_u) / sum(w_u)`` over the units in ``weights``."""

    weights: Mapping[int, float]
    target: float

    def __post_init__(self) -> None:
        if not self.weights or sum(self.weights.values()) <= 0:
            raise ValueError("a weighted budget needs units with a positive total weight")

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(self.weights)

    def kept(self, keep: Mapping[int, Fraction]) -> Fraction:
        total = float(sum(self.weights.values()))
        acc: Fraction = 0.0
        for unit, weight in self.weights.items():
            acc = acc + weight * keep.get(unit, 1.0)
        return acc / total


@dataclass(frozen=True)
class CostBudget:
    """Kept fraction of a model's FLOPs, params or predicted latency per its cost model;
    ``group_of[u]`` is unit ``u``'s channel-group id. ``metric='latency'`` needs ``latency``, a
    :class:`graph_passes.LatencyModel` fitted on the same model."""

    cost: CostModel
    group_of: Mapping[int, int]
    target: float
    metric: str = "flops"
    latency: LatencyModel | None = None

    def __post_init__(self) -> None:
        if self.metric not in ("flops", "params", "latency"):
            raise ValueError(f"metric must be 'flops', 'params' or 'latency', got {self.metric!r}")
        if self.metric == "latency" and self.latency is None:
            raise ValueError("a latency budget needs a fitted graph_passes.LatencyModel")
        if self._total <= 0:
            raise ValueError(f"the cost model counts no {self.metric}")

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(self.group_of)

    def _value(self, by_group: Mapping[int, Fraction]) -> Fraction:
        if self.metric == "flops":
            return self.cost.flops(by_group)
        if self.metric == "params":
            return self.cost.params(by_group)
        return self.latency.latency(self.cost, by_group)  # type: ignore[union-attr]

    @cached_property
    def _total(self) -> float:
        return float(self._value({}))

    def kept(self, keep: Mapping[int, Fraction]) -> Fraction:
        by_group = {self.group_of[u]: k for u, k in keep.items() if u in self.group_of}
        return self._value(by_group) / self._total


def hinge(kept: Fraction, target: float) -> Fraction:
    """HARP's one-sided hardware loss ``max(kept / target - 1, 0)``."""
    if isinstance(kept, Tensor):
        return torch.relu(kept / target - 1.0)
    return max(float(kept) / target - 1.0, 0.0)


def _as_float(value: Fraction) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def bisect_increasing(f: Callable[[float], float], target: float, lo: float, hi: float, iterations: int = 80) -> tuple[float, float]:
    """``(below, above)``: the ends of a bracket, narrowed by bisection, of the point where the
    non-decreasing ``f`` crosses ``target`` (``f(below) <= target < f(above)`` where it crosses
    inside ``[lo, hi]``)."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            hi = mid
        else:
            lo = mid
    return lo, hi


def project_keep(
    budget: Budget,
    keep: Mapping[int, float],
    floors: Mapping[int, float],
    ceilings: Mapping[int, float],
    iterations: int = 80,
) -> dict[int, float]:
    """Rescale ``keep`` by one factor ``c`` (clipped per unit to ``[floor, ceiling]``) so that the
    budget's kept fraction equals its target; the units' ratios are preserved except where clipped.

    The kept fraction is non-decreasing in ``c``, so ``c`` is found by bisection. An unreachable
    target returns all floors (target too low) or all ceilings (too high), with a warning.
    """
    base = {u: max(float(k), 1e-12) for u, k in keep.items()}

    def scaled(c: float) -> dict[int, float]:
        return {u: min(max(c * k, floors[u]), ceilings[u]) for u, k in base.items()}

    target = budget.target
    low_state = dict(floors.items())
    high_state = dict(ceilings.items())
    if _as_float(budget.kept(low_state)) > target:
        _logger.warning("budget target %.4f is below what the floors allow; keeping every unit at its floor", target)
        return {u: floors[u] for u in base}
    if _as_float(budget.kept(high_state)) < target:
        _logger.warning("budget target %.4f is above what the ceilings allow; keeping every unit at its ceiling", target)
        return {u: ceilings[u] for u in base}
    lo, hi = bisect_increasing(lambda c: _as_float(budget.kept(scaled(c))), target, 0.0,
                               max(ceilings[u] / k for u, k in base.items()), iterations)
    below, above = scaled(lo), scaled(hi)
    err_below = abs(_as_float(budget.kept(below)) - target)
    err_above = abs(_as_float(budget.kept(above)) - target)
    return below if err_below <= err_above else above


def uniform_keep(cost: CostModel, groups: Sequence[int], target: float, latency: LatencyModel | None = None) -> float:
    """The channel fraction that, kept in every one of ``groups``, meets ``target`` of the dense
    FLOPs (or, with ``latency``, of the dense latency it predicts): :func:`project_keep` of an
    all-ones plan onto that budget."""
    budget = CostBudget(cost, {g: g for g in groups}, target, metric="flops" if latency is None else "latency",
                        latency=latency)
    keep = project_keep(budget, dict.fromkeys(groups, 1.0), dict.fromkeys(groups, 0.0), dict.fromkeys(groups, 1.0))
    return float(keep[groups[0]])


def lowest_latency(cost: CostModel, groups: Iterable[ChannelGroup], latency: LatencyModel, floor: float = 0.0) -> float:
    """The latency fraction ``latency`` predicts with every prunable group of ``groups`` at its floor,
    ``floor`` of its channels (HARP's ``alpha * target``) and at least one: what stays is the
    latency no channel removal touches (a backend's fixed cost per run and per op, unprunable
    layers); a latency target below it cannot be met."""
    return float(latency.fraction(cost, {g.id: max(floor, 1.0 / g.size) for g in groups if g.prunable}))


def round_to_counts(
    budget: Budget,
    keep: Mapping[int, float],
    sizes: Mapping[int, int],
    min_counts: Mapping[int, int],
    max_counts: Mapping[int, int],
    multiples: Mapping[int, int] | None = None,
) -> dict[int, int]:
    """Whole entry counts per unit, close to ``keep * size`` and with a kept fraction as close to the
    budget's target as single moves can get it.

    Starts from ``round(keep * size)`` and moves one step at a time -- out of the unit rounded up
    the most when above the target, into the unit rounded down the most when below -- while a move
    brings the kept fraction closer to the target (largest-remainder rounding). ``multiples[u]``
    (default 1) restricts unit ``u`` to multiples of it within its bounds (its maximum count is
    always allowed); a unit whose bounds hold no such multiple is counted one by one.
    """
    grids = {u: count_grid(min_counts[u], max_counts[u], (multiples or {}).get(u, 1)) for u in keep}

    def neighbour(u: int, count: int, step: int) -> int | None:
        grid = grids[u]
        if grid is not None:
            i = grid.index(count) + step
            return grid[i] if 0 <= i < len(grid) else None
        return count + step if min_counts[u] <= count + step <= max_counts[u] else None

    counts = {u: nearest_count(keep[u] * sizes[u], min_counts[u], max_counts[u], grids[u]) for u in keep}

    def measure(state: Mapping[int, int]) -> float:
        return _as_float(budget.kept({u: c / sizes[u] for u, c in state.items()}))

    target = budget.target
    current = measure(counts)
    for _ in range(4 * len(counts) + 16):
        if current == target:
            break
        step = -1 if current > target else 1
        residual = {u: counts[u] - keep[u] * sizes[u] for u in counts}
        movable = [u for u in counts if neighbour(u, counts[u], step) is not None]
        movable.sort(key=lambda u: residual[u], reverse=step < 0)
        for unit in movable:
            trial = dict(counts)
            trial[unit] = neighbour(unit, counts[unit], step)
            value = measure(trial)
            if abs(value - target) < abs(current - target):
                counts, current = trial, value
                break
        else:
            break
    return counts


def final_counts(
    budgets: Sequence[Budget],
    keep: Mapping[int, float],
    floors: Mapping[int, float],
    ceilings: Mapping[int, float],
    sizes: Mapping[int, int],
    min_counts: Mapping[int, int],
    max_counts: Mapping[int, int],
    multiples: Mapping[int, int] | None = None,
) -> dict[int, int]:
    """Whole entry counts per unit for every budget: the learned fractions ``keep`` projected onto
    each budget (:func:`project_keep`: their ratios kept) and rounded (:func:`round_to_counts`), so
    each budget's kept fraction is as close to its target as whole counts on the unit's grid get:
    a part of one count's (or one ``multiples`` step's) worth on either side of it."""
    projected = project_budgets(budgets, keep, floors, ceilings)
    counts: dict[int, int] = {}
    for budget in budgets:
        counts.update(round_to_counts(budget, {u: projected[u] for u in budget.units}, sizes, min_counts, max_counts,
                                      multiples))
    return counts


def project_budgets(
    budgets: Sequence[Budget], keep: Mapping[int, float], floors: Mapping[int, float], ceilings: Mapping[int, float],
) -> dict[int, float]:
    """``keep`` with each budget's units projected onto that budget (:func:`project_keep`); units of
    no budget keep their value."""
    projected = dict(keep)
    for budget in budgets:
        projected.update(project_keep(budget, {u: keep[u] for u in budget.units}, floors, ceilings))
    return projected
