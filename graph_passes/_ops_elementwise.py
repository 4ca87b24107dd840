"""Handlers for element-wise ops, activations, reductions and pooling."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_common import arg, axes_of, combine_elementwise, out_shape, untracked_like
from ._registry import BINARY_OPERATORS, TORCH_BINARY, register_function, register_method, register_module
from ._tracking import AnalysisState, ParamOrigin, TensorInfo

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.PReLU, nn.Hardtanh, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Tanhshrink,
    nn.Softsign, nn.LogSigmoid,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.mish,
    F.elu, F.celu, F.selu, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.clamp, torch.clip, torch.erf, torch.sin, torch.cos, torch.square, torch.sign, torch.nan_to_num,
    torch.clone, operator.neg, operator.pos, torch.Tensor.contiguous, F.logsigmoid,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp",
    "clamp_", "clamp_min", "clamp_max", "clip", "erf", "sin", "cos", "square", "sign", "contiguous", "clone",
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "cuda", "cpu", "pow", "pow_", "exp_",
    "gelu", "silu", "hardswish", "requires_grad_", "nan_to_num",
)
_BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "where", "masked_fill", "addcmul")


def _first(state: AnalysisState, node: fx.Node) -> Any:
    return state.info(node.args[0]) if node.args else None


@register_module(*_ACTIVATION_MODULES)
@register_module(nn.Identity, view=True)
@register_function(*_UNARY_FUNCTIONS)
@register_function(torch.detach, view=True)
@register_method(*_UNARY_METHODS)
@register_method("detach", view=True)
def unary(state: AnalysisState, node: fx.Node) -> Any:
    """Position-wise ops: channels pass through unchanged (a parameter stays a parameter view)."""
    info = _first(state, node)
    if node.op == "call_module" and isinstance(state.gm.get_submodule(str(node.target)), nn.PReLU):
        module = state.gm.get_submodule(str(node.target))
        if module.weight.numel() > 1 and isinstance(info, TensorInfo) and 1 in info.track:
            state.member(str(node.target), "weight", 0, info.track[1], "norm")
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    shape = out_shape(node)
    others = [state.info(a) for a in list(node.args[1:]) + list(node.kwargs.values())]
    if node.target not in ("to", "type", "type_as") and any(isinstance(o, TensorInfo) for o in others):
        return combine_elementwise(state, node, [info, *others], shape)  # e.g. x.pow(y), clamp(x, lo_tensor)
    if not isinstance(shape, tuple) or shape != info.shape:
        return combine_elementwise(state, node, [info], shape) if isinstance(shape, tuple) else untracked_like(node)
    return TensorInfo(shape, dict(info.track), info.origin)


@register_function(*BINARY_OPERATORS, *TORCH_BINARY, torch.addcmul, torch.lerp)
@register_method(*_BINARY_METHODS)
def binary(state: AnalysisState, node: fx.Node) -> Any:
    shape = out_shape(node)
    if not isinstance(shape, tuple):
        return None  # arithmetic on Python numbers (shapes)
    operands = [state.info(a) for a in node.args] + [state.info(v) for v in node.kwargs.values()]
    return combine_elementwise(state, node, operands, shape)


_REDUCTIONS_SAFE = ("sum",)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "median", "argmax", "argmin")


def _reduce(state: AnalysisState, node: fx.Node, kind: str) -> Any:
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
    for axis, ids in info.track.items():
        if axis in reduced:
            if kind not in _REDUCTIONS_SAFE:
                state.pin(ids, f"{node.name} takes the {kind} over channels (removing zeroed channels would change it)")
            continue
        new_axis = axis if keepdim else axis - sum(1 for r in reduced if r < axis)
        out.track[new_axis] = ids
    if isinstance(shape, tuple):
        return out
    return [out] + [TensorInfo(s, dict(out.track)) for s in shape[1:]]  # (values, indices)


for _kind in _REDUCTIONS:
    register_method(_kind)(lambda state, node, _k=_kind: _reduce(state, node, _k))
    if hasattr(torch, _kind):
        register_function(getattr(torch, _kind))(lambda state, node, _k=_kind: _reduce(state, node, _k))


@register_module(nn.Softmax, nn.LogSoftmax)
@register_function(torch.softmax, F.softmax, F.log_softmax, torch.log_softmax, torch.cumsum, F.normalize, torch.roll)
@register_method("softmax", "log_softmax", "cumsum", "roll")
def along_dim(state: AnalysisState, node: fx.Node) -> Any:
    """Ops that mix (or shift) the positions along one dim: channels on that dim are pinned."""
    info = _first(state, node)
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    if node.op == "call_module":
        dim = getattr(state.gm.get_submodule(str(node.target)), "dim", None)
    elif node.target in (torch.roll, "roll"):
        dims = arg(node, 2, "dims", None)
        if dims is None:
            state.pin_track(info, f"{node.name} rolls the flattened tensor")
            return TensorInfo(out_shape(node))
        for d in ([dims] if isinstance(dims, int) else dims):
            axis = d % info.ndim
            if axis in info.track:
                state.pin(info.track[axis], f"{node.name} rolls channels along dim {d}")
        return TensorInfo(out_shape(node), dict(info.track))
    else:
        dim = arg(node, 1 if node.target is not F.normalize else 2, "dim", 1 if node.target is F.normalize else None)
    if dim is None:
        state.pin_track(info, f"{node.name} mixes every position")
        return TensorInfo(info.shape, dict(info.track))
    axis = dim + info.ndim if dim < 0 else dim
    if axis in info.track:
        state.pin(info.track[axis], f"{node.name} ({node.target}) mixes channels along dim {dim}")
    return TensorInfo(out_shape(node), dict(info.track))


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
        count = _POOL_MODULES[type(state.gm.get_submodule(str(node.target)))]
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
    return out


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
