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

__all__ = ["MaskFactor", "controlled_groups", "group_names", "group_init_scores", "mask_factors", "factor_mask"]

MASKED_PARAMS: tuple[str, ...] = ("weight", "bias")


@dataclass(frozen=True)
class MaskFactor:
    """Positions ``index`` along ``dim`` (of length ``size``) of one parameter follow the channels
    ``channel`` of unit ``unit``'s channel mask."""

    unit: int
    dim: int
    size: int
    index: Tensor
    channel: Tensor


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
            )
            out.setdefault(prefix + member.module, {}).setdefault(member.param, []).append(factor)
    return out


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
