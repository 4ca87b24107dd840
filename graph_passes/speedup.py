"""Physical channel removal: new, smaller modules and a graph whose shape constants fit them."""
from __future__ import annotations

import copy
import logging
import math
import operator
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops_layers import EXACT_STATS
from ._rewrite import origin_shape, rewrite_getitem, rewrite_sizes, rewrite_split
from ._tracking import TensorInfo
from .dependency import TRACK_KEY, Analysis, analyze
from .errors import SpeedupError
from .groups import keep_from_masks
from .modules import ExactStatsNorm, exact_stats_norm
from .tracing import as_tuple, trace

__all__ = ["ModelSpeedup", "apply_keep", "masked_copy"]

logger = logging.getLogger(__name__)

_SIZE_METHODS = ("view", "reshape", "expand", "broadcast_to", "new_zeros", "new_ones", "new_empty", "new_full")


class _Keeper:
    """Answers 'is this element kept?' from per-group keep vectors."""

    def __init__(self, analysis: Analysis, keep: Mapping[int, torch.Tensor]) -> None:
        self.analysis = analysis
        self.keep = {g.id: np.ones(g.size, dtype=bool) for g in analysis.groups}
        for gid, vec in keep.items():
            group = analysis.groups[gid]
            v = torch.as_tensor(vec).bool().cpu().numpy().reshape(-1)
            if v.shape[0] != group.size:
                raise SpeedupError(f"keep vector of group {gid} has {v.shape[0]} entries, the group has {group.size}")
            if not group.prunable:
                v = np.ones_like(v)
            if not v.any():  # never empty a tensor: keep one channel (its masked weights are zero)
                v = v.copy()
                v[0] = True
            self.keep[gid] = v

    def kept(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=bool)
        for i, e in enumerate(ids.tolist()):
            root = self.analysis.state.uf.find(e)
            found = self.analysis.channel_of.get(root)
            out[i] = True if found is None else self.keep[found[0]][found[1]]
        return out

    def new_shape(self, info: TensorInfo) -> tuple[int, ...]:
        shape = list(info.shape)
        for axis, ids in info.track.items():
            shape[axis] = int(self.kept(ids).sum())
        return tuple(shape)


def _slice_tensor(t: torch.Tensor, dims: Mapping[int, torch.Tensor]) -> torch.Tensor:
    for dim, idx in dims.items():
        t = t.index_select(dim, idx.to(t.device))
    return t


