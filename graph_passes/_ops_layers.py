"""Handlers for matmul and attention, and the helpers the layer handlers share (conv, linear and
embedding: ``_ops_conv_linear``; norms: ``_ops_norms``)."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ._ops_common import arg, combine_elementwise, out_shape, untracked_like, zero_axes
from ._registry import Keeper, register_function, register_method
from ._tracking import SCALE_KEPT, AnalysisState, LayerRecord, TensorInfo, tracked


def _layer(state: AnalysisState, node: fx.Node, kind: str, flops: int, contraction: tuple[np.ndarray | None, int] | None, out: TensorInfo) -> None:
    dims: list[tuple[np.ndarray | None, int]] = []
    if contraction is not None:
        dims.append(contraction)
    dims += [(ids, out.shape[a]) for a, ids in sorted(out.track.items())]
    module = str(node.target) if node.op == "call_module" else None
    state.layers.append(LayerRecord(node.name, kind, int(flops), 0, dims, [], module))


def _contract(state: AnalysisState, node: fx.Node, a: Any, axis_a: int, b: Any, axis_b: int) -> np.ndarray | None:
    """The contracted axes of ``a`` and ``b``: their channels are united (or a parameter side's
    dimension becomes a member). The sum over them drops removed channels, so one side must be
    zero there in the masked model; otherwise the channels are pinned."""
    ids_a = a.track.get(axis_a) if isinstance(a, TensorInfo) else None
    ids_b = b.track.get(axis_b) if isinstance(b, TensorInfo) else None
    zero = any(isinstance(t, TensorInfo) and axis in t.zero for t, axis in ((a, axis_a), (b, axis_b)))
    if ids_a is not None and ids_b is not None:
        state.unite(ids_a, ids_b)
        if not zero:
            state.pin(ids_a, f"{node.name} sums products of channels that are not zero where removed in the masked model "
                             f"(an op before it maps 0 to non-zero)")
        return ids_a
    for ids, other, axis in ((ids_a, b, axis_b), (ids_b, a, axis_a)):
        if ids is None:
            continue
        if isinstance(other, TensorInfo) and other.origin is not None and other.origin.axes[axis] is not None:
            state.member(other.origin.module, other.origin.param, other.origin.axes[axis], ids, "in")
            if not zero:
                state.pin(ids, f"{node.name} contracts channels with a parameter that is not zero where masked")
        else:
            state.pin(ids, f"{node.name} contracts channels with a tensor whose channels cannot follow")
        return ids
    return None


def _leading(t: TensorInfo) -> TensorInfo:
    """``t`` with its last two axes as size 1: the batch (head) axes a matmul broadcasts."""
    lead = t.ndim - 2
    return TensorInfo(t.shape[:-2] + (1, 1), {x: i for x, i in t.track.items() if x < lead}, zero=frozenset(x for x in t.zero if x < lead))


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
    batch_shape = shape[:-2] + (1, 1)
    batch = combine_elementwise(state, node, [_leading(a), _leading(b)], batch_shape)
    out = TensorInfo(shape, dict(batch.track))
    # zero where a batch slice of either side is, a row of ``a`` or a column of ``b`` is
    zero = set(zero_axes(state, [_leading(a), _leading(b)], batch_shape, every=False) - {len(shape) - 2, len(shape) - 1})
    if a.ndim - 2 in a.track:
        out.track[len(shape) - 2] = a.track[a.ndim - 2]
        if a.ndim - 2 in a.zero:
            zero.add(len(shape) - 2)
    if b.ndim - 1 in b.track:
        out.track[len(shape) - 1] = b.track[b.ndim - 1]
        if b.ndim - 1 in b.zero:
            zero.add(len(shape) - 1)
    out.zero = frozenset(zero)
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
    heads = [_leading(t) for t in operands]
    if isinstance(mask, TensorInfo) and mask.ndim >= 2:  # a bias/mask over heads must follow head pruning
        heads[-1].origin = mask.origin
    batch = combine_elementwise(state, node, heads, shape[:-2] + (1, 1))
    out = TensorInfo(shape, dict(batch.track))
    # a head whose values are zero attends to zeros; a query that is zero still attends (uniformly)
    zero = set(zero_axes(state, [heads[2]], shape[:-2] + (1, 1)) - {len(shape) - 2, len(shape) - 1})
    if q.ndim - 2 in q.track:
        out.track[len(shape) - 2] = q.track[q.ndim - 2]
    if v.ndim - 1 in v.track:
        out.track[len(shape) - 1] = v.track[v.ndim - 1]
        if v.ndim - 1 in v.zero:
            zero.add(len(shape) - 1)
    out.zero = frozenset(zero)
    n, m = q.shape[-2], k.shape[-2]
    score_shape = TensorInfo(shape[:-1] + (m,), {x: i for x, i in out.track.items() if x < len(shape) - 1})
    _layer(state, node, "attention_scores", 2 * math.prod(shape[:-1]) * m * q.shape[-1], (d, q.shape[-1]), score_shape)
    _layer(state, node, "attention_values", 2 * math.prod(shape[:-1]) * m * v.shape[-1], None, out)
    del n
    return out
