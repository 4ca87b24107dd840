"""Handlers for convolutions, linear layers (module or functional, their bias arguments) and
embeddings: the layers that produce new channels."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_common import arg, out_shape
from ._ops_layers import _layer
from ._registry import node_module, register_function, register_module
from ._tracking import AnalysisState, TensorInfo

__all__ = ["conv_module", "conv_function", "linear_module", "linear_function", "embedding",
           "shrink_conv", "shrink_linear"]


def _param_pieces(state: AnalysisState, value: Any) -> list[tuple[str, str, int]] | None:
    """A 1-D tensor argument as the parameters it is made of: ``[(module, param, length)]`` for a
    parameter (or buffer) itself or a ``torch.cat`` of them (BEiT/EVA build ``cat(q_bias, k_bias,
    v_bias)`` for a qkv projection); ``None`` when it is anything else."""
    info = state.info(value)
    if isinstance(info, TensorInfo) and info.origin is not None and info.ndim == 1 and info.origin.axes == (0,):
        # bias.exp() slices like the bias, but is not zero where the bias is masked: not a plain slice
        return [(info.origin.module, info.origin.param, info.shape[0])] if info.zero else None
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


def _bias(state: AnalysisState, node: fx.Node, bias: Any, out_ids: np.ndarray) -> bool:
    """Tie a bias argument to the output channels it is added to: its parameter(s) become members,
    a tracked bias is united with them; any other bias pins them. Returns whether removed output
    channels stay zero (the bias is zero there, or they are pinned)."""
    if bias is None:
        return True
    info = state.info(bias)
    if isinstance(info, TensorInfo) and 0 in info.track and info.ndim == 1:
        state.unite(out_ids, info.track[0])
        return 0 in info.zero
    pieces = _param_pieces(state, bias)
    if pieces is None or sum(n for _, _, n in pieces) != len(out_ids):
        state.pin(out_ids, f"{node.name} adds a computed bias")
        return True
    offset = 0
    for module, param, n in pieces:
        state.member(module, param, 0, out_ids[offset:offset + n], "out")
        offset += n
    return True


def _output_members(state: AnalysisState, name: str | None, has_bias: bool, out_ids: np.ndarray, fixed_reason: str) -> None:
    """A conv's or linear's output channels: its weight rows (and bias) when the weight is a
    parameter of module ``name``; pinned with ``fixed_reason`` when the weight is computed."""
    if name is None:
        state.pin(out_ids, fixed_reason)
        return
    state.member(name, "weight", 0, out_ids, "out")
    if has_bias:
        state.member(name, "bias", 0, out_ids, "out")


def _conv_like(state: AnalysisState, node: fx.Node, name: str | None, cin: int, cout: int, groups: int,
               kernel: int, has_bias: bool, x: Any, pointwise: bool = False, bias_member: bool = True) -> TensorInfo:
    """``has_bias``: a bias is added; ``bias_member``: it is the module's own ``bias`` (a member)."""
    shape = out_shape(node)
    in_ids = x.track.get(1) if isinstance(x, TensorInfo) else None
    out = TensorInfo(shape)
    flops = 2 * math.prod(shape) * (cin // groups) * kernel
    if groups == 1:
        if in_ids is not None:
            if name is not None:
                state.member(name, "weight", 1, in_ids, "in")
            else:
                state.pin(in_ids, f"{node.name} cannot drop input channels")
        out_ids = state.fresh(cout)
        contraction = (in_ids, cin)
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
    _output_members(state, name, has_bias and bias_member, out_ids, f"{node.name} computes its weights; its output channels are fixed")
    out.track[1] = out_ids
    zero = {1}  # a removed output channel: masked weight rows (and bias)
    if isinstance(x, TensorInfo):
        # channels on the spatial axes (CoaT's aggregate Conv1d over stacked tokens): a pointwise
        # conv keeps every position in place, so they pass; any other conv mixes them
        for axis, ids in x.track.items():
            if axis == 1:
                continue
            if axis >= 2 and pointwise and shape[axis] == x.shape[axis]:
                out.track[axis] = ids
                if axis in x.zero and not has_bias:
                    zero.add(axis)
            else:
                state.pin(ids, f"{node.name} convolves over axis {axis}, which carries channels")
    out.zero = frozenset(zero)
    _layer(state, node, "conv", flops, contraction, out)
    return out


def _is_pointwise(kernel: Any, stride: Any, padding: Any, dilation: Any) -> bool:
    """A 1x1 conv with stride 1 and no padding: output position i reads input position i only."""
    def all_equal(v: Any, value: int) -> bool:
        return all(int(e) == value for e in (v if isinstance(v, (list, tuple)) else [v]))
    no_padding = padding in ("same", "valid") or (not isinstance(padding, str) and all_equal(padding, 0))
    return all_equal(kernel, 1) and all_equal(stride, 1) and all_equal(dilation, 1) and no_padding


def shrink_conv(module: nn.Module, old: nn.Module) -> None:
    """Channel counts (and the group count: whole conv groups go) from the sliced weight."""
    w = module.weight
    module.out_channels = int(w.shape[0])
    if old.groups > 1:
        module.groups = old.groups * module.out_channels // old.out_channels
    module.in_channels = int(w.shape[1]) * module.groups


def shrink_linear(module: nn.Module, old: nn.Module) -> None:
    module.out_features, module.in_features = int(module.weight.shape[0]), int(module.weight.shape[1])


def _shrink_embedding(module: nn.Module, old: nn.Module) -> None:
    module.embedding_dim = int(module.weight.shape[1])


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, shrink=shrink_conv)
def conv_module(state: AnalysisState, node: fx.Node) -> Any:
    m = node_module(state.gm, node)
    return _conv_like(state, node, str(node.target), m.in_channels, m.out_channels, m.groups,
                      math.prod(m.kernel_size), m.bias is not None, state.info(node.args[0]),
                      pointwise=_is_pointwise(m.kernel_size, m.stride, m.padding, m.dilation) and m.padding_mode == "zeros")


