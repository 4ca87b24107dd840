"""Handlers for matmul and attention, and the helpers the layer handlers share (conv, linear and
embedding: ``_ops_conv_linear``; norms: ``_ops_norms``)."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_common import arg, combine_elementwise, out_shape, untracked_like
from ._registry import Keeper, register_function, register_method
from ._tracking import SCALE_KEPT, AnalysisState, LayerRecord, TensorInfo, tracked


def _layer(state: AnalysisState, node: fx.Node, kind: str, flops: int, contraction: tuple[np.ndarray | None, int] | None, out: TensorInfo) -> None:
    dims: list[tuple[np.ndarray | None, int]] = []
    if contraction is not None:
        dims.append(contraction)
    dims += [(ids, out.shape[a]) for a, ids in sorted(out.track.items())]
    state.layers.append(LayerRecord(node.name, kind, int(flops), 0, dims, []))


def _module(state: AnalysisState, node: fx.Node) -> nn.Module:
    return state.gm.get_submodule(str(node.target))


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


def _rewrite_attention_scale(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """Fewer channels per head: the default scale ``1/sqrt(head_dim)`` would change, so the
    original one is passed explicitly."""
    q = tracked(node.args[0])
    if isinstance(q, TensorInfo) and node.kwargs.get("scale") is None and len(node.args) < 7:
        d_old, d_new = q.shape[-1], keeper.new_shape(q)[-1]
        if d_old != d_new:
            node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(d_old)}
            node.meta[SCALE_KEPT] = True


@register_function(F.scaled_dot_product_attention, rewrite=_rewrite_attention_scale)
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
