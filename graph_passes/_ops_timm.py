"""timm's own layer types: registered as leaves with the handler of the torch layer they behave as."""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _ops_conv_linear as conv_linear
from . import _ops_norms as norms
from ._ops_common import out_shape, untracked_like
from ._registry import module_handler, node_module, register_eager, register_function, register_module
from ._tracking import AnalysisState
from .tracing import register_leaf_type

logger = logging.getLogger(__name__)


def _types(*names: str) -> list[type]:
    try:
        import timm.layers as tl
    except ImportError:
        return []
    return [getattr(tl, n) for n in names if isinstance(getattr(tl, n, None), type)]


def _register(handler: Callable[[AnalysisState, fx.Node], Any], like: type[nn.Module], *names: str, freeze: Any = None) -> None:
    """timm.layers' ``names`` as leaves with ``handler``; the speedup treats them ``like`` that
    torch layer (its rewrite and shrink rules)."""
    types = _types(*names)
    entry = module_handler(like)
    assert entry is not None, like
    for t in types:
        register_leaf_type(t)
    if types:
        register_module(*types, rewrite=entry.rewrite, shrink=entry.shrink, freeze=freeze)(handler)


def _exact(kind: str, axis: int) -> Callable[[AnalysisState, fx.Node], Any]:
    def handler(state: AnalysisState, node: fx.Node) -> Any:
        m = node_module(state.gm, node)
        if len(getattr(m, "normalized_shape", (0,))) != 1:
            state.pin_track(state.info(node.args[0]), f"{node.name} normalises over several dims")
            return untracked_like(node)
        return norms.norm(state, node, axis, ("weight", "bias"), exact=kind)
    return handler


def _freeze_standardized(module: nn.Module, slices: Mapping[str, Mapping[int, Any]]) -> nn.Module | None:
    """timm's StdConv2d family standardises each filter over its inputs (and ScaledStdConv2d
    scales it by ``gain``) at every call: removing input channels from the parameters would change
    the statistics. Before inputs go, the conv becomes a plain one holding the standardised
    weight it computes (exact; the pruned model no longer re-standardises when fine-tuned)."""
    if 1 not in slices.get("weight", {}):
        return None  # output filters are standardised one by one: slicing them is exact
    gain = getattr(module, "gain", None)
    with torch.no_grad():
        weight = F.batch_norm(module.weight.reshape(1, module.out_channels, -1), None, None,
                              weight=None if gain is None else (gain * module.scale).view(-1),
                              training=True, momentum=0.0, eps=module.eps).reshape_as(module.weight)
    same = bool(getattr(module, "same_pad", False))
    cls = _types("Conv2dSame")[0] if same else nn.Conv2d
    plain = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=0 if same else module.padding, dilation=module.dilation, groups=module.groups,
                bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    plain.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return plain.train(module.training)


def _scaled_std_conv(state: AnalysisState, node: fx.Node) -> Any:
    out = conv_linear.conv_module(state, node)
    m = node_module(state.gm, node)
    if getattr(m, "gain", None) is not None:
        state.member(str(node.target), "gain", 0, out.track[1], "out")
    return out


_register(conv_linear.conv_module, nn.Conv2d, "Conv2dSame")
_register(conv_linear.conv_module, nn.Conv2d, "StdConv2d", "StdConv2dSame", freeze=_freeze_standardized)
_register(_scaled_std_conv, nn.Conv2d, "ScaledStdConv2d", "ScaledStdConv2dSame", freeze=_freeze_standardized)
_register(conv_linear.linear_module, nn.Linear, "Linear")
_register(_exact("layer", -1), nn.LayerNorm, "LayerNorm", "LayerNormAct")
_register(_exact("rms", -1), nn.LayerNorm, "RmsNorm")
_register(_exact("simple", -1), nn.LayerNorm, "SimpleNorm")
_register(_exact("layer", 1), nn.LayerNorm, "LayerNorm2d", "LayerNormAct2d")
_register(_exact("rms", 1), nn.LayerNorm, "RmsNorm2d")
_register(_exact("simple", 1), nn.LayerNorm, "SimpleNorm2d")
_register(norms.batch_norm, nn.BatchNorm2d, "BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNorm2d", "FrozenBatchNormAct2d", "BatchNorm2d")
_register(norms.group_norm, nn.GroupNorm, "GroupNorm", "GroupNorm1", "GroupNormAct")


def _resample_pos_embed(state: AnalysisState, node: fx.Node) -> Any:
    """timm's position-embedding resampling interpolates over tokens; channels (last dim) pass."""
    from ._tracking import ParamOrigin, TensorInfo

    info = state.info(node.args[0])
    shape = out_shape(node)
    if not isinstance(info, TensorInfo) or not isinstance(shape, tuple) or len(shape) != info.ndim:
        state.pin_track(info, f"{node.name} resamples an embedding")
        return untracked_like(node)
    last = info.ndim - 1
    out = TensorInfo(shape, {a: ids for a, ids in info.track.items() if a == last}, zero=info.zero & {last})
    for a, ids in info.track.items():
        if a != last:
            state.pin(ids, f"{node.name} interpolates over axis {a}")
    if info.origin is not None and not info.track:
        axes = tuple(info.origin.axes[i] if i == last else None for i in range(len(shape)))
        out.origin = ParamOrigin(info.origin.module, info.origin.param, axes)
        out.zero = info.all_axes_if_zero(len(shape))  # interpolating a masked (zero) column: zero
    return out


