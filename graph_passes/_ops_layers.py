"""Handlers for layers with parameters (conv, linear, norms, embedding) and for matmul/attention."""
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

EXACT_STATS = "graph_passes.exact_stats"  # node.meta key: norm whose statistics span pruned channels


def _layer(state: AnalysisState, node: fx.Node, kind: str, flops: int, contraction: tuple[np.ndarray | None, int] | None, out: TensorInfo) -> None:
    dims: list[tuple[np.ndarray | None, int]] = []
    if contraction is not None:
        dims.append(contraction)
    dims += [(ids, out.shape[a]) for a, ids in sorted(out.track.items())]
    state.layers.append(LayerRecord(node.name, kind, int(flops), 0, dims, []))


def _module(state: AnalysisState, node: fx.Node) -> nn.Module:
    return state.gm.get_submodule(str(node.target))


def _param_pieces(state: AnalysisState, value: Any) -> list[tuple[str, str, int]] | None:
    """A 1-D tensor argument as the parameters it is made of: ``[(module, param, length)]`` for a
    parameter (or buffer) itself or a ``torch.cat`` of them (BEiT/EVA build ``cat(q_bias, k_bias,
    v_bias)`` for a qkv projection); ``None`` when it is anything else."""
    info = state.info(value)
    if isinstance(info, TensorInfo) and info.origin is not None and info.ndim == 1 and info.origin.axes == (0,):
        return [(info.origin.module, info.origin.param, info.shape[0])]
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target in (torch.cat, torch.concat):
        parts = arg(value, 0, "tensors")
        if int(arg(value, 1, "dim", 0)) not in (0, -1) or not isinstance(parts, (list, tuple)):
            return None
        pieces: list[tuple[str, str, int]] = []
        for part in parts:
            sub = _param_pieces(state, part)
            if sub is None:
                return None
            pieces += sub
        return pieces
    return None


def _bias(state: AnalysisState, node: fx.Node, bias: Any, out_ids: np.ndarray) -> None:
    """Tie a bias argument to the output channels it is added to: its parameter(s) become members,
    a tracked bias is united with them; any other bias pins them."""
    if bias is None:
        return
    info = state.info(bias)
    if isinstance(info, TensorInfo) and 0 in info.track and info.ndim == 1:
        state.unite(out_ids, info.track[0])
        return
    pieces = _param_pieces(state, bias)
    if pieces is None or sum(n for _, _, n in pieces) != len(out_ids):
        state.pin(out_ids, f"{node.name} adds a computed bias")
        return
    offset = 0
    for module, param, n in pieces:
        state.member(module, param, 0, out_ids[offset:offset + n], "out")
        offset += n


def _conv_like(state: AnalysisState, node: fx.Node, name: str | None, cin: int, cout: int, groups: int,
               kernel: int, has_bias: bool, x: Any, slice_inputs: bool = True, pointwise: bool = False) -> TensorInfo:
    shape = out_shape(node)
    in_ids = x.track.get(1) if isinstance(x, TensorInfo) else None
    out = TensorInfo(shape)
    flops = 2 * math.prod(shape) * (cin // groups) * kernel
    if groups == 1:
        if in_ids is not None:
            if name is not None and slice_inputs:
                state.member(name, "weight", 1, in_ids, "in")
            else:
                state.pin(in_ids, f"{node.name} cannot drop input channels")
        out_ids = state.fresh(cout)
        contraction = (in_ids if slice_inputs else None, cin)
    else:
        # whole conv groups: the inputs and outputs of one group form one unit (depthwise: 1 channel)
        per_in, per_out = cin // groups, cout // groups
        if in_ids is None:
            in_ids = state.fresh(cin)
            state.pin(in_ids, f"grouped {node.name} is fed by fixed channels")
        grid = in_ids.reshape(groups, per_in)
        for k in range(1, per_in):
            state.unite(grid[:, 0], grid[:, k])
        out_ids = np.repeat(grid[:, 0], per_out)
        contraction = None
    if name is None:
        state.pin(out_ids, f"{node.name} computes its weights; its output channels are fixed")
    else:
        state.member(name, "weight", 0, out_ids, "out")
        if has_bias:
            state.member(name, "bias", 0, out_ids, "out")
    out.track[1] = out_ids
    if isinstance(x, TensorInfo):
        # channels on the spatial axes (CoaT's aggregate Conv1d over stacked tokens): a pointwise
        # conv keeps every position in place, so they pass; any other conv mixes them
        for axis, ids in x.track.items():
            if axis == 1:
                continue
            if axis >= 2 and pointwise and shape[axis] == x.shape[axis]:
                out.track[axis] = ids
            else:
                state.pin(ids, f"{node.name} convolves over axis {axis}, which carries channels")
    _layer(state, node, "conv", flops, contraction, out)
    return out


def _is_pointwise(kernel: Any, stride: Any, padding: Any, dilation: Any) -> bool:
    """A 1x1 conv with stride 1 and no padding: output position i reads input position i only."""
    def all_equal(v: Any, value: int) -> bool:
        return all(int(e) == value for e in (v if isinstance(v, (list, tuple)) else [v]))
    no_padding = padding in ("same", "valid") or (not isinstance(padding, str) and all_equal(padding, 0))
    return all_equal(kernel, 1) and all_equal(stride, 1) and all_equal(dilation, 1) and no_padding


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(state: AnalysisState, node: fx.Node) -> Any:
    m = _module(state, node)
    return _conv_like(state, node, str(node.target), m.in_channels, m.out_channels, m.groups,
                      math.prod(m.kernel_size), m.bias is not None, state.info(node.args[0]),
                      pointwise=_is_pointwise(m.kernel_size, m.stride, m.padding, m.dilation) and m.padding_mode == "zeros")


def conv_weight_standardized(state: AnalysisState, node: fx.Node) -> Any:
    """timm's StdConv2d family: weights are standardised over (in, kh, kw) per output filter, so
    input channels cannot be dropped without changing the statistics; outputs can."""
    m = _module(state, node)
    return _conv_like(state, node, str(node.target), m.in_channels, m.out_channels, m.groups,
                      math.prod(m.kernel_size), m.bias is not None, state.info(node.args[0]), slice_inputs=False)


@register_function(F.conv1d, F.conv2d, F.conv3d)
def conv_function(state: AnalysisState, node: fx.Node) -> Any:
    x, w = state.info(arg(node, 0, "input")), state.info(arg(node, 1, "weight"))
    groups = int(arg(node, 6, "groups", 1))
    shape_w = w.shape if isinstance(w, TensorInfo) else out_shape(arg(node, 1, "weight"))
    origin = w.origin if isinstance(w, TensorInfo) and w.origin and w.origin.axes[:2] == (0, 1) else None
    bias = arg(node, 2, "bias")
    name = origin.module if origin is not None and origin.param == "weight" else None
    if name is None and isinstance(w, TensorInfo) and w.track:
        state.pin_track(w, f"{node.name} uses computed weights")
    pointwise = _is_pointwise(tuple(shape_w[2:]), arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1))
    out = _conv_like(state, node, name, shape_w[1] * groups, shape_w[0], groups, math.prod(shape_w[2:]), False, x, pointwise=pointwise)
    _bias(state, node, bias, out.track[1])
    return out


