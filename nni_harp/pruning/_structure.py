"""Structured HARP's view of channel groups: which groups it controls, their readable names, score
initialisation, and the differentiable per-parameter masks built from group channel masks.

A group is controlled iff it is prunable, at least one of its member modules is selected by the
``config_list`` and none is excluded. Every member of a controlled group is masked with the same
channel mask, so coupled channels always agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from graph_passes.groups import ChannelGroup, channel_norms

from ._units import hydra_scores

__all__ = [
    "MaskFactor", "controlled_groups", "group_names", "group_init_scores", "channel_rms", "mask_factors", "learning_factors",
    "factor_mask",
]

MASKED_PARAMS: tuple[str, ...] = ("weight", "bias")


@dataclass(frozen=True)
class MaskFactor:
    """Positions ``index`` along ``dim`` (of length ``size``) of one parameter follow the channels
    ``channel`` of unit ``unit``'s channel mask; ``role`` is the member's (``'out'``: produces the
    channel, ``'in'``: consumes it, ``'norm'``: per-channel affine or similar)."""

    unit: int
    dim: int
    size: int
    index: Tensor
    channel: Tensor
    role: str = "out"


def controlled_groups(
    groups: Sequence[ChannelGroup], selected: Collection[str], excluded: Collection[str]
) -> list[ChannelGroup]:
    """The groups HARP controls, in the given order."""
    chosen = []
    for group in groups:
        modules = {m.module for m in group.members}
        if group.prunable and modules & set(selected) and not modules & set(excluded):
            chosen.append(group)
    return chosen


def group_names(groups: Sequence[ChannelGroup]) -> list[str]:
    """A readable, unique name per group: its first producing ('out') member module."""
    names: list[str] = []
    seen: set[str] = set()
    for group in groups:
        producers = [m.module for m in group.members if m.role == "out"] or [m.module for m in group.members]
        base = producers[0] if producers and producers[0] else f"group{group.id}"
        name = base if base not in seen else f"{base}[group {group.id}]"
        seen.add(name)
        names.append(name)
    return names


def _tensor(model: nn.Module, module: str, param: str) -> Tensor | None:
    owner = model.get_submodule(module) if module else model
    value = getattr(owner, param, None)
    return value if isinstance(value, Tensor) else None


def group_init_scores(model: nn.Module, group: ChannelGroup) -> Tensor:
    """HYDRA-style channel scores: the channels' L2 norms over the producing weights, scaled by
    ``sqrt(6 / fan_in)`` of the first producing layer and divided by their maximum."""
    norms = channel_norms(model, group, p=2.0)
    fan_in = 1
    for member in sorted(group.members, key=lambda m: m.role != "out"):
        weight = _tensor(model, member.module, member.param) if member.param == "weight" else None
        if weight is not None and weight.dim() >= 2:
            fan_in = weight.numel() // weight.shape[member.dim]
            break
    return hydra_scores(norms, fan_in)


def channel_rms(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Each channel's root-mean-square weight over the members :func:`graph_passes.channel_norms`
    reads (producing weights): its L2 norm over the square root of its number of entries, a
    magnitude comparable across groups of different fan-in."""
    producers = [m for m in group.members if m.role == "out" and m.param == "weight"]
    chosen = producers or [m for m in group.members if m.param == "weight"]
    counts = torch.zeros(group.size, dtype=torch.float64)
    for member in chosen:
        tensor = _tensor(model, member.module, member.param)
        if tensor is not None:
            per_position = tensor.numel() // tensor.shape[member.dim]
            counts.index_add_(0, torch.tensor(member.channel, dtype=torch.long),
                              torch.full((len(member.channel),), float(per_position), dtype=torch.float64))
    return (channel_norms(model, group, p=2.0).to(torch.float64) / counts.clamp_min(1.0).sqrt()).to(torch.float32)


def mask_factors(
    model: nn.Module, groups: Sequence[ChannelGroup], prefix: str = ""
) -> dict[str, dict[str, list[MaskFactor]]]:
    """``{module: {param: [factors]}}`` for every weight/bias member of the groups; unit ``i`` is
    ``groups[i]``. Module names get ``prefix`` (e.g. ``'module.'`` under DDP)."""
    out: dict[str, dict[str, list[MaskFactor]]] = {}
    for unit, group in enumerate(groups):
        for member in group.members:
            if member.param not in MASKED_PARAMS:
                continue
            tensor = _tensor(model, member.module, member.param)
            if tensor is None:
                continue
            factor = MaskFactor(
                unit=unit,
                dim=member.dim,
                size=int(tensor.shape[member.dim]),
                index=torch.tensor(member.index, dtype=torch.long),
                channel=torch.tensor(member.channel, dtype=torch.long),
                role=member.role,
            )
            out.setdefault(prefix + member.module, {}).setdefault(member.param, []).append(factor)
    return out


def learning_factors(factors: Mapping[str, Mapping[str, Sequence[MaskFactor]]]) -> dict[str, dict[str, list[MaskFactor]]]:
    """The factors masked *while HARP learns*: one side of every unit's channels, so that a pruned
    channel's score and its unit's rate keep a task gradient.

    The final mask multiplies every member (producer rows, bias, norm affine, consumer columns):
    a pruned channel is then exactly zero everywhere and ``dL/dmask`` of it is zero, so it could
    never come back; and a BatchNorm after the producer makes the loss blind to the scale of the
    channel, so even kept channels send the rate almost no gradient. While learning, a unit's mask
    is applied to its consumers' input weights only (role ``'in'``; the authors mask conv inputs
    the same way): the channel is still computed and normalised, and its mask gradient is the
    loss change of feeding it to the next layers. A unit that no weight consumes (its channels
    only reach parameter-free ops) is masked on its producing weights instead. Once pruning ends
    the full masks are used, so the pruned model equals the masked one.
    """
    by_unit: dict[int, set[str]] = {}
    for targets in factors.values():
        for param, items in targets.items():
            for f in items:
                if param == "weight" and f.role in ("in", "out"):
                    by_unit.setdefault(f.unit, set()).add(f.role)
    side = {unit: "in" if "in" in roles else "out" for unit, roles in by_unit.items()}
    chosen: dict[str, dict[str, list[MaskFactor]]] = {}
    for module, targets in factors.items():
        items = [f for f in targets.get("weight", ()) if side.get(f.unit) == f.role]
        if items:
            chosen[module] = {"weight": items}
    return chosen


def factor_mask(factors: Sequence[MaskFactor], channel_masks: Mapping[int, Tensor], like: Tensor) -> Tensor:
    """The mask of one parameter shaped to broadcast against ``like``: the product, over its
    factors, of the unit's channel mask placed at the factor's positions (ones elsewhere).
    Differentiable in the channel masks."""
    mask: Tensor | None = None
    for factor in factors:
        channels = channel_masks[factor.unit].to(dtype=like.dtype)
        index = factor.index.to(like.device)
        values = channels[factor.channel.to(like.device)]
        vector = torch.ones(factor.size, dtype=like.dtype, device=like.device).index_put((index,), values)
        shape = [1] * like.dim()
        shape[factor.dim] = factor.size
        vector = vector.view(shape)
        mask = vector if mask is None else mask * vector
    if mask is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return mask
