"""Norms that stay fast after pruning (#11): statistics over the kept channels.

A LayerNorm-family norm (layer, RMS, one-group group norm: the ops whose registry entry rewrites
them with :func:`~graph_passes._ops_norms.rewrite_exact_norm`) whose channels are pruned becomes an
:class:`~graph_passes.ExactStatsNorm`, which still counts the removed channels (as zeros): exact, but
it exports as a chain of element-wise ONNX nodes. A model that is fine-tuned after masking can
instead normalise over the kept channels only (:func:`kept_stats_norms` swaps in
:class:`~graph_passes.KeptStatsNorm`); the speedup then emits a plain norm of the kept width
(``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm(1, k)``, :class:`~graph_passes.ChannelsFirstNorm`),
and the pruned model still equals the masked one exactly.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
import torch
from torch import fx, nn

from ._ops_norms import norm, rewrite_exact_norm, shrink_normalized_shape
from ._registry import Keeper, module_handler, node_module, register_module
from ._tracking import EXACT_STATS, AnalysisState, TensorInfo, tracked
from .dependency import Analysis, analysis_for
from .errors import GraphPassError, SpeedupError
from .modules import ChannelsFirstNorm, ExactStatsNorm, KeptStatsNorm, _parameter
from .tracing import register_leaf_type

__all__ = ["kept_stats_norms", "plain_norm"]


def _kind_axis(node: fx.Node) -> tuple[str, int, bool]:
    """What the analysis found of a norm whose statistics span the channels: the norm's kind
    ('layer', 'rms', 'simple'), its channel axis (the last one as -1) and whether it reduces over
    every non-batch axis (the one-group group norm, the analysis' kind 'group1')."""
    kind, axis = node.meta[EXACT_STATS]
    if kind == "group1":
        return "layer", 1, True
    src = tracked(node.args[0])
    return kind, -1 if isinstance(src, TensorInfo) and axis % src.ndim == src.ndim - 1 else axis, False


@register_module(register_leaf_type(ChannelsFirstNorm), rewrite=rewrite_exact_norm, shrink=shrink_normalized_shape)
def _channels_first_module(state: AnalysisState, node: fx.Node) -> Any:
    """A plain norm over axis 1: pruned again, it becomes an exact-statistics norm like the others."""
    m = node_module(state.gm, node)
    return norm(state, node, 1, ("weight", "bias"), exact=m.kind)


def _same(module: nn.Module, weight: Any, bias: Any) -> nn.Module:
    """``module`` holding ``weight`` and ``bias`` (the sliced parameters)."""
    for name, value in (("weight", weight), ("bias", bias)):
        if getattr(module, name, None) is not None:
            setattr(module, name, _parameter(value))
    return module


def plain_norm(kind: str, axis: int, ndim: int, reduce_all: bool, weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float | None) -> nn.Module:
    """A norm of the kept width ``k`` (the length of ``weight`` or ``bias``) that computes what
    :func:`~graph_passes.kept_stats_norm` computes on the kept channels, as one fused op where torch
    has one: ``nn.GroupNorm(1, k)`` (one group), ``nn.LayerNorm(k)`` / ``nn.RMSNorm(k)`` (last axis),
    :class:`ChannelsFirstNorm` (axis 1); otherwise (timm's 'simple' norm) an
    :class:`ExactStatsNorm` whose original count is ``k`` (exact, element-wise). The module holds
    ``weight`` and ``bias`` themselves."""
    ref = weight if weight is not None else bias
    k = int(ref.shape[0]) if ref is not None else 0
    opts: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    last = axis % ndim == ndim - 1
    rms = hasattr(nn, "RMSNorm") and kind == "rms" and bias is None
    if k and eps is not None and reduce_all and weight is not None and bias is not None:
        return _same(nn.GroupNorm(1, k, eps, True, **opts), weight, bias)
    if k and not reduce_all and last and kind == "layer" and eps is not None and (weight is not None or bias is None):
        return _same(nn.LayerNorm(k, eps, weight is not None, bias is not None, **opts), weight, bias)
    if k and not reduce_all and last and rms:
        return _same(nn.RMSNorm(k, eps, weight is not None, **opts), weight, bias)
    if k and not reduce_all and axis % ndim == 1 and ndim > 2 and (kind == "layer" and eps is not None or rms):
        return ChannelsFirstNorm(kind, k, eps, weight, bias)
    return ExactStatsNorm(kind, axis, reduce_all, k, weight, bias, eps)


def _rewrite_kept_norm(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """The speedup of a :class:`KeptStatsNorm`: removed channels = the ones it does not keep -> a
    plain norm of the kept width; fewer removed -> the same norm over what is left (still exact);
    a removed channel it counts -> a :class:`SpeedupError` (the pruned model could not equal it)."""
    src = tracked(node.args[0])
    if EXACT_STATS not in node.meta or not isinstance(src, TensorInfo):
        return  # no channel of its axis can go
    axis = node.meta[EXACT_STATS][1] % src.ndim
    m = gm.get_submodule(str(node.target))
    kept = keeper.kept(src.track[axis]) if axis in src.track else np.ones(src.shape[axis], dtype=bool)
    want = m.keep.cpu().numpy()
    counted = np.nonzero(~kept & want)[0]
    if counted.size:
        raise SpeedupError(
            f"{node.name}: {node.target} (KeptStatsNorm) normalises over channels {counted[:8].tolist()}"
            f"{'...' if counted.size > 8 else ''} that the speedup removes: its keep (the masks "
            f"kept_stats_norms built it from) must keep only channels the speedup keeps", node=node.name)
    if not (kept & ~want).any():  # exactly the channels it keeps stay
        replacement: nn.Module = plain_norm(m.kind, m.axis, src.ndim, m.reduce_all, m.weight, m.bias, m.eps)
        extra = [x for x in (m.drop, m.act) if not isinstance(x, nn.Identity)]
        if extra:
            replacement = nn.Sequential(replacement, *extra)
        parent, _, name = str(node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, replacement.train(m.training))
    elif not kept.all():
        m.keep = m.keep[torch.from_numpy(np.nonzero(kept)[0]).to(m.keep.device)]


@register_module(register_leaf_type(KeptStatsNorm), rewrite=_rewrite_kept_norm)
def _kept_norm_module(state: AnalysisState, node: fx.Node) -> Any:
    """The channel rule of the norm it replaces: per channel on ``axis``, statistics over the channels."""
    m = node_module(state.gm, node)
    return norm(state, node, m.axis, ("weight", "bias"), exact="group1" if m.reduce_all else m.kind)


def _keep_of(targets: Mapping[str, Any]) -> torch.Tensor | None:
    """The channels a norm's masks keep: its weight mask (else its bias mask) non-zero."""
    mask = targets.get("weight")
    mask = targets.get("bias") if mask is None else mask
    return None if mask is None else torch.as_tensor(mask).detach().reshape(-1).cpu() != 0


def kept_stats_norms(model: nn.Module, masks: Mapping[str, Mapping[str, Any]], example_inputs: Any = None, *,
                     analysis: Analysis | None = None) -> list[str]:
    """In place: every norm of ``model`` whose statistics span its channels (layer, RMS, one-group
    group norms, timm's and torch's, as the channel analysis finds them; not timm's SimpleNorm, which
    no fused op computes) and whose NNI-format ``masks`` (``{module: {'weight': mask, ...}}``) zero
    some but not all of its channels becomes a
    :class:`KeptStatsNorm` over the channels its weight mask (else bias mask) keeps, holding the same
    parameters (timm's norm+act layers: their drop and act too). Returns the swapped modules' names.

    Use it on a masked model that is trained further (fine-tuned) before the speedup: the speedup
    emits a plain norm of the kept width for it, and the pruned model equals the masked one, where
    a norm left alone becomes an element-wise :class:`ExactStatsNorm`. It changes what the masked
    model computes, so without training afterwards leave the norms alone. ``model`` is traced (a
    copy, on ``example_inputs``) only when some norm has such a mask; ``analysis``: the channel
    analysis of ``model`` (or of a copy with the same module names), used instead of tracing."""
    candidates: dict[str, torch.Tensor] = {}
    for name, targets in masks.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            raise GraphPassError(f"kept_stats_norms: mask given for module {name!r}, which the model does not have") from None
        entry = module_handler(module)
        keep = _keep_of(targets or {}) if entry is not None and entry.rewrite is rewrite_exact_norm else None
        if keep is not None and keep.any() and not keep.all():
            candidates[name] = keep
    if not candidates:
        return []
    found = analysis if analysis is not None else analysis_for(copy.deepcopy(model).eval(), example_inputs)
    stats = {str(n.target): _kind_axis(n) for n in found.gm.graph.nodes if n.op == "call_module" and EXACT_STATS in n.meta}
    swapped = []
    for name, keep in candidates.items():
        if name not in stats or stats[name][0] == "simple":
            continue  # pinned or untracked channels, a group norm of several groups; timm's SimpleNorm: no fused op
        module = model.get_submodule(name)
        kind, axis, reduce_all = stats[name]
        drop, act = getattr(module, "drop", None), getattr(module, "act", None)
        new = KeptStatsNorm(kind, axis, reduce_all, keep, getattr(module, "weight", None),
                            getattr(module, "bias", None), getattr(module, "eps", 1e-5),
                            drop if isinstance(drop, nn.Module) else None, act if isinstance(act, nn.Module) else None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new.train(module.training))
        swapped.append(name)
    return swapped
