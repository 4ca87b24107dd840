"""Handlers for position-wise ops of one tensor (activations, clamps), reductions and pooling;
ops of several tensors (sums, products, ``where``) are in ``_ops_binary``."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_common import arg, axes_of, combine_elementwise, is_number, out_shape, untracked_like, zero_axes
from ._registry import node_module, register_function, register_method, register_module
from ._tracking import AnalysisState, ParamOrigin, TensorInfo

# position-wise ops by what they do to a zero (a removed channel in the masked model):
# map it to zero, to something else (sigmoid(0) = 0.5), or depending on their bounds/exponent
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.LeakyReLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU,
    nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Tanhshrink, nn.Softsign,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.tanh, F.hardswish, F.leaky_relu, F.mish, F.elu, F.celu, F.selu,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.relu, torch.tanh, torch.sqrt, torch.abs, torch.neg,
    torch.erf, torch.sin, torch.square, torch.sign, torch.nan_to_num, torch.clone, operator.neg, operator.pos,
    torch.Tensor.contiguous,
)
_UNARY_METHODS = (
    "relu", "relu_", "tanh", "tanh_", "sqrt", "abs", "neg", "erf", "sin", "square", "sign", "contiguous", "clone",
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "cuda", "cpu", "gelu", "silu", "hardswish",
    "requires_grad_", "nan_to_num",
)
_SHIFTING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.AlphaDropout)
_SHIFTING_FUNCTIONS = (
    F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, F.alpha_dropout, torch.sigmoid, torch.exp, torch.log,
    torch.rsqrt, torch.cos,
)
_SHIFTING_METHODS = ("sigmoid", "sigmoid_", "exp", "exp_", "log", "rsqrt", "cos")


def _first(state: AnalysisState, node: fx.Node) -> Any:
    return state.info(node.args[0]) if node.args else None


def _position_wise(state: AnalysisState, node: fx.Node, keeps_zero: bool) -> Any:
    """Channels pass through unchanged (a parameter stays a parameter view); ``keeps_zero``: the
    op maps 0 to 0, so removed channels that were zero stay zero."""
    info = _first(state, node)
    if node.op == "call_module" and isinstance(node_module(state.gm, node), nn.PReLU):
        module = node_module(state.gm, node)
        if module.weight.numel() > 1 and isinstance(info, TensorInfo) and 1 in info.track:
            state.member(str(node.target), "weight", 0, info.track[1], "norm")
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    shape = out_shape(node)
    others = [state.info(a) for a in list(node.args[1:]) + list(node.kwargs.values())]
    if node.target not in ("to", "type", "type_as") and any(isinstance(o, TensorInfo) for o in others):
        operands = [info, *others]  # e.g. x.pow(y), clamp(x, lo_tensor)
    elif not isinstance(shape, tuple):
        return untracked_like(node)
    elif shape == info.shape:
        return TensorInfo(shape, dict(info.track), info.origin, info.zero if keeps_zero else frozenset())
    else:
        operands = [info]
    out = combine_elementwise(state, node, operands, shape)
    out.zero = zero_axes(state, [info], shape) if keeps_zero else frozenset()
    return out


@register_module(*_ACTIVATION_MODULES)
@register_module(nn.Identity, view=True)
@register_function(*_UNARY_FUNCTIONS)
@register_function(torch.detach, view=True)
@register_method(*_UNARY_METHODS)
@register_method("detach", view=True)
def unary(state: AnalysisState, node: fx.Node) -> Any:
    """Position-wise ops that map 0 to 0."""
    return _position_wise(state, node, keeps_zero=True)


@register_module(*_SHIFTING_MODULES)
@register_function(*_SHIFTING_FUNCTIONS)
@register_method(*_SHIFTING_METHODS)
def shifting(state: AnalysisState, node: fx.Node) -> Any:
    """Position-wise ops that map 0 to something else (sigmoid(0) = 0.5, exp(0) = 1): removed
    channels are no longer zero."""
    return _position_wise(state, node, keeps_zero=False)


def _constant(state: AnalysisState, value: Any) -> torch.Tensor | None:
    """A literal number, or a buffer the graph reads (fixed clamp limits: Gemma4's clipped
    Linear), as a tensor; ``None`` for anything computed or trained."""
    if is_number(value):
        return torch.tensor(float(value))
    if isinstance(value, fx.Node) and value.op == "get_attr":
        module, _, name = str(value.target).rpartition(".")
        owner = state.gm.get_submodule(module) if module else state.gm
        if name in dict(owner.named_buffers(recurse=False)):
            return getattr(owner, name)
    return None


def _within(state: AnalysisState, low: Any, high: Any) -> bool:
    """Whether 0 lies between two bounds (``None``: unbounded)."""
    lo = None if low is None else _constant(state, low)
    hi = None if high is None else _constant(state, high)
    return (low is None or lo is not None and bool((lo <= 0).all())) and (high is None or hi is not None and bool((hi >= 0).all()))


@register_module(nn.Hardtanh)
@register_function(F.hardtanh, torch.clamp, torch.clip)
@register_method("clamp", "clamp_", "clamp_min", "clamp_max", "clip", "pow", "pow_")
def bounded(state: AnalysisState, node: fx.Node) -> Any:
    """clamp/hardtanh (0 maps to 0 when it lies between the bounds) and x.pow(e) (when e > 0)."""
    if node.target in ("pow", "pow_"):
        exponent = arg(node, 1, "exponent")
        return _position_wise(state, node, keeps_zero=is_number(exponent) and exponent > 0)
    if node.op == "call_module":
        m = node_module(state.gm, node)
        low, high = m.min_val, m.max_val
    elif node.target is F.hardtanh:
        low, high = arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)
    elif node.target == "clamp_min":
        low, high = arg(node, 1, "min"), None
    elif node.target == "clamp_max":
        low, high = None, arg(node, 1, "max")
    else:
        low, high = arg(node, 1, "min"), arg(node, 2, "max")
    return _position_wise(state, node, keeps_zero=_within(state, low, high))


_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "median", "argmax", "argmin")
_REDUCTIONS_KEEPING_ZERO = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "prod", "median")  # of a zero slice: 0


def _reduce(state: AnalysisState, node: fx.Node, kind: str) -> Any:
    """Reductions over dims. Over channels only a sum of channels that are zero where removed
    keeps the pruned model equal to the masked one; any other reduction of channels pins them."""
    info = _first(state, node)
    shape = out_shape(node)
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    dims = arg(node, 1, "dim", None)
    if kind == "norm":
        dims = arg(node, 2, "dim", None)
    keepdim = bool(arg(node, 2 if kind != "norm" else 3, "keepdim", False))
    if isinstance(dims, fx.Node):
        state.pin_track(info, f"{node.name} reduces over a dimension only known at run time")
        return untracked_like(node)
    reduced = axes_of(dims, info.ndim)
    result_shape = shape if isinstance(shape, tuple) else shape[0]
    out = TensorInfo(result_shape)
    zero = set()
    for axis, ids in info.track.items():
        if axis in reduced:
            if kind != "sum":
                state.pin(ids, f"{node.name} takes the {kind} over channels (removing zeroed channels would change it)")
            elif axis not in info.zero:
                state.pin(ids, f"{node.name} sums over channels that are not zero where removed in the masked model "
                               f"(an op before it maps 0 to non-zero)")
            continue
        new_axis = axis if keepdim else axis - sum(1 for r in reduced if r < axis)
        out.track[new_axis] = ids
        if axis in info.zero and kind in _REDUCTIONS_KEEPING_ZERO:
            zero.add(new_axis)
    out.zero = frozenset(zero)
    if isinstance(shape, tuple):
        return out
    return [out] + [TensorInfo(s, dict(out.track)) for s in shape[1:]]  # (values, indices)


for _kind in _REDUCTIONS:
    register_method(_kind)(lambda state, node, _k=_kind: _reduce(state, node, _k))
    if hasattr(torch, _kind):
        register_function(getattr(torch, _kind))(lambda state, node, _k=_kind: _reduce(state, node, _k))


def _along_dim(state: AnalysisState, node: fx.Node, keeps_zero: bool) -> Any:
    """Ops that mix (or shift) the positions along one dim: channels on that dim are pinned.
    ``keeps_zero``: a slice that is zero stays zero (not softmax's uniform weights)."""
    info = _first(state, node)
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    zero = info.zero if keeps_zero else frozenset()
    if node.op == "call_module":
        dim = getattr(node_module(state.gm, node), "dim", None)
    elif node.target in (torch.roll, "roll"):
        dims = arg(node, 2, "dims", None)
        if dims is None:
            state.pin_track(info, f"{node.name} rolls the flattened tensor")
            return TensorInfo(out_shape(node))
        for d in ([dims] if isinstance(dims, int) else dims):
            axis = d % info.ndim
            if axis in info.track:
                state.pin(info.track[axis], f"{node.name} rolls channels along dim {d}")
        return TensorInfo(out_shape(node), dict(info.track), zero=zero)
    else:
        dim = arg(node, 1 if node.target is not F.normalize else 2, "dim", 1 if node.target is F.normalize else None)
    if dim is None:
        state.pin_track(info, f"{node.name} mixes every position")
        return TensorInfo(info.shape, dict(info.track))
    axis = dim + info.ndim if dim < 0 else dim
    if axis in info.track:
        state.pin(info.track[axis], f"{node.name} ({node.target}) mixes channels along dim {dim}")
    return TensorInfo(out_shape(node), dict(info.track), zero=zero)


@register_function(torch.cumsum, F.normalize, torch.roll)
@register_method("cumsum", "roll")
def along_dim(state: AnalysisState, node: fx.Node) -> Any:
    return _along_dim(state, node, keeps_zero=True)


@register_module(nn.Softmax, nn.LogSoftmax)
@register_function(torch.softmax, F.softmax, F.log_softmax, torch.log_softmax)
@register_method("softmax", "log_softmax")
def softmax(state: AnalysisState, node: fx.Node) -> Any:
    return _along_dim(state, node, keeps_zero=False)


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2, nn.Upsample: 2,
    nn.MaxPool3d: 3, nn.AvgPool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.ZeroPad2d: 2, nn.ConstantPad2d: 2,
    nn.ReflectionPad2d: 2, nn.ReplicationPad2d: 2, nn.PixelShuffle: -1, nn.PixelUnshuffle: -1,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.interpolate: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.pad: -2, F.lp_pool2d: 2,
}


