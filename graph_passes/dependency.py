"""Channel dependency analysis: walk a traced graph and find groups of coupled channels."""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import fx, nn

from . import _ops_binary, _ops_conv_linear, _ops_elementwise, _ops_layers, _ops_norms, _ops_shape, _ops_timm  # noqa: F401  (fill the registry)
from ._grouping import form_groups
from ._ops_common import untracked_like
from ._registry import describe_target, lookup
from ._tracking import TRACK_KEY, AnalysisState, ParamOrigin, TensorInfo, _tensor_infos
from .errors import GraphPassError, MissingAnalysisError
from .groups import UNMASKED, ChannelGroup
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
    channel_of: Mapping[int, tuple[int, int]]  # root element -> (group id, channel), a dict when read
    unsupported: list[str]
    element_groups: np.ndarray | None = field(default=None, repr=False, compare=False)  # see group_of

    def group_of(self) -> np.ndarray:
        """Every element's group id (-1: in no group), read-only: one table to look whole element
        arrays up in (``group_of()[ids]``) rather than :meth:`element_channel` per element."""
        if self.element_groups is None:
            by_root = np.full(len(self.state.uf), -1, dtype=np.int64)
            for root, (gid, _) in self.channel_of.items():
                by_root[root] = gid
            self.element_groups = by_root[self.state.uf.table()]
            self.element_groups.flags.writeable = False
        return self.element_groups

    @property
    def gm(self) -> fx.GraphModule:
        """The traced module analysed (its nodes carry the tracking, its ``meta`` this result)."""
        return self.state.gm

    def copy(self) -> "Analysis":
        """The analysis of a deep copy of :attr:`gm`: for passes that change a module in place
        (:func:`graph_passes.apply_keep`) and must leave this one as it is. (``copy.deepcopy`` of
        an analysis walks the graph's linked nodes one recursion level each and passes Python's
        limit on models of resnet50's size.)"""
        return analyze(copy.deepcopy(self.gm))

    def element_channel(self, element: int) -> tuple[int, int]:
        """The (group id, channel) of an element (KeyError: the element is in no group)."""
        return self.channel_of[self.state.uf.find(int(element))]


class _Stored:
    """``GraphModule.meta``'s holder of the module's :class:`Analysis`. A deep copy (or pickle) of
    the module is another module, whose nodes the analysis does not describe: its holder is empty,
    so the copy is analysed anew when asked (:func:`analysis_for`)."""

    __slots__ = ("analysis",)

    def __init__(self, analysis: Analysis | None) -> None:
        self.analysis = analysis

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Stored":
        return _Stored(None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Stored, (None,))


def stored_analysis(gm: fx.GraphModule) -> Analysis | None:
    """The analysis :func:`analyze` stored on ``gm``, or None."""
    held = gm.meta.get(ANALYSIS_KEY)
    return held.analysis if isinstance(held, _Stored) else None


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
    groups, channel_of, by_root = form_groups(state)
    element_groups = by_root[state.uf.table()]
    element_groups.flags.writeable = False
    result = Analysis(groups, state, channel_of, unsupported, element_groups)
    gm.meta[ANALYSIS_KEY] = _Stored(result)
    if unsupported:
        logger.info("%d ops without channel rules; their channels are kept: %s", len(unsupported), "; ".join(unsupported[:5]))
    return result


def analysis_of(gm: fx.GraphModule) -> Analysis:
    result = stored_analysis(gm)
    if result is None:
        raise MissingAnalysisError("no channel analysis on this GraphModule: call graph_passes.dependency.analyze(gm) first")
    return result


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
    stored = stored_analysis(gm)
    return stored if stored is not None else analyze(gm)


def channel_groups(model_or_gm: Traceable, example_inputs: Any = None) -> list[ChannelGroup]:
    """Groups of coupled channels of ``model_or_gm`` (a module, traced first; a traced
    ``GraphModule``; or its :class:`Analysis`: see :func:`analysis_for`).

    Every group lists its members (parameter slices removed together); unprunable groups say why.
    """
    return list(analysis_for(model_or_gm, example_inputs).groups)
