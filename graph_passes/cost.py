"""Cost pass: FLOPs, parameters and activation elements, as functions of the kept channel fractions."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn
from torch.utils import flop_counter as _flop_counter

from ._registry import lookup
from ._tracking import TRACK_KEY, LayerRecord, TensorInfo
from .cost_model import CostModel, Factor, LayerCost, TensorCost
from .dependency import Analysis, Traceable, analysis_for
from .errors import GraphPassError
from .groups import ChannelGroup

__all__ = ["cost", "cost_of_analysis", "count_flops", "flop_counter"]


# Attention kernels that torch's FlopCounterMode counts only in newer releases, with the kernel
# whose formula applies to them. Before torch 2.15 the CPU flash-attention kernel, which
# ``F.scaled_dot_product_attention`` runs on CPU, had no formula and counted 0 FLOPs.
_SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention": "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention_backward": "_scaled_dot_product_flash_attention_backward",
}


def _as_raw(formula: Callable[..., int]) -> Callable[..., int]:
    """A registry formula (already shape-wrapped) that FlopCounterMode must not wrap again."""

    def counted(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    counted._get_raw = True  # type: ignore[attr-defined]
    return counted


def _missing_sdpa_formulas() -> dict[Any, Callable[..., int]]:
    registry = _flop_counter.flop_registry
    extra: dict[Any, Callable[..., int]] = {}
    for name, like in _SDPA_KERNELS.items():
        op, ref = getattr(torch.ops.aten, name, None), getattr(torch.ops.aten, like, None)
        if op is not None and ref is not None and op not in registry and ref in registry:
            extra[op] = _as_raw(registry[ref])
    return extra


def flop_counter(**kwargs: Any) -> _flop_counter.FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode(display=False, **kwargs)`` that counts attention
    on every supported torch release: older releases have no formula for the CPU (and cuDNN)
    scaled-dot-product-attention kernels and count them as 0; the formula torch uses for them
    from 2.15 on (the flash-attention one) is added. This is the counter :func:`cost` matches.
    """
    kwargs.setdefault("display", False)
    custom = {**_missing_sdpa_formulas(), **dict(kwargs.pop("custom_mapping", None) or {})}
    return _flop_counter.FlopCounterMode(custom_mapping=custom, **kwargs)


def count_flops(model: nn.Module, *inputs: Any) -> int:
    """FLOPs of one ``model(*inputs)`` call under ``torch.no_grad()``, counted by :func:`flop_counter`.

    Parameters are switched to ``requires_grad=False`` for the count (and restored): under no_grad
    a view of a parameter (timm's ``latent.expand(B, -1, -1)`` in attention pooling) still requires
    grad but has no grad_fn, which FlopCounterMode's module tracker cannot hook."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad(), flop_counter() as counter:
            model(*inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return int(counter.get_total_flops())


class _Factors:
    """The :class:`Factor` of a dimension whose positions carry the elements ``ids``: how many of
    them each prunable group holds, from one table of every element's prunable group; cached per
    array (the tracks of many tensors share theirs)."""

    def __init__(self, analysis: Analysis) -> None:
        prunable = np.array([g.prunable for g in analysis.groups] + [False], dtype=bool)
        groups = analysis.group_of()
        self.group = np.where(prunable[groups], groups, -1)  # group -1 reads the final False
        self.cache: dict[int, tuple[np.ndarray, tuple[tuple[int, int], ...]]] = {}

    def __call__(self, ids: np.ndarray | None, total: int) -> Factor:
        if ids is None:
            return Factor(total, ())
        hit = self.cache.get(id(ids))
        if hit is None or hit[0] is not ids:
            found = self.group[ids]
            counts = np.bincount(found[found >= 0])
            held = np.flatnonzero(counts)
            hit = self.cache[id(ids)] = (ids, tuple(zip(held.tolist(), counts[held].tolist())))
        if len(ids) != total:  # an axis only partly tracked: the rest is fixed
            total = max(total, len(ids))
        return Factor(total, hit[1])


def _layer_cost(factor: _Factors, rec: LayerRecord) -> LayerCost:
    factors = tuple(factor(ids, size) for ids, size in rec.flops_dims)
    return LayerCost(rec.name, rec.kind, rec.flops, 0, factors, (), rec.module)


def _is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The op's result is a view of its input (its registry entry says so): it moves no data.
    `contiguous`, `to` and friends can copy, so they count."""
    handler = lookup(gm, node)
    return handler is not None and handler.view


def _tensor_costs(gm: fx.GraphModule, factor: _Factors, param_dims: dict[tuple[str, str], dict[int, np.ndarray]]) -> list[TensorCost]:
    """One TensorCost per tensor an op produces (views excluded). A tensor computed from a
    parameter alone (a resampled position embedding) has no tracked axes of its own; its channel
    axes are those of the parameter, which later ops that add it to activations tie to groups."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or _is_view(gm, node):
            continue
        value = node.meta.get(TRACK_KEY)
        infos = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, TensorInfo)]
        for i, info in enumerate(infos):
            elements = int(np.prod(info.shape)) if info.shape else 1
            track = dict(info.track)
            if info.origin is not None:
                for axis, dim in enumerate(info.origin.axes):
                    ids = param_dims.get((info.origin.module, info.origin.param), {}).get(dim) if dim is not None else None
                    if axis not in track and ids is not None and len(ids) == info.shape[axis]:
                        track[axis] = ids
            factors = tuple(factor(ids, info.shape[d]) for d, ids in sorted(track.items()))
            out.append(TensorCost(node.name if len(infos) == 1 else f"{node.name}[{i}]", elements, factors))
    return out


def cost_of_analysis(gm: fx.GraphModule, analysis: Analysis) -> CostModel:
    factor = _Factors(analysis)
    layers = [_layer_cost(factor, rec) for rec in analysis.state.layers]
    dims: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for rec in analysis.state.members:
        dims.setdefault((rec.module, rec.param), {}).setdefault(rec.dim, rec.ids)
    for qualified, param in gm.named_parameters():
        module, _, name = qualified.rpartition(".")
        factors = tuple(factor(ids, param.shape[d]) for d, ids in sorted(dims.get((module, name), {}).items()))
        layers.append(LayerCost(qualified, "param", 0, param.numel(), (), factors))
    return CostModel(tuple(layers), tuple(_tensor_costs(gm, factor, dims)))


def cost(model: Traceable, example_inputs: Any = None, groups: list[ChannelGroup] | None = None) -> CostModel:
    """Dense FLOPs (2 per multiply-accumulate, for conv, linear, matmul and attention, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them on ``example_inputs``; see
    :func:`flop_counter` for torch releases that leave attention uncounted) and
    parameters of every layer, each with the factors by which channel pruning scales it.

    ``model``: a module (traced on ``example_inputs``), a traced ``GraphModule`` or its
    :class:`Analysis` (see :func:`graph_passes.dependency.analysis_for`: nothing is traced again).

    ``CostModel.flops(keep)`` gives the FLOPs when group ``g`` keeps the fraction ``keep[g]``
    of its channels; it is differentiable when the fractions are tensors. ``groups``, when
    given, must be the groups ``channel_groups`` found for the same model and inputs: group ids
    in ``keep`` refer to them (a mismatch raises :class:`GraphPassError`).
    """
    analysis = analysis_for(model, example_inputs)
    if groups is not None and [(g.id, g.size) for g in groups] != [(g.id, g.size) for g in analysis.groups]:
        raise GraphPassError("the groups passed to cost() are not this model's: call channel_groups(model, x) with the same inputs")
    return cost_of_analysis(analysis.gm, analysis)
