"""Handlers for norms and for matmul/attention (conv, linear and embedding: ``_ops_conv_linear``)."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_common import arg, combine_elementwise, out_shape, untracked_like
from ._registry import register_function, register_method, register_module
from ._tracking import AnalysisState, LayerRecord, TensorInfo
from .modules import ExactStatsNorm, exact_stats_norm
from .tracing import register_leaf_function, register_leaf_type

EXACT_STATS = "graph_passes.exact_stats"  # node.meta key: norm whose statistics span pruned channels


def _layer(state: AnalysisState, node: fx.Node, kind: str, flops: int, contraction: tuple[np.ndarray | None, int] | None, out: TensorInfo) -> None:
    dims: list[tuple[np.ndarray | None, int]] = []
    if contraction is not None:
        dims.append(contraction)
    dims += [(ids, out.shape[a]) for a, ids in sorted(out.track.items())]
    state.layers.append(LayerRecord(node.name, kind, int(flops), 0, dims, []))


def _module(state: AnalysisState, node: fx.Node) -> nn.Module:
    return state.gm.get_submodule(str(node.target))


def _norm(state: AnalysisState, node: fx.Node, axis: int, params: tuple[str, ...], exact: str | None, groups: int = 0) -> Any:
    """Per-channel norm on ``axis``. ``exact`` ('layer', 'rms', 'simple', 'group1'): its
    statistics span the channels, so the speedup swaps in a norm that counts the removed (zero)
    channels, and the pruned model still equals the masked one.
    ``groups`` > 1: GroupNorm, pruned by whole groups (its statistics stay per group)."""
    x = state.info(node.args[0])
    shape = out_shape(node)
    if not isinstance(x, TensorInfo):
        return untracked_like(node)
    axis = axis % x.ndim
    out = TensorInfo(shape, dict(x.track))
    ids = x.track.get(axis)
    if ids is None:
        return out
    if groups > 1 and groups != len(ids):
        grid = ids.reshape(groups, -1)
        for k in range(1, grid.shape[1]):
            state.unite(grid[:, 0], grid[:, k])
    module = _module(state, node)
    for p in params:
        if isinstance(getattr(module, p, None), torch.Tensor):
            state.member(str(node.target), p, 0, ids, "norm")
    if exact:
        node.meta[EXACT_STATS] = (exact, axis)
    return out


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm2d)
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


@register_module(*_BN)
def batch_norm(state: AnalysisState, node: fx.Node) -> Any:
    return _norm(state, node, 1, _BN_PARAMS, exact=None)


@register_module(nn.LayerNorm, nn.RMSNorm)
def layer_norm(state: AnalysisState, node: fx.Node) -> Any:
    m = _module(state, node)
    if len(m.normalized_shape) != 1:
        x = state.info(node.args[0])
        state.pin_track(x, f"{node.name} normalises over several dims")
        return untracked_like(node)
    return _norm(state, node, -1, ("weight", "bias"), exact="rms" if isinstance(m, nn.RMSNorm) else "layer")


@register_module(nn.GroupNorm)
def group_norm(state: AnalysisState, node: fx.Node) -> Any:
    m = _module(state, node)
    return _norm(state, node, 1, ("weight", "bias"), exact="group1" if m.num_groups == 1 else None, groups=m.num_groups)


@register_module(register_leaf_type(ExactStatsNorm))
def exact_norm_module(state: AnalysisState, node: fx.Node) -> Any:
    """The speedup's exact-statistics norm: per channel on ``axis`` (1 for the one-group GroupNorm
    form). It already counts every removed channel (``original_channels`` is fixed, the kept count
    comes from the input), so pruning it again only slices weight and bias: no exact swap."""
    return _norm(state, node, _module(state, node).axis, ("weight", "bias"), exact=None)


def _contract(state: AnalysisState, node: fx.Node, a: Any, axis_a: int, b: Any, axis_b: int) -> np.ndarray | None:
    ids_a = a.track.get(axis_a) if isinstance(a, TensorInfo) else None
    ids_b = b.track.get(axis_b) if isinstance(b, TensorInfo) else None
    if ids_a is not None and ids_b is not None:
        state.unite(ids_a, ids_b)
        return ids_a
    for ids, other, axis in ((ids_a, b, axis_b), (ids_b, a, axis_a)):
        if ids is None:
            continue
        if isinstance(other, TensorInfo) and other.origin is not None and other.origin.axes[axis] is not None:
            state.member(other.origin.module, other.origin.param, other.origin.axes[axis], ids, "in")
        else:
            state.pin(ids, f"{node.name} contracts channels with a tensor whose channels cannot follow")
        return ids
    return None


@register_function(torch.matmul, operator.matmul, torch.bmm)
@register_method("matmul", "bmm")
def matmul(state: AnalysisState, node: fx.Node) -> Any:
    a, b = state.info(node.args[0]), state.info(node.args[1])
    shape = out_shape(node)
    if not (isinstance(a, TensorInfo) and isinstance(b, TensorInfo)) or a.ndim < 2 or b.ndim < 2:
        for v in (a, b):
            state.pin_track(v, f"{node.name}: matmul of vectors")
        return untracked_like(node)
    k = a.shape[-1]
    contraction = _contract(state, node, a, a.ndim - 1, b, b.ndim - 2)
    batch = combine_elementwise(
        state, node,
        [TensorInfo(a.shape[:-2] + (1, 1), {x: i for x, i in a.track.items() if x < a.ndim - 2}),
         TensorInfo(b.shape[:-2] + (1, 1), {x: i for x, i in b.track.items() if x < b.ndim - 2})],
        shape[:-2] + (1, 1))
    out = TensorInfo(shape, dict(batch.track))
    if a.ndim - 2 in a.track:
        out.track[len(shape) - 2] = a.track[a.ndim - 2]
    if b.ndim - 1 in b.track:
        out.track[len(shape) - 1] = b.track[b.ndim - 1]
    _layer(state, node, "matmul", 2 * math.prod(shape) * k, (contraction, k), out)
    return out


@register_function(F.scaled_dot_product_attention)
def attention(state: AnalysisState, node: fx.Node) -> Any:
    q, k, v = (state.info(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    shape = out_shape(node)
    if not all(isinstance(t, TensorInfo) for t in (q, k, v)):
        return untracked_like(node)
    d = _contract(state, node, q, q.ndim - 1, k, k.ndim - 1)
    for t, name in ((k, "keys"), (v, "values")):
        if t.ndim - 2 in t.track:
            state.pin(t.track[t.ndim - 2], f"{node.name} attends over {name}: that axis cannot shrink")
    mask = state.info(arg(node, 3, "attn_mask"))
    operands = [q, k, v] + ([mask] if isinstance(mask, TensorInfo) else [])
    heads = [TensorInfo(t.shape[:-2] + (1, 1), {x: i for x, i in t.track.items() if x < t.ndim - 2}) for t in operands]
    if isinstance(mask, TensorInfo) and mask.ndim >= 2:  # a bias/mask over heads must follow head pruning
        heads[-1].origin = mask.origin
        for t, head in zip(operands, heads):
            head.shape = t.shape[:-2] + (1, 1)
    batch = combine_elementwise(state, node, heads, shape[:-2] + (1, 1))
    out = TensorInfo(shape, dict(batch.track))
    if q.ndim - 2 in q.track:
        out.track[len(shape) - 2] = q.track[q.ndim - 2]
    if v.ndim - 1 in v.track:
        out.track[len(shape) - 1] = v.track[v.ndim - 1]
    n, m = q.shape[-2], k.shape[-2]
    score_shape = TensorInfo(shape[:-1] + (m,), {x: i for x, i in out.track.items() if x < len(shape) - 1})
    _layer(state, node, "attention_scores", 2 * math.prod(shape[:-1]) * m * q.shape[-1], (d, q.shape[-1]), score_shape)
    _layer(state, node, "attention_values", 2 * math.prod(shape[:-1]) * m * v.shape[-1], None, out)
    del n
    return out


def _param_members(state: AnalysisState, node: fx.Node, ids: np.ndarray, names: tuple[tuple[int, str], ...]) -> None:
    """A functional norm's per-channel arguments (position, name) follow the channels ``ids``."""
    for index, name in names:
        p = state.info(arg(node, index, name))
        if isinstance(p, TensorInfo) and p.origin is not None and p.ndim == 1:
            state.member(p.origin.module, p.origin.param, 0, ids, "norm")
        elif p is not None:
            state.pin(ids, f"{node.name} uses a computed {name}")


