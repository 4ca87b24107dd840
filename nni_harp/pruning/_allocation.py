"""Where HARP's learned rates start: kept fractions per unit at an overall kept fraction above the
target (``HARPSettings.init_allocation`` at ``HARPSettings.start_keep``).

Every allocation returns ``{unit: k}`` with ``floor <= k <= ceiling`` whose budget kept fraction is
the budget's ``target`` (the caller passes the budget with its target set to the start fraction):

- ``uniform``: one fraction for every unit (clipped to its floor and ceiling);
- ``dense``: every unit at its ceiling (the budget's target is not used);
- ``erk``: Erdos-Renyi-Kernel densities (Evci et al. 2020), ``eps * sum(shape) / prod(shape)`` per
  layer, scaled by one ``eps``; unstructured only, a channel group has no single weight shape;
- ``magnitude``: one global threshold on the units' magnitudes (weights' ``|w|``; channels' RMS
  weight), the largest kept;
- ``lamp``: one global threshold on LAMP scores (Lee et al. 2021): within a unit, an entry's squared
  magnitude over the sum of the squared magnitudes not smaller than it, so every unit's largest
  entry scores 1 and the scale of each unit cancels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch
from torch import Tensor

from .budget import Budget, bisect_increasing, project_keep
from .errors import SettingsError

__all__ = ["UnitStats", "allocate", "ALLOCATIONS"]


@dataclass(frozen=True)
class UnitStats:
    """What an allocation may read of one unit: its entries' magnitudes (flat, ``>= 0``) and, for a
    layer's weight, the weight's shape (``None`` for a channel group)."""

    magnitudes: Tensor
    shape: tuple[int, ...] | None = None


Allocation = Callable[[Budget, Mapping[int, UnitStats], Mapping[int, float], Mapping[int, float]], dict[int, float]]
ALLOCATIONS: dict[str, Allocation] = {}


def _register(name: str) -> Callable[[Allocation], Allocation]:
    def decorate(fn: Allocation) -> Allocation:
        ALLOCATIONS[name] = fn
        return fn

    return decorate


@_register("uniform")
def _uniform(budget: Budget, stats: Mapping[int, UnitStats], floors: Mapping[int, float],
             ceilings: Mapping[int, float]) -> dict[int, float]:
    return project_keep(budget, {u: 1.0 for u in stats}, floors, ceilings)


@_register("dense")
def _dense(budget: Budget, stats: Mapping[int, UnitStats], floors: Mapping[int, float],
           ceilings: Mapping[int, float]) -> dict[int, float]:
    return {u: float(ceilings[u]) for u in stats}


@_register("erk")
def _erk(budget: Budget, stats: Mapping[int, UnitStats], floors: Mapping[int, float],
         ceilings: Mapping[int, float]) -> dict[int, float]:
    density: dict[int, float] = {}
    for u, unit in stats.items():
        if unit.shape is None:
            raise SettingsError("init_allocation", "erk", "'uniform', 'dense', 'magnitude' or 'lamp' for structured "
                                "pruning: ERK densities come from a layer's weight shape, a channel group has none")
        density[u] = sum(unit.shape) / math.prod(unit.shape)
    return project_keep(budget, density, floors, ceilings)


def _global_threshold(budget: Budget, scores: Mapping[int, Tensor], floors: Mapping[int, float],
                      ceilings: Mapping[int, float]) -> dict[int, float]:
    """Keep the globally highest-scoring entries: the number ``c`` of entries kept over all units
    is chosen so the budget meets its target (each unit's share clipped to its floor and ceiling)."""
    units = list(scores)
    flat = torch.cat([scores[u].detach().reshape(-1).to(torch.float64).cpu() for u in units])
    owner = torch.cat([torch.full((scores[u].numel(),), i, dtype=torch.long) for i, u in enumerate(units)])
    order = torch.argsort(flat, descending=True, stable=True)
    # ranks[i]: sorted global positions of unit i's entries, so a unit keeps searchsorted(ranks[i], c)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    ranks = [torch.sort(position[owner == i]).values for i in range(len(units))]
    sizes = [scores[u].numel() for u in units]

    def keep(c: float) -> dict[int, float]:
        top = torch.tensor([int(c)])
        return {u: min(max(int(torch.searchsorted(ranks[i], top, side="left")) / sizes[i], floors[u]), ceilings[u])
                for i, u in enumerate(units)}

    def kept(c: float) -> float:
        value = budget.kept(keep(c))
        return float(value.detach()) if isinstance(value, Tensor) else float(value)

    lo, hi = bisect_increasing(kept, budget.target, 0.0, float(flat.numel()) + 1.0, iterations=64)
    below, above = keep(lo), keep(hi)
    return below if abs(kept(lo) - budget.target) <= abs(kept(hi) - budget.target) else above


@_register("magnitude")
def _magnitude(budget: Budget, stats: Mapping[int, UnitStats], floors: Mapping[int, float],
               ceilings: Mapping[int, float]) -> dict[int, float]:
    return _global_threshold(budget, {u: s.magnitudes for u, s in stats.items()}, floors, ceilings)


def lamp_scores(magnitudes: Tensor) -> Tensor:
    """LAMP score of every entry of one unit: ``m_i^2 / sum_{j: m_j >= m_i} m_j^2`` (ties broken by
    position), shaped like ``magnitudes``, in float64."""
    squared = magnitudes.detach().reshape(-1).to(torch.float64) ** 2
    values, order = torch.sort(squared)
    suffix = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])
    scores = torch.empty_like(squared)
    scores[order] = values / suffix.clamp_min(1e-300)
    return scores.view_as(magnitudes)


@_register("lamp")
def _lamp(budget: Budget, stats: Mapping[int, UnitStats], floors: Mapping[int, float],
          ceilings: Mapping[int, float]) -> dict[int, float]:
    return _global_threshold(budget, {u: lamp_scores(s.magnitudes) for u, s in stats.items()}, floors, ceilings)


def allocate(kind: str, budget: Budget, start: float, stats: Mapping[int, UnitStats],
             floors: Mapping[int, float], ceilings: Mapping[int, float]) -> dict[int, float]:
    """Kept fraction per unit from allocation ``kind`` at the overall kept fraction ``start``."""
    if kind not in ALLOCATIONS:
        raise SettingsError("init_allocation", kind, "one of " + ", ".join(repr(k) for k in ALLOCATIONS))
    return ALLOCATIONS[kind](replace(budget, target=float(start)), stats, floors, ceilings)
