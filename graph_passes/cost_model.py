"""Cost model types: FLOPs and parameters per layer as a function of the kept channel fractions.

A layer's cost is ``dense * prod(f.fraction(k) for f in factors)``, where each :class:`Factor`
describes one dimension of the layer (its input channels, its output channels, an attention
head dimension): the kept fraction of that dimension is
``(fixed + sum(count_g * k_g)) / total`` with ``k_g`` the kept fraction of group ``g``.
A plain conv has an input and an output factor, a depthwise conv only one (its input and output
channels are the same group), so its cost falls linearly, not quadratically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch

__all__ = ["Factor", "LayerCost", "TensorCost", "CostModel"]

Fraction = Union[float, torch.Tensor]


@dataclass(frozen=True)
class Factor:
    """One dimension of a layer: ``total`` positions, ``parts[i] = (group_id, count)`` of them
    belong to prunable groups; the rest (``fixed``) never shrink."""

    total: int
    parts: tuple[tuple[int, int], ...]

    @property
    def fixed(self) -> int:
        return self.total - sum(c for _, c in self.parts)

    def fraction(self, keep: Mapping[int, Fraction]) -> Fraction:
        if self.total == 0:
            return 1.0
        acc: Fraction = float(self.fixed)
        for gid, count in self.parts:
            acc = acc + count * keep.get(gid, 1.0)
        return acc / self.total


def _scaled(dense: int, factors: tuple[Factor, ...], keep: Mapping[int, Fraction]) -> Fraction:
    """``dense`` times the kept fraction of every factor."""
    out: Fraction = float(dense)
    for f in factors:
        out = out * f.fraction(keep)
    return out


@dataclass(frozen=True)
class LayerCost:
    """Dense cost of one layer and the factors by which pruning scales it."""

    name: str  # fx node name (a parameter's qualified name for kind 'param')
    kind: str  # e.g. "conv", "linear", "matmul", "attention", "norm"
    flops: int
    params: int
    flops_factors: tuple[Factor, ...]
    params_factors: tuple[Factor, ...]
    module: str | None = None  # the called module's qualified name, for a module call

    def scaled_flops(self, keep: Mapping[int, Fraction]) -> Fraction:
        return _scaled(self.flops, self.flops_factors, keep)

    def scaled_params(self, keep: Mapping[int, Fraction]) -> Fraction:
        return _scaled(self.params, self.params_factors, keep)


@dataclass(frozen=True)
class TensorCost:
    """Elements of one tensor an op produces, and the factors (one per channel axis) by which
    pruning scales it."""

    name: str  # fx node name
    elements: int
    factors: tuple[Factor, ...]

    def scaled_elements(self, keep: Mapping[int, Fraction]) -> Fraction:
        return _scaled(self.elements, self.factors, keep)


@dataclass(frozen=True)
class CostModel:
    """Per-layer costs of a traced model. ``flops(keep)``/``params(keep)`` are differentiable in
    the kept fractions when those are tensors. FLOPs count 2 per multiply-accumulate, the
    convention of ``torch.utils.flop_counter.FlopCounterMode``, and cover the same ops (conv,
    linear/matmul, attention).

    ``activations(keep)`` counts the elements of the tensors the model's ops produce on the example
    inputs (views excluded), a proxy for memory traffic: element-wise ops, norms and depthwise
    convs cost little in FLOPs but read and write whole tensors, and their time on a CPU follows
    this count rather than the FLOPs."""

    layers: tuple[LayerCost, ...]  # every parameter is a 'param' layer (unprunable ones without factors)
    tensors: tuple[TensorCost, ...] = ()

    @property
    def total_flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def flops(self, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        keep = keep or {}
        total: Fraction = 0.0
        for layer in self.layers:
            total = total + layer.scaled_flops(keep)
        return total

    def params(self, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        keep = keep or {}
        total: Fraction = 0.0
        for layer in self.layers:
            total = total + layer.scaled_params(keep)
        return total

    @property
    def total_activations(self) -> int:
        return sum(t.elements for t in self.tensors)

    def activations(self, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        keep = keep or {}
        total: Fraction = 0.0
        for t in self.tensors:
            total = total + t.scaled_elements(keep)
        return total

    def flops_by_module(self) -> dict[str, int]:
        """Dense FLOPs of every called module (conv, linear), by qualified name, on the example
        inputs (summed over the calls of a module called more than once)."""
        out: dict[str, int] = {}
        for layer in self.layers:
            if layer.module is not None:
                out[layer.module] = out.get(layer.module, 0) + layer.flops
        return out

    def by_layer(self) -> dict[str, LayerCost]:
        return {layer.name: layer for layer in self.layers}