@register_function(F.conv1d, F.conv2d, F.conv3d)
def conv_function(state: AnalysisState, node: fx.Node) -> Any:
    x, w = state.info(arg(node, 0, "input")), state.info(arg(node, 1, "weight"))
    groups = int(arg(node, 6, "groups", 1))
    shape_w = w.shape if isinstance(w, TensorInfo) else out_shape(arg(node, 1, "weight"))
    origin = w.origin if isinstance(w, TensorInfo) and w.origin and w.origin.axes[:2] == (0, 1) else None
    bias = arg(node, 2, "bias")
    name = origin.module if origin is not None and origin.param == "weight" and w.zero else None
    if name is None and isinstance(w, TensorInfo) and w.track:
        state.pin_track(w, f"{node.name} uses computed weights")
    pointwise = _is_pointwise(tuple(shape_w[2:]), arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1))
    out = _conv_like(state, node, name, shape_w[1] * groups, shape_w[0], groups, math.prod(shape_w[2:]), bias is not None, x,
                     pointwise=pointwise, bias_member=False)
    if not _bias(state, node, bias, out.track[1]):
        out.zero = out.zero - {1}
    return out


def _linear_like(state: AnalysisState, node: fx.Node, name: str | None, fin: int, fout: int, has_bias: bool, x: Any,
                 bias_member: bool = True) -> TensorInfo:
    """``has_bias``: a bias is added; ``bias_member``: it is the module's own ``bias`` (a member)."""
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
    _output_members(state, name, has_bias and bias_member, out_ids, f"{node.name} uses computed weights")
    out.track[last] = out_ids
    # removed outputs: masked weight rows (and bias); channels on the leading axes pass, and a
    # bias makes them non-zero (an MLP-Mixer token-mixing Linear adds its bias to every channel)
    passing = x.zero if isinstance(x, TensorInfo) and not has_bias else frozenset()
    out.zero = frozenset(a for a in passing if a in out.track and a != last) | {last}
    _layer(state, node, "linear", 2 * math.prod(shape) * fin, (in_ids, fin), out)
    return out


@register_module(nn.Linear, shrink=shrink_linear)
def linear_module(state: AnalysisState, node: fx.Node) -> Any:
    m = node_module(state.gm, node)
    return _linear_like(state, node, str(node.target), m.in_features, m.out_features, m.bias is not None, state.info(node.args[0]))


@register_function(F.linear)
def linear_function(state: AnalysisState, node: fx.Node) -> Any:
    w = state.info(arg(node, 1, "weight"))
    origin = w.origin if isinstance(w, TensorInfo) and w.origin and w.origin.axes == (0, 1) else None
    name = origin.module if origin is not None and origin.param == "weight" and w.zero else None
    shape_w = w.shape if isinstance(w, TensorInfo) else out_shape(arg(node, 1, "weight"))
    bias = arg(node, 2, "bias")
    out = _linear_like(state, node, name, shape_w[1], shape_w[0], bias is not None, state.info(arg(node, 0, "input")), bias_member=False)
    last = len(out.shape) - 1
    if not _bias(state, node, bias, out.track[last]):
        out.zero = out.zero - {last}
    return out


@register_module(nn.Embedding, shrink=_shrink_embedding)
def embedding(state: AnalysisState, node: fx.Node) -> Any:
    out = TensorInfo(out_shape(node))
    ids = state.fresh(node_module(state.gm, node).embedding_dim)
    state.member(str(node.target), "weight", 1, ids, "out")
    out.track[out.ndim - 1] = ids
    out.zero = frozenset({out.ndim - 1})  # masked weight columns
    return out