def _fix_attributes(module: nn.Module, old: nn.Module) -> None:
    w = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = int(w.shape[0])
        if old.groups > 1:
            module.groups = old.groups * module.out_channels // old.out_channels
        module.in_channels = int(w.shape[1]) * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = module.running_mean if module.running_mean is not None else w
        module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.GroupNorm):
        new = int(w.shape[0]) if w is not None else old.num_channels
        module.num_groups = max(1, old.num_groups * new // old.num_channels) if old.num_groups > 1 else 1
        module.num_channels = new
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = int(w.shape[1])
    elif hasattr(module, "normalized_shape") and w is not None:
        module.normalized_shape = (int(w.shape[0]),)
    if hasattr(module, "num_features") and not isinstance(module, nn.modules.batchnorm._NormBase) and w is not None:
        module.num_features = int(w.shape[0])


def _slice_params(gm: fx.GraphModule, plan: dict[str, dict[str, dict[int, torch.Tensor]]]) -> None:
    for module_name, params in plan.items():
        owner = gm.get_submodule(module_name) if module_name else gm
        old = copy.copy(owner)
        for pname, dims in params.items():
            value = getattr(owner, pname)
            new = _slice_tensor(value.data, dims).clone()
            if isinstance(value, nn.Parameter):
                setattr(owner, pname, nn.Parameter(new, requires_grad=value.requires_grad))
            else:
                owner.register_buffer(pname, new, persistent=pname not in owner._non_persistent_buffers_set)
        if module_name:
            _fix_attributes(owner, old)


def _rewrite_node(gm: fx.GraphModule, node: fx.Node, keeper: _Keeper) -> None:
    info = node.meta.get(TRACK_KEY)
    src = node.args[0].meta.get(TRACK_KEY) if node.args and isinstance(node.args[0], fx.Node) else None
    sized = (node.op == "call_method" and node.target in _SIZE_METHODS
             or node.op == "call_function" and node.target in (torch.reshape, torch.broadcast_to))
    if sized and isinstance(info, TensorInfo):
        new = origin_shape(gm, info) if info.origin is not None and not info.track else keeper.new_shape(info)
        rewrite_sizes(node, info.shape, new, frozenset(info.track))
    elif node.target is operator.getitem and isinstance(src, TensorInfo):
        rewrite_getitem(node, src, keeper)
    elif node.target in ("split", torch.split, "split_with_sizes") and isinstance(src, TensorInfo):
        rewrite_split(node, src, keeper)
    elif node.target is F.scaled_dot_product_attention:
        q = node.args[0].meta.get(TRACK_KEY)
        if isinstance(q, TensorInfo) and node.kwargs.get("scale") is None and len(node.args) < 7:
            d_old, d_new = q.shape[-1], keeper.new_shape(q)[-1]
            if d_old != d_new:
                node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(d_old)}
    elif node.target is F.group_norm and isinstance(src, TensorInfo) and 1 in src.track and EXACT_STATS not in node.meta:
        groups = int(node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"])
        new_c, old_c = keeper.new_shape(src)[1], src.shape[1]
        if new_c != old_c and groups != 1:
            new_groups = groups * new_c // old_c if groups != old_c else new_c
            if len(node.args) > 1:
                node.args = (node.args[0], new_groups, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "num_groups": new_groups}
    if EXACT_STATS in node.meta and isinstance(src, TensorInfo):
        _swap_exact_norm(gm, node, src, keeper)


def _swap_exact_norm(gm: fx.GraphModule, node: fx.Node, src: TensorInfo, keeper: _Keeper) -> None:
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
    if node.target is F.layer_norm:
        weight, bias, eps = (node.args[i] if len(node.args) > i else node.kwargs.get(k, d) for i, k, d in ((2, "weight", None), (3, "bias", None), (4, "eps", 1e-5)))
    elif node.target is F.group_norm:
        weight, bias, eps = (node.args[i] if len(node.args) > i else node.kwargs.get(k, d) for i, k, d in ((2, "weight", None), (3, "bias", None), (4, "eps", 1e-5)))
    else:  # rms_norm(x, normalized_shape, weight, eps)
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias, eps = None, node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    node.target = exact_stats_norm
    node.args = (x, kind, axis if not reduce_all else 1, reduce_all, old_c, weight, bias, None if eps is None else float(eps))
    node.kwargs = {}


def apply_keep(gm: fx.GraphModule, analysis: Analysis, keep: Mapping[int, torch.Tensor]) -> fx.GraphModule:
    """Remove from ``gm`` (traced and analysed) every channel whose keep entry is False."""
    keeper = _Keeper(analysis, keep)
    sliced: dict[tuple[str, str, int], np.ndarray] = {}
    for rec in analysis.state.members:
        key = (rec.module, rec.param, rec.dim)
        if key not in sliced:
            sliced[key] = keeper.kept(rec.ids)
    plan: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for (module, param, dim), kept in sliced.items():
        if not kept.all():
            plan.setdefault(module, {}).setdefault(param, {})[dim] = torch.from_numpy(np.nonzero(kept)[0]).long()
    _slice_params(gm, plan)  # first: the norms swapped in below take the sliced weights
    for node in list(gm.graph.nodes):
        _rewrite_node(gm, node, keeper)
    for node in gm.graph.nodes:  # shapes and tracking describe the model before pruning: drop them
        for key in ("tensor_meta", TRACK_KEY, EXACT_STATS):
            node.meta.pop(key, None)
    gm.meta.pop("graph_passes.analysis", None)
    gm.graph.lint()
    gm.recompile()
    return gm


class ModelSpeedup:
    """Physically remove masked channels, with the call shape of NNI 3.0's ``ModelSpeedup``.

    ``masks`` are NNI's ``{module_name: {'weight': Tensor, 'bias': Tensor}}`` (any parameter or
    buffer name is accepted). Reconciliation rule for a coupled group: a channel is removed only
    when every masked member has it fully zero; the masks are multiplied into the weights first,
    so channels kept because one member still uses them give the masked model's outputs exactly.
    Channels that no mask mentions are kept. The model passed in is not modified; the result is
    a ``torch.fx.GraphModule`` with smaller modules and no masks or hooks.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.model = model
        self.dummy_input = dummy_input
        self.masks = masks
        self.keep: dict[int, torch.Tensor] | None = None

    def speedup_model(self) -> fx.GraphModule:
        model = copy.deepcopy(self.model)
        was_training = model.training
        model.eval()
        _bake(model, self.masks)
        gm = trace(model, self.dummy_input)
        analysis = analyze(gm)
        self.keep = keep_from_masks(analysis.groups, self.masks)
        gm = apply_keep(gm, analysis, self.keep)
        with torch.no_grad():
            gm(*as_tuple(self.dummy_input))  # fail here, naming the error, rather than later
        gm.train(was_training)
        return gm


def _bake(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for module_name, params in masks.items():
            owner = model.get_submodule(module_name) if module_name else model
            for pname, mask in params.items():
                value = getattr(owner, pname, None)
                if not isinstance(value, torch.Tensor):
                    raise SpeedupError(f"mask given for {module_name}.{pname}, which the model does not have")
                if tuple(mask.shape) != tuple(value.shape):
                    raise SpeedupError(f"mask for {module_name}.{pname} has shape {tuple(mask.shape)}, the tensor {tuple(value.shape)}")
                value.mul_(mask.to(value.dtype).to(value.device))


def masked_copy(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """A deep copy of ``model`` with NNI-format ``masks`` multiplied into its tensors: the masked
    model that :class:`ModelSpeedup`'s result must equal."""
    masked = copy.deepcopy(model)
    _bake(masked, masks)
    return masked