try:
    from timm.layers import pos_embed as _timm_pos_embed

    register_function(*[f for f in (getattr(_timm_pos_embed, "resample_abs_pos_embed", None),
                                    getattr(_timm_pos_embed, "resample_abs_pos_embed_nhwc", None)) if f])(_resample_pos_embed)
except ImportError:  # timm is optional
    pass


def _channel_axis_passes(axis: int) -> Callable[[AnalysisState, fx.Node], Any]:
    """timm's window/grid (un)partition helpers move spatial blocks; the channel axis passes."""

    def handler(state: AnalysisState, node: fx.Node) -> Any:
        from ._tracking import TensorInfo

        info = state.info(node.args[0])
        shape = out_shape(node)
        if not isinstance(info, TensorInfo) or not isinstance(shape, tuple):
            return untracked_like(node)
        src, dst = axis % info.ndim, axis % len(shape)
        out = TensorInfo(shape, zero=frozenset({dst}) if src in info.zero else frozenset())
        for a, ids in info.track.items():
            if a == src and shape[dst] == info.shape[src]:
                out.track[dst] = ids
            else:
                state.pin(ids, f"{node.name} moves channels on axis {a}")
        return out

    return handler


def _register_model_functions() -> None:
    import importlib

    table = {
        -1: [("swin_transformer", "window_reverse"), ("swin_transformer_v2", "window_reverse"),
             ("swin_transformer_v2_cr", "window_reverse"), ("davit", "window_reverse"), ("gcvit", "window_reverse"),
             ("maxxvit", "window_reverse"), ("maxxvit", "grid_reverse"), ("nest", "deblockify")],
        1: [("maxxvit", "window_reverse_nchw"), ("maxxvit", "grid_reverse_nchw")],
    }
    for axis, entries in table.items():
        for module_name, fn_name in entries:
            try:
                fn = getattr(importlib.import_module(f"timm.models.{module_name}"), fn_name)
            except (ImportError, AttributeError):
                continue
            register_function(fn)(_channel_axis_passes(axis))


_register_model_functions()


def _register_same_pools() -> None:
    """timm's MaxPool2dSame/AvgPool2dSame: 'same' padding then a 2-D pool; channels pass."""
    from . import _ops_elementwise as elementwise

    try:
        from timm.layers import pool2d_same
    except ImportError:
        return
    types = [t for t in (getattr(pool2d_same, "MaxPool2dSame", None), getattr(pool2d_same, "AvgPool2dSame", None)) if isinstance(t, type)]
    for t in types:
        elementwise._POOL_MODULES[t] = 2
    if types:
        register_module(*types)(elementwise.pooling)


_register_same_pools()


def _attention_sizes(module: nn.Module) -> dict[str, Any]:
    """timm's multi-head attentions reshape their projections with ``self.num_heads`` and
    ``self.head_dim`` (or ``dim_head``) and write ``attn_dim`` back: those follow the pruned
    projection. The channel analysis keeps channels on the larger of the head count and the head
    width (see ``_ops_shape.reshape``), so that one shrank. With a narrower head the fused kernel
    would rescale by the new width: the module's own path with its stored ``scale`` is used."""
    name = next((n for n in ("head_dim", "dim_head") if isinstance(getattr(module, n, None), int)), None)
    if name is None:
        return {}  # the head width is not stored: nothing to update (the check finds a forward that cannot follow)
    heads, width = int(module.num_heads), int(getattr(module, name))
    if getattr(module, "num_kv_heads", heads) != heads:
        return {}  # grouped-query attention: k and v have other widths
    proj = getattr(module, "qkv", None)
    if proj is not None:
        total = (proj.out_features if isinstance(proj, nn.Linear) else proj.out_channels) // 3
    else:
        proj = getattr(module, "q_proj", None) or getattr(module, "q", None)
        total = proj.out_features if isinstance(proj, nn.Linear) else heads * width
    if total == heads * width:
        return {}
    if total % heads == 0 and (width >= heads or total % width):
        width = total // heads
    else:
        heads = total // width
    sizes: dict[str, Any] = {name: width, "num_heads": heads}
    for attr in ("attn_dim", "all_head_dim"):
        if isinstance(getattr(module, attr, None), int):
            sizes[attr] = heads * width
    if sizes[name] != getattr(module, name) and getattr(module, "fused_attn", False):
        sizes["fused_attn"] = False
    return sizes


def _register_attentions() -> None:
    import importlib

    for module_name, names in (("timm.layers.attention", ("Attention", "AttentionRope")),
                               ("timm.layers.attention_pool", ("AttentionPoolLatent",)),
                               ("timm.models.vision_transformer_relpos", ("RelPosAttention",)),
                               ("timm.models.eva", ("EvaAttention",)),
                               ("timm.models.maxxvit", ("Attention2d", "AttentionCl"))):
        try:
            found = importlib.import_module(module_name)
        except ImportError:
            continue
        types = [getattr(found, n) for n in names if isinstance(getattr(found, n, None), type)]
        if types:
            register_eager(*types)(_attention_sizes)


_register_attentions()
