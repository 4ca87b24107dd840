"""Channel plans of benchmarks/speedup.py: which fraction of every prunable group to keep.

Every plan keeps ``min(1, frac * w_g)`` of group ``g``'s channels (its highest-L2-norm ones,
rounded to ``round_to``) and finds ``frac`` by bisection so that one measure of the pruned model
(FLOPs, or the latency a fitted :class:`graph_passes.LatencyModel` predicts) meets a target.
The plans differ in the weights ``w_g``:

- ``uniform``: 1 everywhere;
- ``memory``: ``(rho_g / rho_ref) ** -gamma`` with ``rho_g`` the activation elements per FLOP one
  channel of the group carries;
- ``latency``: the same with ``rho_g`` the *predicted milliseconds* per FLOP of one channel, read
  from a latency model fitted on the backend, batch and threads of the row it is measured in.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

import graph_passes as gp

Fractions = dict[int, float]


def rounded(n: float, size: int, round_to: int) -> int:
    """Kept channels of a group: ``n`` rounded to a multiple of ``round_to`` (never 0, never more
    than the group). Channel counts that are multiples of 8 keep the vectorised CPU kernels
    (oneDNN / ONNX Runtime's NCHWc layouts) on their fast paths."""
    if round_to > 1 and size > round_to:
        return int(min(size, max(round_to, round_to * round(n / round_to))))
    return int(min(size, max(1, round(n))))


def cost_weights(cost_of: Callable[[Fractions], float], cm: gp.CostModel, groups: list[gp.ChannelGroup],
                 gamma: float) -> dict[int, float]:
    """Per-group multipliers ``(rho_g / rho_ref) ** -gamma`` of the keep fraction.

    ``rho_g`` = what removing group ``g`` saves of ``cost_of`` (a function of the kept fractions)
    per FLOP it saves; ``rho_ref`` is the FLOPs-weighted geometric mean, so groups whose channels
    cost more per FLOP than the average are pruned harder. gamma = 0 is the uniform plan."""
    f0, c0 = float(cm.total_flops), float(cost_of({}))
    group_flops, rho = {}, {}
    for g in groups:
        group_flops[g.id] = f0 - float(cm.flops({g.id: 0.0}))
        saved = c0 - float(cost_of({g.id: 0.0}))
        rho[g.id] = saved / group_flops[g.id] if group_flops[g.id] > 0 else math.inf
    finite = [gid for gid, r in rho.items() if 0 < r < math.inf]
    if not finite or gamma == 0:
        return {g.id: 1.0 for g in groups}
    lo, hi = min(rho[gid] for gid in finite), max(rho[gid] for gid in finite)
    log_ref = sum(group_flops[gid] * math.log(rho[gid]) for gid in finite) / sum(group_flops[gid] for gid in finite)
    # Groups without FLOPs (or that save nothing) get the extreme finite value.
    return {gid: math.exp(-gamma * (math.log(min(max(r, lo), hi)) - log_ref)) for gid, r in rho.items()}


def memory_weights(cm: gp.CostModel, groups: list[gp.ChannelGroup], gamma: float) -> dict[int, float]:
    """The 'memory' plan's weights: :func:`cost_weights` of the activation elements. Channels
    with a high ``rho`` (inverted-residual hidden channels: a depthwise conv, norms, activations and
    SE gating per channel, few FLOPs) are mostly memory traffic; channels with a low ``rho`` feed
    wide dense convs."""
    return cost_weights(cm.activations, cm, groups, gamma)


def latency_weights(latency: gp.LatencyModel, cm: gp.CostModel, groups: list[gp.ChannelGroup],
                    gamma: float) -> dict[int, float]:
    """The 'latency' plan's weights: :func:`cost_weights` of the predicted latency (``cm`` must be
    the cost model of the input shape ``latency`` was fitted on)."""
    return cost_weights(lambda keep: float(latency.latency(cm, keep)), cm, groups, gamma)


def fractions(keep: Mapping[int, torch.Tensor]) -> Fractions:
    return {gid: float(v.sum()) / v.numel() for gid, v in keep.items()}


def plan_keep(groups: list[gp.ChannelGroup], norms: Mapping[int, torch.Tensor], weight: Mapping[int, float],
              measure: Callable[[Fractions], float], target: float, round_to: int) -> tuple[dict[int, torch.Tensor], float]:
    """Keep vectors with ``measure(kept fractions)`` as close to ``target`` as the bisection on
    ``frac`` gets it (group ``g`` keeps ``min(1, frac * weight[g])`` of its channels, rounded, the
    highest-norm ones). Returns (keep vectors by group id, frac)."""

    def keep_of(frac: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in groups:
            k = rounded(min(1.0, frac * weight[g.id]) * g.size, g.size, round_to)
            v = torch.zeros(g.size, dtype=torch.bool)
            v[torch.topk(norms[g.id], k).indices] = True
            out[g.id] = v
        return out

    def at(frac: float) -> float:
        return measure(fractions(keep_of(frac)))

    lo, hi = 0.0, 1.0 / min(1.0, min(weight.values(), default=1.0))
    for _ in range(30):
        mid = (lo + hi) / 2
        if at(mid) > target:
            hi = mid
        else:
            lo = mid
    frac = hi if abs(at(hi) - target) < abs(at(lo) - target) else lo
    return keep_of(frac), frac


def keep_for_target(model: torch.nn.Module, x: torch.Tensor, target: float, round_to: int = 1, gamma: float = 0.0):
    """Keep vectors for every prunable group at about ``target`` of the dense FLOPs, by the
    uniform plan (gamma = 0) or the memory plan. Returns (groups, keep, frac, kept activation
    fraction)."""
    groups = gp.channel_groups(model, x)
    cm = gp.cost(model, x, groups)
    prunable = [g for g in groups if g.prunable]
    norms = {g.id: gp.channel_norms(model, g) for g in prunable}
    keep, frac = plan_keep(prunable, norms, memory_weights(cm, prunable, gamma),
                           lambda f: float(cm.flops(f)) / cm.total_flops, target, round_to)
    return groups, keep, frac, float(cm.activations(fractions(keep))) / cm.total_activations
