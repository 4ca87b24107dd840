"""How HARP's units meet the model's parameters: unstructured (one unit per weight tensor) and
structured (one unit per coupled channel group) masking behind one interface.

A strategy names the parameters HARP routes through its apply method (``targets``), gives a
parameter with its mask applied while HARP learns (``masked``: straight-through gradients to the
scores and rates when a gradient can flow; a parameter HARP learns no mask for gets NNI's stored
one) and the final 0/1 mask once the rates are fixed (``final_mask``).

Where no gradient can reach the scores, rates or the parameter (an attack's forward passes, which
freeze every parameter; ``torch.no_grad``), the masked parameter is a constant: it is computed
once and reused (:class:`ProductCache`) until the parameter or a mask it is built from changes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ._ste import given_product, masked_straight_through
from ._structure import MaskFactor, factor_mask, learning_factors
from ._units import ScoreUnit

__all__ = ["Masking", "UnstructuredMasking", "StructuredMasking", "ProductCache"]


class Masking(Protocol):
    def targets(self) -> dict[str, set[str]]:
        """``{module: {param, ...}}``: every parameter HARP masks (bound-model module names)."""
        ...

    def masked(self, module: str, param: str, target: Tensor, stored: Tensor) -> Tensor:
        """``module.param`` (``target``) times its mask while learning, with straight-through
        gradients; a target HARP does not learn a mask for gets its ``stored`` (NNI) mask."""
        ...

    def final_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        """The 0/1 mask of ``module.param`` from the units' hard masks, broadcastable to ``like``."""
        ...

    def to(self, device: torch.device) -> None:
        """Move index tensors next to the scores."""
        ...

    def clear(self) -> None:
        """Drop the cached products (pruning ended)."""
        ...


def _stamp(tensor: Tensor) -> tuple[object, ...]:
    return (tensor, tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)


class ProductCache:
    """Masked parameters that carry no gradient, per ``(module, param)``, reused while the parameter
    and the hard masks they were computed from are the same tensors, unchanged (same storage, same
    version counter: every in-place update, an optimizer step or a mask refresh, bumps it)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[list[tuple[object, ...]], Tensor]] = {}

    def product(self, key: tuple[str, str], sources: Iterable[Tensor], compute: Callable[[], Tensor]) -> Tensor:
        if torch.is_inference_mode_enabled():  # an inference tensor cannot be saved for a later backward
            with torch.no_grad():
                return compute()
        stamps = [_stamp(t) for t in sources]
        hit = self._entries.get(key)
        if hit is not None and len(hit[0]) == len(stamps) and all(
                a[0] is b[0] and a[1:] == b[1:] for a, b in zip(hit[0], stamps)):
            return hit[1]
        with torch.no_grad():
            value = compute()
        self._entries[key] = (stamps, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


def _stored_product(cache: ProductCache, key: tuple[str, str], target: Tensor, stored: Tensor) -> Tensor:
    """``target * stored``: NNI's mask of a target HARP learns no mask for (all ones while it
    learns), computed once where no gradient can flow."""
    if torch.is_grad_enabled() and (target.requires_grad or stored.requires_grad):
        return torch.mul(target, stored)
    return cache.product(key, (target, stored), lambda: torch.mul(target, stored))


def _needs_graph(target: Tensor, units: Iterable[ScoreUnit]) -> bool:
    """Whether a gradient can flow from the masked ``target`` to it, or to the units' scores or rates."""
    return torch.is_grad_enabled() and (
        target.requires_grad or any(u.scores.requires_grad or u.rate.requires_grad for u in units))


class UnstructuredMasking:
    """Each unit masks one layer's weight entry by entry."""

    def __init__(self, units: Sequence[ScoreUnit], modules: Sequence[str]) -> None:
        self.units = units
        self.unit_of = {module: i for i, module in enumerate(modules)}
        self.cache = ProductCache()

    def targets(self) -> dict[str, set[str]]:
        return {module: {"weight"} for module in self.unit_of}

    def masked(self, module: str, param: str, target: Tensor, stored: Tensor) -> Tensor:
        if param != "weight" or module not in self.unit_of:
            return _stored_product(self.cache, (module, param), target, stored)
        unit = self.units[self.unit_of[module]]
        hard = unit.hard
        product = self.cache.product((module, param), (target, hard),
                                     lambda: torch.mul(target, hard.view_as(target).to(target.dtype)))
        if not _needs_graph(target, (unit,)):
            return product
        return masked_straight_through(target, unit.scores, unit.keep(), hard, product)

    def final_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        if param != "weight" or module not in self.unit_of:
            return None
        return self.units[self.unit_of[module]].hard.view_as(like)

    def to(self, device: torch.device) -> None:
        pass

    def clear(self) -> None:
        self.cache.clear()


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
        self.cache = ProductCache()

    def targets(self) -> dict[str, set[str]]:
        return {module: set(params) for module, params in self.factors.items()}

    def masked(self, module: str, param: str, target: Tensor, stored: Tensor) -> Tensor:
        items = self.learning.get(module, {}).get(param)
        if not items:
            return _stored_product(self.cache, (module, param), target, stored)
        units = {f.unit: self.units[f.unit] for f in items}
        product = self.cache.product((module, param), (target, *(u.hard for u in units.values())),
                                     lambda: torch.mul(target, factor_mask(items, {i: u.hard for i, u in units.items()}, target)))
        if not _needs_graph(target, units.values()):
            return product
        return given_product(target, factor_mask(items, {i: u.soft_mask() for i, u in units.items()}, target), product)

    def final_mask(self, module: str, param: str, like: Tensor) -> Tensor | None:
        items = self.factors.get(module, {}).get(param)
        if not items:
            return None
        return factor_mask(items, {f.unit: self.units[f.unit].hard for f in items}, like)

    def to(self, device: torch.device) -> None:
        self.factors = _moved(self.factors, device)
        self.learning = learning_factors(self.factors)
        self.cache.clear()

    def clear(self) -> None:
        self.cache.clear()
