"""Handlers for norms: batch, layer, RMS and group norms (modules and functions), with what the
speedup does to them. Norms whose statistics span the channels (layer/RMS/one-group norms) are
swapped for :class:`~graph_passes.modules.ExactStatsNorm` when channels go, so the pruned model
still equals the masked one."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_common import arg, out_shape, untracked_like
from ._registry import Keeper, node_module, register_eager, register_function, register_module
from ._tracking import EXACT_STATS, AnalysisState, TensorInfo, tracked
from .modules import ExactStatsNorm, exact_stats_norm
from .tracing import register_leaf_function, register_leaf_type

__all__ = ["norm", "BN_PARAMS", "shrink_batch_norm", "shrink_group_norm", "shrink_normalized_shape", "rewrite_exact_norm"]


# --- speedup -------------------------------------------------------------------------------

def shrink_batch_norm(module: nn.Module, old: nn.Module) -> None:
    ref = getattr(module, "running_mean", None)
    ref = ref if isinstance(ref, torch.Tensor) else getattr(module, "weight", None)
    if isinstance(ref, torch.Tensor):
        module.num_features = int(ref.shape[0])


def shrink_group_norm(module: nn.Module, old: nn.Module) -> None:
    w = getattr(module, "weight", None)
    new = int(w.shape[0]) if isinstance(w, torch.Tensor) else old.num_channels
    module.num_groups = max(1, old.num_groups * new // old.num_channels) if old.num_groups > 1 else 1
    module.num_channels = new


def shrink_normalized_shape(module: nn.Module, old: nn.Module) -> None:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        module.normalized_shape = (int(w.shape[0]),)


def rewrite_exact_norm(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """A norm whose statistics span pruned channels becomes an exact-statistics norm: the module
    is replaced (timm's norm+act layers keep their drop and act after it), a function call is
    redirected to :func:`exact_stats_norm`."""
    src = tracked(node.args[0])
    if EXACT_STATS not in node.meta or not isinstance(src, TensorInfo):
        return
    kind, axis = node.meta[EXACT_STATS]
    axis = axis % src.ndim
    old_c, new_c = src.shape[axis], keeper.new_shape(src)[axis]
    if old_c == new_c:
        return
    reduce_all = kind == "group1"
    kind = "layer" if kind == "group1" else kind
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        eps = getattr(m, "eps", 1e-5)  # None (RMSNorm's default) means the dtype's epsilon
        replacement: nn.Module = ExactStatsNorm(kind, axis if not reduce_all else 1, reduce_all, old_c, getattr(m, "weight", None), getattr(m, "bias", None), eps)
        drop, act = getattr(m, "drop", None), getattr(m, "act", None)
        if isinstance(drop, nn.Module) or isinstance(act, nn.Module):  # timm's norm+act layers: norm, drop, act
            replacement = nn.Sequential(replacement, *(x for x in (drop, act) if isinstance(x, nn.Module)))
        parent, _, name = str(node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, replacement)
        return
    x = node.args[0]
    if node.target in (F.layer_norm, F.group_norm):
        weight, bias, eps = (arg(node, i, k, d) for i, k, d in ((2, "weight", None), (3, "bias", None), (4, "eps", 1e-5)))
    else:  # rms_norm(x, normalized_shape, weight, eps)
        weight, bias, eps = arg(node, 2, "weight"), None, arg(node, 3, "eps")
    node.target = exact_stats_norm
    node.args = (x, kind, axis if not reduce_all else 1, reduce_all, old_c, weight, bias, None if eps is None else float(eps))
    node.kwargs = {}


def _rewrite_group_norm_function(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """F.group_norm: one group -> exact statistics; several -> the group count follows the
    channels (whole groups go)."""
    src = tracked(node.args[0])
    if EXACT_STATS in node.meta:
        rewrite_exact_norm(gm, node, keeper)
        return
    if not isinstance(src, TensorInfo) or 1 not in src.track:
        return
    groups = int(arg(node, 1, "num_groups"))
    new_c, old_c = keeper.new_shape(src)[1], src.shape[1]
    if new_c != old_c and groups != 1:
        new_groups = groups * new_c // old_c if groups != old_c else new_c
        if len(node.args) > 1:
            node.args = (node.args[0], new_groups, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "num_groups": new_groups}


def _statistics_over(state: AnalysisState, node: fx.Node, x: TensorInfo, axis: int) -> None:
    """A norm whose statistics span the channels on ``axis``: exact statistics count each removed
    channel as a zero, which it must then be in the masked model; where an op before the norm
    maps 0 to non-zero (sigmoid, + 1, a bias added along another axis), the channels are pinned."""
    if axis in x.track and axis not in x.zero:
        state.pin(x.track[axis], f"{node.name} normalises over channels that are not zero where removed in the masked "
                                 f"model (an op before it maps 0 to non-zero)")


def _keeps_zero(module: Any) -> bool:
    """Whether a leaf norm's own activation (timm's norm+act layers) maps 0 to 0."""
    act = getattr(module, "act", None)
    if not isinstance(act, nn.Module):
        return True
    try:
        with torch.no_grad():
            return bool((act(torch.zeros(1, 1, 1, 1)) == 0).all())
    except Exception:  # noqa: BLE001 - an activation that cannot be probed is not known to keep zeros
        return False


def _output_zero(kind: str | None, axis: int, x: TensorInfo, weight: bool, bias: bool) -> frozenset[int]:
    """A per-channel norm's output is zero on removed channels when its weight is zero there (masked)
    or it only scales a zero input (RMS, 'simple'), and its bias is zero there (masked) or absent."""
    if (weight or kind in ("rms", "simple") and axis in x.zero) and bias:
        return frozenset({axis})
    return frozenset()


def norm(state: AnalysisState, node: fx.Node, axis: int, params: tuple[str, ...], exact: str | None, groups: int = 0,
         counted: str | None = None) -> Any:
    """Per-channel norm on ``axis``. ``exact`` ('layer', 'rms', 'simple', 'group1'): its
    statistics span the channels, so the speedup swaps in a norm that counts the removed (zero)
    channels, and the pruned model still equals the masked one; ``counted``: the kind of such a
    norm already in place. ``groups`` > 1: GroupNorm, pruned by whole groups (its statistics stay
    per group)."""
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
    module = node_module(state.gm, node)
    for p in params:
        if isinstance(getattr(module, p, None), torch.Tensor):
            state.member(str(node.target), p, 0, ids, "norm")
    if exact or counted:
        _statistics_over(state, node, x, axis)
    if exact:
        node.meta[EXACT_STATS] = (exact, axis)
    if _keeps_zero(module):  # the module's own parameters are masked: zero where removed
        out.zero = _output_zero(exact or counted, axis, x, isinstance(getattr(module, "weight", None), torch.Tensor), True)
    return out


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm2d)
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


@register_module(*_BN, shrink=shrink_batch_norm)
def batch_norm(state: AnalysisState, node: fx.Node) -> Any:
    return norm(state, node, 1, BN_PARAMS, exact=None)


@register_module(nn.LayerNorm, nn.RMSNorm, rewrite=rewrite_exact_norm, shrink=shrink_normalized_shape)
def layer_norm(state: AnalysisState, node: fx.Node) -> Any:
    m = node_module(state.gm, node)
    if len(m.normalized_shape) != 1:
        x = state.info(node.args[0])
        state.pin_track(x, f"{node.name} normalises over several dims")
        return untracked_like(node)
    return norm(state, node, -1, ("weight", "bias"), exact="rms" if isinstance(m, nn.RMSNorm) else "layer")


@register_module(nn.GroupNorm, rewrite=rewrite_exact_norm, shrink=shrink_group_norm)
def group_norm(state: AnalysisState, node: fx.Node) -> Any:
    m = node_module(state.gm, node)
    return norm(state, node, 1, ("weight", "bias"), exact="group1" if m.num_groups == 1 else None, groups=m.num_groups)


@register_module(register_leaf_type(ExactStatsNorm))
def exact_norm_module(state: AnalysisState, node: fx.Node) -> Any:
    """The speedup's exact-statistics norm: per channel on ``axis`` (1 for the one-group GroupNorm
    form). It already counts every removed channel (``original_channels`` is fixed, the kept count
    comes from the input), so pruning it again only slices weight and bias: no exact swap."""
    module = node_module(state.gm, node)
    return norm(state, node, module.axis, ("weight", "bias"), exact=None, counted=module.kind)


def _param_members(state: AnalysisState, node: fx.Node, ids: np.ndarray, names: tuple[tuple[int, str], ...]) -> dict[str, bool | None]:
    """A functional norm's per-channel arguments (position, name) follow the channels ``ids``.
    Returns, per name, whether the argument is zero at removed channels (``None``: not given)."""
    zero: dict[str, bool | None] = {}
    for index, name in names:
        p = state.info(arg(node, index, name))
        zero[name] = None if p is None else isinstance(p, TensorInfo) and 0 in p.zero
        if isinstance(p, TensorInfo) and p.origin is not None and p.ndim == 1:
            state.member(p.origin.module, p.origin.param, 0, ids, "norm")
        elif p is not None:
            state.pin(ids, f"{node.name} uses a computed {name}")
    return zero


def _functional_zero(kind: str, axis: int, x: TensorInfo, zero: dict[str, bool | None]) -> frozenset[int]:
    """:func:`_output_zero` for a functional norm's weight and bias arguments: each counts as zero
    where it is a parameter view that keeps its masked zeros (not ``w.exp()``)."""
    return _output_zero(kind, axis, x, zero.get("weight") is True, zero.get("bias") is not False)


def functional_norm(kind: str) -> Callable[[AnalysisState, fx.Node], Any]:
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
        zero = _param_members(state, node, ids, names)
        if kind in ("layer", "rms") or (kind == "group" and groups == 1):
            _statistics_over(state, node, x, axis)
            node.meta[EXACT_STATS] = ("group1" if kind == "group" else kind, axis)
        out.zero = _functional_zero(kind, axis, x, zero)
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
    axis = int(arg(node, 2, "axis")) % x.ndim
    ids = x.track.get(axis)
    if ids is not None:
        zero = _param_members(state, node, ids, ((5, "weight"), (6, "bias")))
        _statistics_over(state, node, x, axis)
        out.zero = _functional_zero(str(arg(node, 1, "kind")), axis, x, zero)
    return out


register_function(F.batch_norm)(functional_norm("batch"))
register_function(F.group_norm, rewrite=_rewrite_group_norm_function)(functional_norm("group"))
register_function(F.layer_norm, rewrite=rewrite_exact_norm)(functional_norm("layer"))
if hasattr(F, "rms_norm"):
    register_function(F.rms_norm, rewrite=rewrite_exact_norm)(functional_norm("rms"))


def _channels_first_layer_norm(module: nn.Module) -> dict[str, Any] | nn.Module:
    """torchvision's ConvNeXt LayerNorm2d (an nn.LayerNorm traced through: permute, F.layer_norm,
    permute): with channels gone, an exact-statistics norm over axis 1 takes its place."""
    weight = module.weight if isinstance(module.weight, torch.Tensor) else module.bias
    original = int(module.normalized_shape[0])
    if weight is None or int(weight.shape[0]) == original:
        return {}
    return ExactStatsNorm("layer", 1, False, original, module.weight, module.bias, module.eps)


def _register_torchvision() -> None:
    try:
        from torchvision.models.convnext import LayerNorm2d
    except ImportError:  # torchvision is optional for graph_passes
        return
    register_eager(LayerNorm2d)(_channels_first_layer_norm)


_register_torchvision()
