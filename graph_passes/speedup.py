"""Physical channel removal on a traced graph: parameters sliced, and every node whose registry
entry has a rewrite rule made to fit the smaller tensors (see :mod:`graph_passes._registry`)."""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import fx, nn

from ._registry import lookup, module_handler
from ._tracking import EXACT_STATS, TRACK_KEY, TensorInfo
from .dependency import ANALYSIS_KEY, Analysis
from .errors import SpeedupError

__all__ = ["apply_keep", "prune_graph"]


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


def _slice_params(gm: fx.GraphModule, plan: dict[str, dict[str, dict[int, torch.Tensor]]]) -> None:
    """Slice the planned tensors; a module's registry entry then sets its size attributes."""
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
        entry = module_handler(owner) if module_name else None
        if entry is not None and entry.shrink is not None:
            entry.shrink(owner, old)


def _freeze(gm: fx.GraphModule, plan: dict[str, dict[str, dict[int, torch.Tensor]]]) -> None:
    """Modules whose registry entry freezes them (their weight is computed from their parameters)
    are replaced by plain layers before slicing; tensors the plain layer lacks leave the plan."""
    for module_name, params in plan.items():
        owner = gm.get_submodule(module_name) if module_name else gm
        entry = module_handler(owner) if module_name else None
        plain = entry.freeze(owner, params) if entry is not None and entry.freeze is not None else None
        if plain is None:
            continue
        parent, _, name = module_name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, plain)
        for pname in [p for p in params if not isinstance(getattr(plain, p, None), torch.Tensor)]:
            del params[pname]


def apply_keep(gm: fx.GraphModule, analysis: Analysis, keep: Mapping[int, torch.Tensor]) -> fx.GraphModule:
    """Remove from ``gm`` (traced and analysed) every channel whose keep entry is False."""
    prune_graph(gm, analysis, keep)
    return gm


def prune_graph(gm: fx.GraphModule, analysis: Analysis, keep: Mapping[int, torch.Tensor]) -> dict[str, set[str]]:
    """:func:`apply_keep`, returning what it changed: ``{module path: names of the tensors sliced}``
    for every module whose tensors were sliced or which was replaced (an empty set). Each node's
    registry entry rewrites what in it depends on channel counts."""
    keeper = _Keeper(analysis, keep)
    called = {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    sliced: dict[tuple[str, str, int], np.ndarray] = {}
    for rec in analysis.state.members:
        key = (rec.module, rec.param, rec.dim)
        if key not in sliced:
            sliced[key] = keeper.kept(rec.ids)
    plan: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for (module, param, dim), kept in sliced.items():
        if not kept.all():
            plan.setdefault(module, {}).setdefault(param, {})[dim] = torch.from_numpy(np.nonzero(kept)[0]).long()
    _freeze(gm, plan)
    _slice_params(gm, plan)  # first: the norms swapped in below take the sliced weights
    for node in list(gm.graph.nodes):
        entry = lookup(gm, node)
        if entry is not None and entry.rewrite is not None:
            entry.rewrite(gm, node, keeper)
    for node in gm.graph.nodes:  # shapes and tracking describe the model before pruning: drop them
        for key in ("tensor_meta", TRACK_KEY, EXACT_STATS):
            node.meta.pop(key, None)
    gm.meta.pop(ANALYSIS_KEY, None)
    gm.graph.lint()
    gm.recompile()
    changed = {module: set(params) for module, params in plan.items()}
    for target, module in called.items():
        if gm.get_submodule(target) is not module:
            changed.setdefault(target, set())
    return changed