def functional_norm(kind: str):
    def handler(state: AnalysisState, node: fx.Node) -> Any:
        x = state.info(node.args[0])
        if not isinstance(x, TensorInfo):
            return untracked_like(node)
        if kind == "batch":
            axis, names = 1, ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
        elif kind == "group":
            axis, names = 1, ((2, "weight"), (3, "bias"))
        else:
            shape = arg(node, 1, "normalized_shape")
            if len(shape) != 1:
                state.pin_track(x, f"{node.name} normalises over several dims")
                return TensorInfo(out_shape(node))
            axis, names = x.ndim - 1, ((2, "weight"), (3, "bias"))
        ids = x.track.get(axis)
        out = TensorInfo(out_shape(node), dict(x.track))
        if ids is None:
            return out
        groups = int(arg(node, 1, "num_groups")) if kind == "group" else 0
        if kind == "group" and groups not in (1, len(ids)):
            grid = ids.reshape(groups, -1)
            for k in range(1, grid.shape[1]):
                state.unite(grid[:, 0], grid[:, k])
        _param_members(state, node, ids, names)
        if kind in ("layer", "rms") or (kind == "group" and groups == 1):
            node.meta[EXACT_STATS] = ("group1" if kind == "group" else kind, axis)
        return out
    return handler


@register_function(register_leaf_function(exact_stats_norm))
def exact_norm_function(state: AnalysisState, node: fx.Node) -> Any:
    """Functional form of :func:`exact_norm_module` (what the speedup puts in place of F.layer_norm,
    F.rms_norm and one-group F.group_norm)."""
    x = state.info(node.args[0])
    if not isinstance(x, TensorInfo):
        return untracked_like(node)
    out = TensorInfo(out_shape(node), dict(x.track))
    ids = x.track.get(int(arg(node, 2, "axis")) % x.ndim)
    if ids is not None:
        _param_members(state, node, ids, ((5, "weight"), (6, "bias")))
    return out


register_function(F.batch_norm)(functional_norm("batch"))
register_function(F.group_norm)(functional_norm("group"))
register_function(F.layer_norm)(functional_norm("layer"))
if hasattr(F, "rms_norm"):
    register_function(F.rms_norm)(functional_norm("rms"))
