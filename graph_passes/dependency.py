"""Channel dependency analysis: walk a traced graph and find groups of coupled channels."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from . import _ops_binary, _ops_conv_linear, _ops_elementwise, _ops_layers, _ops_norms, _ops_shape, _ops_timm  # noqa: F401  (fill the registry)
from ._ops_common import untracked_like
from ._registry import describe_target, lookup
from ._tracking import TRACK_KEY, AnalysisState, ParamOrigin, TensorInfo, _tensor_infos
from .errors import GraphPassError, MissingAnalysisError
from .groups import UNMASKED, ChannelGroup, Member
from .tracing import is_traced, trace

__all__ = ["Analysis", "analyze", "analysis_of", "analysis_for", "channel_groups", "TRACK_KEY", "ANALYSIS_KEY"]

logger = logging.getLogger(__name__)

ANALYSIS_KEY = "graph_passes.analysis"  # GraphModule.meta: the Analysis


@dataclass
class Analysis:
    """Result of :func:`analyze`: the groups, the element -> (group, channel) map, and the notes
    on unsupported ops."""

    groups: list[ChannelGroup]
    state: AnalysisState
    channel_of: dict[int, tuple[int, int]]  # root element -> (group id, channel)
    unsupported: list[str]

    @property
    def gm(self) -> fx.GraphModule:
        """The traced module analysed (its nodes carry the tracking, its ``meta`` this result)."""
        return self.state.gm

    def element_channel(self, element: int) -> tuple[int, int]:
        return self.channel_of[self.state.uf.find(int(element))]


def _param_origin(target: str) -> ParamOrigin:
    module, _, name = target.rpartition(".")
    return ParamOrigin(module, name, ())


def _step(state: AnalysisState, node: fx.Node, unsupported: list[str]) -> Any:
    if node.op == "placeholder":
        return untracked_like(node)
    if node.op == "get_attr":
        info = untracked_like(node)
        if isinstance(info, TensorInfo):
            origin = _param_origin(str(node.target))
            info.origin = ParamOrigin(origin.module, origin.param, tuple(range(info.ndim)))
            if origin.param not in UNMASKED:
                info.zero = frozenset(range(info.ndim))  # masked where its channels are removed
        return info
    if node.op == "output":
        for value in _tensor_infos(state.info(node.args[0])):
            for ids in value.track.values():
                state.pin(ids, "model output")
        return None
    inputs = [state.info(a) for a in list(node.args) + list(node.kwargs.values())]
    if "tensor_meta" not in node.meta and not _tensor_infos(inputs) and node.op != "call_module":
        return None  # arithmetic on sizes, asserts, shape queries: no channels involved
    handler = lookup(state.gm, node)
    if handler is None:
        if not _tensor_infos(inputs) and node.op != "call_module":
            return untracked_like(node)
        what = describe_target(state.gm, node)
        reason = f"{node.name}: no channel rule for {what}"
        unsupported.append(reason)
        for value in inputs:
            state.pin_track(value, reason)
        return untracked_like(node)
    return handler.analyze(state, node)


def analyze(gm: fx.GraphModule) -> Analysis:
    """Run the channel analysis on a traced module (from :func:`graph_passes.trace`). Stores
    each node's tracking in ``node.meta[TRACK_KEY]`` and the result in ``gm.meta[ANALYSIS_KEY]``."""
    state = AnalysisState(gm)
    unsupported: list[str] = []
    for node in gm.graph.nodes:
        try:
            value = _step(state, node, unsupported)
        except Exception as exc:
            raise GraphPassError(f"channel analysis failed at node {node.name} ({describe_target(gm, node)}): {type(exc).__name__}: {exc}") from exc
        state.values[node] = value
        node.meta[TRACK_KEY] = value
    groups, channel_of = _form_groups(state)
    result = Analysis(groups, state, channel_of, unsupported)
    gm.meta[ANALYSIS_KEY] = result
    if unsupported:
        logger.info("%d ops without channel rules; their channels are kept: %s", len(unsupported), "; ".join(unsupported[:5]))
    return result


def analysis_of(gm: fx.GraphModule) -> Analysis:
    result = gm.meta.get(ANALYSIS_KEY)
    if result is None:
        raise MissingAnalysisError("no channel analysis on this GraphModule: call graph_passes.dependency.analyze(gm) first")
    return result


def _form_groups(state: AnalysisState) -> tuple[list[ChannelGroup], dict[int, tuple[int, int]]]:
    uf = state.uf
    by_key: dict[tuple[str, str, int], list] = defaultdict(list)
    for rec in state.members:
        by_key[(rec.module, rec.param, rec.dim)].append(rec)
    for recs in by_key.values():  # a parameter dimension is sliced one way, whatever its call sites
        for other in recs[1:]:
            state.unite(recs[0].ids, other.ids)
    pinned: dict[int, str] = {}
    for element, reason in state.pinned.items():
        pinned.setdefault(uf.find(element), reason)
    roots_of = {key: uf.roots(recs[0].ids) for key, recs in by_key.items()}
    signature: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for key, roots in roots_of.items():
        for r in dict.fromkeys(roots.tolist()):
            signature[r].append(key)
    classes: dict[tuple, list[int]] = defaultdict(list)
    for root, keys in signature.items():
        classes[(tuple(keys), root in pinned)].append(root)
    groups: list[ChannelGroup] = []
    channel_of: dict[int, tuple[int, int]] = {}
    for gid, ((keys, is_pinned), roots) in enumerate(classes.items()):
        position = {r: c for c, r in enumerate(roots)}
        for r, c in position.items():
            channel_of[r] = (gid, c)
        members = []
        for key in keys:
            key_roots = roots_of[key]
            idx = [i for i, r in enumerate(key_roots.tolist()) if r in position]
            chan = [position[int(key_roots[i])] for i in idx]
            members.append(Member(key[0], key[1], key[2], tuple(idx), tuple(chan), by_key[key][0].role))
        reason = pinned[roots[0]] if is_pinned else None
        if not is_pinned and len(roots) < 2:
            reason = "a single channel: removing it would empty the tensor"
        groups.append(ChannelGroup(gid, len(roots), tuple(members), prunable=reason is None, reason=reason))
    return groups, channel_of


#: What the public passes take in place of ``(model, example_inputs)``: a module (traced on the
#: inputs), a ``GraphModule`` from :func:`graph_passes.trace`, or its :class:`Analysis`.
Traceable = nn.Module | Analysis


def analysis_for(model: Traceable, example_inputs: Any = None) -> Analysis:
    """The channel analysis of ``model``: an :class:`Analysis` as it is; a traced ``GraphModule``'s
    stored one (run now if it has none); a plain module traced on ``example_inputs`` (see
    :func:`graph_passes.trace` and :func:`graph_passes.trace_once`) and analysed. Public passes
    take any of the three, so a caller that traced once never pays for it again."""
    if isinstance(model, Analysis):
        return model
    if example_inputs is None and not is_traced(model):
        raise GraphPassError(f"{type(model).__name__} is not traced yet: pass example_inputs to trace it with")
    gm = trace(model, example_inputs)
    stored = gm.meta.get(ANALYSIS_KEY)
    return stored if stored is not None else analyze(gm)


def channel_groups(model_or_gm: Traceable, example_inputs: Any = None) -> list[ChannelGroup]:
    """Groups of coupled channels of ``model_or_gm`` (a module, traced first; a traced
    ``GraphModule``; or its :class:`Analysis`: see :func:`analysis_for`).

    Every group lists its members (parameter slices removed together); unprunable groups say why.
    """
    return list(analysis_for(model_or_gm, example_inputs).groups)