def _linear_like(state: AnalysisState, node: fx.Node, name: str | None, fin: int, fout: int, has_bias: bool, x: Any) -> TensorInfo:
    shape = out_shape(node)
    last = len(shape) - 1
    out = TensorInfo(shape)
    in_ids = None
    if isinstance(x, TensorInfo):
        out.track = {a: ids for a, ids in x.track.items() if a != x.ndim - 1}
        in_ids = x.track.get(x.ndim - 1)
    if in_ids is not None:
        if name is not None:
            state.member(name, "weight", 1, in_ids, "in")
        else:
            state.pin(in_ids, f"{node.name} uses computed weights")
    out_ids = state.fresh(fout)
    if name is None:
        state.pin(out_ids, f"{node.name} uses computed weights")
    else:
        state.member(name, "weight", 0, out_ids, "out")
        if has_bias:
            state.member(name, "bias", 0, out_ids, "out")
    out.track[last] = out_ids
    _layer(state, node, "linear", 2 * math.prod(shape) * fin, (in_ids, fin), out)
    return out


@register_module(nn.Linear)
def linear_module(state: AnalysisState, node: fx.Node) -> Any:
    m = _module(state, node)
    return _linear_like(state, node, str(node.target), m.in_features, m.out_features, m.bias is not None, state.info(node.args[0]))


@register_function(F.linear)
def linear_function(state: AnalysisState, node: fx.Node) -> Any:
    w = state.info(arg(node, 1, "weight"))
    origin = w.origin if isinstance(w, TensorInfo) and w.origin and w.origin.axes == (0, 1) else None
    name = origin.module if origin is not None and origin.param == "weight" else None
    shape_w = w.shape if isinstance(w, TensorInfo) else out_shape(arg(node, 1, "weight"))
    out = _linear_like(state, node, name, shape_w[1], shape_w[0], False, state.info(arg(node, 0, "input")))
    _bias(state, node, arg(node, 2, "bias"), out.track[len(out.shape) - 1])
    return out


@register_module(nn.Embedding)
def embedding(state: AnalysisState, node: fx.Node) -> Any:
    out = TensorInfo(out_shape(node))
    ids = state.fresh(_module(state, node).embedding_dim)
    state.member(str(node.target), "weight", 1, ids, "out")
    out.track[out.ndim - 1] = ids
    return out


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
        for index, name in names:
            p = state.info(arg(node, index, name))
            if isinstance(p, TensorInfo) and p.origin is not None and p.ndim == 1:
                state.member(p.origin.module, p.origin.param, 0, ids, "norm")
            elif p is not None:
                state.pin(ids, f"{node.name} uses a computed {name}")
        if kind in ("layer", "rms") or (kind == "group" and groups == 1):
            node.meta[EXACT_STATS] = ("group1" if kind == "group" else kind, axis)
        return out
    return handler


register_function(F.batch_norm)(functional_norm("batch"))
register_function(F.group_norm)(functional_norm("group"))
register_function(F.layer_norm)(functional_norm("layer"))
if hasattr(F, "rms_norm"):
    register_function(F.rms_norm)(functional_norm("rms"))
