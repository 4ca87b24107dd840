"""Cost model types: FLOPs and parameters per layer as a function of the kept channel fractions.

A layer's cost is ``dense * prod(f.fraction(k) for f in factors)``, where each :class:`Factor`
describes one dimension of the layer (its input channels, its output channels, an attention
head dimension): the kept fraction of that dimension is
``(fixed + sum(count_g * k_g)) / total`` with ``k_g`` the kept fraction of group ``g``.
A plain conv has an input and an output factor, a depthwise conv only one (its input and output
channels are the same group), so its cost falls linearly, not quadratically.

Where the kept fractions are tensors (a budget HARP differentiates every pruning step), the sums
run as a few tensor ops (:class:`_Rows`) rather than a Python loop over layers and factors: the
same values, a fraction of the time.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Callable, Collection, Iterable, Mapping, Union

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


class _Rows:
    """Dense costs and factors of some rows (layers or tensors) as tensors: row ``r`` costs
    ``dense[r] * prod_j fractions[index[r, j]]``, where the factor fractions are
    ``weights @ k + offsets`` (``k``: the kept fractions of ``groups``) and the last fraction, a
    constant 1, pads rows with fewer factors."""

    def __init__(self, rows: Iterable[tuple[int, tuple[Factor, ...]]]) -> None:
        rows = [(dense, tuple(f for f in factors if f.total)) for dense, factors in rows]
        factors = [f for _, fs in rows for f in fs]
        self.groups = {g: i for i, g in enumerate(sorted({g for f in factors for g, _ in f.parts}))}
        self.weights = torch.zeros(len(factors) + 1, len(self.groups), dtype=torch.float64)
        self.offsets = torch.ones(len(factors) + 1, dtype=torch.float64)
        for i, f in enumerate(factors):
            self.offsets[i] = f.fixed / f.total
            for g, count in f.parts:
                self.weights[i, self.groups[g]] += count / f.total
        width = max((len(fs) for _, fs in rows), default=0)
        self.index = torch.full((len(rows), width), len(factors), dtype=torch.long)
        start = 0
        for r, (_, fs) in enumerate(rows):
            self.index[r, :len(fs)] = torch.arange(start, start + len(fs))
            start += len(fs)
        self.dense = torch.tensor([float(dense) for dense, _ in rows], dtype=torch.float64)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def total(self, keep: Mapping[int, Fraction], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The summed cost at ``keep`` (tensors of one element or floats), as ``dtype`` on ``device``."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.weights, self.offsets, self.index, self.dense))
        weights, offsets, index, dense = self._on[device]
        k = torch.ones(len(self.groups), dtype=torch.float64)
        at, values = [], []
        for g, value in keep.items():
            col = self.groups.get(g)
            if col is None:
                continue
            if isinstance(value, torch.Tensor):
                at.append(col)
                values.append(value.reshape(()).to(device=device, dtype=torch.float64))
            else:
                k[col] = float(value)
        k = k.to(device)
        if values:
            k = k.index_put((torch.tensor(at, device=device),), torch.stack(values))
        fractions = torch.mv(weights, k) + offsets
        return (dense * fractions[index].prod(dim=1)).sum().to(dtype)


def _tensor_dtype(keep: Mapping[int, Fraction]) -> tuple[torch.device, torch.dtype] | None:
    """Device and promoted dtype of ``keep``'s tensor values when there are any and each holds one
    element (the vectorised sum's case), else ``None``."""
    tensors = [v for v in keep.values() if isinstance(v, torch.Tensor)]
    if not tensors or any(t.numel() != 1 for t in tensors):
        return None
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    if not dtype.is_floating_point:  # as a float times an integer tensor: the default float dtype
        dtype = torch.promote_types(dtype, torch.get_default_dtype())
    return tensors[0].device, dtype


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

    def _sum(self, what: str, rows: Callable[[], Iterable[tuple[int, tuple[Factor, ...]]]],
             keep: Mapping[int, Fraction] | None) -> Fraction:
        """``sum(dense * prod(f.fraction(keep)))`` over ``rows()``: vectorised where ``keep`` holds
        tensors (built once per ``what``, kept in the instance's ``__dict__``), a Python sum of
        floats otherwise."""
        keep = keep or {}
        found = _tensor_dtype(keep)
        if found is None:
            total: Fraction = 0.0
            for dense, factors in rows():
                total = total + _scaled(dense, factors, keep)
            return total
        forms: dict[str, _Rows] = self.__dict__.setdefault("_rows", {})
        if what not in forms:
            forms[what] = _Rows(rows())
        return forms[what].total(keep, *found)

    def flops(self, keep: Mapping[int, Fraction] | None = None, kinds: Collection[str] | None = None) -> Fraction:
        """FLOPs at the kept fractions ``keep``: of every layer, or of those whose ``kind`` is in ``kinds``."""
        what = "flops" if kinds is None else "flops:" + ",".join(sorted(kinds))
        return self._sum(what, lambda: ((layer.flops, layer.flops_factors) for layer in self.layers
                                        if kinds is None or layer.kind in kinds), keep)

    def params(self, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        return self._sum("params", lambda: ((layer.params, layer.params_factors) for layer in self.layers), keep)

    @property
    def total_activations(self) -> int:
        return sum(t.elements for t in self.tensors)

    def activations(self, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        return self._sum("activations", lambda: ((t.elements, t.factors) for t in self.tensors), keep)

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
