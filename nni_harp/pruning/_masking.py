"""How HARP's units meet the model's parameters: unstructured (one unit per weight tensor) and
structured (one unit per coupled channel group) masking behind one interface.

A strategy names the parameters HARP routes through its apply method (``targets``), gives the
differentiable mask of a parameter while HARP learns (``soft_mask``; ``None``: leave it alone)
and the final 0/1 mask once the rates are fixed (``final_mask``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ._structure import MaskFactor, factor_mask, learning_factors
from ._units import ScoreUnit

__all__ = ["Masking", "UnstructuredMasking", "StructuredMasking"]


class Masking(Protocol):
    def targets(self) -> dict[str, set[str]]:
        """``{module: {param, ...}}``: every parameter HARP masks (bound-model module names)."""
        ...

    def soft_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        """The mask of ``module.param`` while learning, with straight-through gradients."""
        ...

    def final_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        """The 0/1 mask of ``module.param`` from the units' hard masks, broadcastable to ``like``."""
        ...

    def to(self, device: torch.device) -> None:
        """Move index tensors next to the scores."""
        ...


class UnstructuredMasking:
    """Each unit masks one layer's weight entry by entry."""

    def __init__(self, units: Sequence[ScoreUnit], modules: Sequence[str]) -> None:
        self.units = units
        self.unit_of = {module: i for i, module in enumerate(modules)}

    def targets(self) -> dict[str, set[str]]:
        return {module: {"weight"} for module in self.unit_of}

    def soft_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        if param != "weight" or module not in self.unit_of:
            return None
        return self.units[self.unit_of[module]].soft_mask().view_as(like).to(like.dtype)

    def final_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        if param != "weight" or module not in self.unit_of:
            return None
        return self.units[self.unit_of[module]].hard.view_as(like)

    def to(self, device: torch.device) -> None:
        pass


Factors = Mapping[str, Mapping[str, Sequence[MaskFactor]]]


def _moved(factors: Factors, device: torch.device) -> dict[str, dict[str, list[MaskFactor]]]:
    return {
        module: {name: [replace(f, index=f.index.to(device), channel=f.channel.to(device)) for f in items]
                 for name, items in targets.items()}
        for module, targets in factors.items()
    }


class StructuredMasking:
    """Each unit masks the channels of one coupled group. While learning only one side of the
    group is masked (:func:`~nni_harp.pruning._structure.learning_factors`: a pruned channel keeps
    its gradient); the final mask covers every member, the product rule of ``graph_passes.group_masks``."""

    def __init__(self, units: Sequence[ScoreUnit], factors: Factors) -> None:
        self.units = units
        self.factors = _moved(factors, torch.device("cpu"))
        self.learning = learning_factors(self.factors)

    def targets(self) -> dict[str, set[str]]:
        return {module: set(params) for module, params in self.factors.items()}

    def soft_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        items = self.learning.get(module, {}).get(param)
        if not items:
            return None
        return factor_mask(items, {f.unit: self.units[f.unit].soft_mask() for f in items}, like)

    def final_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        items = self.factors.get(module, {}).get(param)
        if not items:
            return None
        return factor_mask(items, {f.unit: self.units[f.unit].hard for f in items}, like)

    def to(self, device: torch.device) -> None:
        self.factors = _moved(self.factors, device)
        self.learning = learning_factors(self.factors)
