"""Cost pass: FLOPs and parameters per layer, as functions of the kept channel fractions."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from torch import fx, nn

from ._tracking import LayerRecord
from .cost_model import CostModel, Factor, LayerCost
from .dependency import Analysis, analysis_of, analyze
from .errors import GraphPassError, MissingAnalysisError
from .groups import ChannelGroup
from .tracing import trace

__all__ = ["cost", "cost_of_analysis"]


def _factor(analysis: Analysis, ids: np.ndarray | None, total: int) -> Factor:
    if ids is None:
        return Factor(total, ())
    counts: Counter[int] = Counter()
    for e in ids.tolist():
        found = analysis.channel_of.get(analysis.state.uf.find(e))
        if found is not None and analysis.groups[found[0]].prunable:
            counts[found[0]] += 1
    if len(ids) != total:  # an axis only partly tracked: the rest is fixed
        total = max(total, len(ids))
    return Factor(total, tuple(sorted(counts.items())))


def _layer_cost(analysis: Analysis, rec: LayerRecord) -> LayerCost:
    factors = tuple(_factor(analysis, ids, size) for ids, size in rec.flops_dims)
    return LayerCost(rec.name, rec.kind, rec.flops, 0, factors, ())


def cost_of_analysis(gm: fx.GraphModule, analysis: Analysis) -> CostModel:
    layers = [_layer_cost(analysis, rec) for rec in analysis.state.layers]
    dims: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for rec in analysis.state.members:
        dims.setdefault((rec.module, rec.param), {}).setdefault(rec.dim, rec.ids)
    for qualified, param in gm.named_parameters():
        module, _, name = qualified.rpartition(".")
        factors = tuple(_factor(analysis, ids, param.shape[d]) for d, ids in sorted(dims.get((module, name), {}).items()))
        layers.append(LayerCost(qualified, "param", 0, param.numel(), (), factors))
    return CostModel(tuple(layers), 0)


def cost(model: nn.Module, example_inputs: Any, groups: list[ChannelGroup] | None = None) -> CostModel:
    """Dense FLOPs (2 per multiply-accumulate, for conv, linear, matmul and attention, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them on ``example_inputs``) and
    parameters of every layer, each with the factors by which channel pruning scales it.

    ``CostModel.flops(keep)`` gives the FLOPs when group ``g`` keeps the fraction ``keep[g]``
    of its channels; it is differentiable when the fractions are tensors. ``groups``, when
    given, must be the groups ``channel_groups`` found for the same model and inputs: group ids
    in ``keep`` refer to them (a mismatch raises :class:`GraphPassError`).
    """
    gm = trace(model, example_inputs)
    try:
        analysis = analysis_of(gm)
    except MissingAnalysisError:
        analysis = analyze(gm)
    if groups is not None and [(g.id, g.size) for g in groups] != [(g.id, g.size) for g in analysis.groups]:
        raise GraphPassError("the groups passed to cost() are not this model's: call channel_groups(model, x) with the same inputs")
    return cost_of_analysis(gm, analysis)