def _spatial_count(state: AnalysisState, node: fx.Node, ndim: int) -> int:
    if node.op == "call_module":
        count = _POOL_MODULES[type(node_module(state.gm, node))]
    else:
        count = _POOL_FUNCTIONS[node.target]
    if count == -2:  # F.pad: see _padded_axes
        return ndim - 1
    if count in (-1,):
        return ndim  # pixel (un)shuffle mixes channels with space: every axis is "spatial"
    if node.target is F.interpolate:
        return ndim - 2
    return count


def _padded_axes(node: fx.Node, ndim: int) -> set[int]:
    """Axes F.pad may pad: all but those whose two pad amounts are literal zeros (an NHWC window
    partition pads H and W by amounts computed at run time and the channel axis by (0, 0))."""
    pad = arg(node, 1, "pad", ())
    if not isinstance(pad, (list, tuple)):
        return set(range(ndim))
    return {ndim - 1 - k for k in range(len(pad) // 2)
            if not (isinstance(pad[2 * k], int) and isinstance(pad[2 * k + 1], int) and pad[2 * k] == 0 and pad[2 * k + 1] == 0)}


@register_module(*_POOL_MODULES)
@register_function(*_POOL_FUNCTIONS)
def pooling(state: AnalysisState, node: fx.Node) -> Any:
    """Ops on trailing spatial dims: channels on leading dims pass; channels on spatial dims pin."""
    info = _first(state, node)
    shape = out_shape(node)
    if not isinstance(info, TensorInfo) or not isinstance(shape, tuple):
        state.pin_track(info, f"{node.name} returns several tensors")
        return untracked_like(node)
    spatial = _spatial_count(state, node, info.ndim)
    moved = _padded_axes(node, info.ndim) if node.target is F.pad else set(range(info.ndim - spatial, info.ndim))
    out = TensorInfo(shape)
    for axis, ids in info.track.items():
        if axis in moved or shape[axis] != info.shape[axis]:
            state.pin(ids, f"{node.name} works across channels on axis {axis}")
        else:
            out.track[axis] = ids
    if not _pads_with_non_zero(state, node):  # pooling, resampling or padding a zero slice: zero
        out.zero = frozenset(a for a in out.track if a in info.zero)
    return out


def _pads_with_non_zero(state: AnalysisState, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(node_module(state.gm, node), nn.ConstantPad2d) and node_module(state.gm, node).value != 0
    if node.target is F.pad:
        value = arg(node, 3, "value", None)
        return arg(node, 2, "mode", "constant") == "constant" and value is not None and value != 0
    return False


def origin_view(info: Any, shape: tuple[int, ...], axes: tuple[int | None, ...]) -> Any:
    """Keep a parameter's origin through a view that only adds/drops/permutes size-1 axes."""
    if isinstance(info, TensorInfo) and info.origin is not None and not info.track:
        return TensorInfo(shape, {}, ParamOrigin(info.origin.module, info.origin.param, axes))
    return None


def _register_torchvision() -> None:
    """torchvision's ``stochastic_depth`` (a wrapped function in its graphs): it scales whole
    samples (or the batch), so channels pass as through any element-wise op."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional for graph_passes
        return
    register_function(stochastic_depth)(unary)


_register_torchvision()
