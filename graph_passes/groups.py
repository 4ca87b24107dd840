"""Channel groups: sets of parameter slices whose channels are kept or removed together.

A :class:`ChannelGroup` is what a structured pruner decides on: it has ``size`` channels, and each
channel stands for a fixed set of positions in the parameters listed as its :class:`Member` s
(a conv's output filters, the next BatchNorm's entries, the following conv's input slices, ...).
Removing channel ``c`` of a group removes, in every member, the positions mapped to ``c``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["Member", "ChannelGroup", "group_masks", "keep_from_masks", "channel_norms", "grid_step"]


@dataclass(frozen=True)
class Member:
    """Positions of one parameter (or buffer) dimension that belong to a group.

    ``module`` is the qualified module name ('' for the root), ``param`` the parameter or buffer
    name on it, ``dim`` the dimension. ``index[i]`` is a position along ``dim`` and ``channel[i]``
    the group channel it belongs to; one channel may own several positions (a grouped conv's
    whole group, a flattened ``C*H*W`` Linear input).
    """

    module: str
    param: str
    dim: int
    index: tuple[int, ...]
    channel: tuple[int, ...]
    role: str = "out"  # "out": produces the channel; "in": consumes it; "norm": per-channel affine

    @property
    def qualified_name(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together; see the module docstring."""

    id: int
    size: int
    members: tuple[Member, ...]
    prunable: bool = True
    reason: str | None = None  # why not prunable
    nodes: tuple[str, ...] = field(default=(), compare=False)  # fx nodes whose tensors carry it

    def member_names(self) -> list[str]:
        return [f"{m.qualified_name}[dim {m.dim}]" for m in self.members]

    def __repr__(self) -> str:  # keep it short: groups are printed in lists
        state = "prunable" if self.prunable else f"fixed ({self.reason})"
        return f"ChannelGroup(id={self.id}, size={self.size}, {state}, members={self.member_names()})"


UNMASKED = ("running_mean", "running_var", "num_batches_tracked")  # members group_masks leaves alone


def grid_step(size: int, round_to: int) -> int:
    """The step in which a group of ``size`` channels is counted under ``round_to``: ``round_to``
    for groups of at least ``4 * round_to`` channels, else 1 (whole blocks of ``round_to`` would be
    too coarse a grid for a narrow group: a quarter of it or more per step)."""
    return round_to if size >= 4 * round_to else 1


def _param(model: nn.Module, module: str, name: str) -> torch.Tensor:
    owner = model.get_submodule(module) if module else model
    value = getattr(owner, name, None)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"{module or '<root>'} has no tensor named {name!r}")
    return value


def group_masks(
    model: nn.Module,
    groups: Iterable[ChannelGroup],
    keep: Mapping[int, torch.Tensor],
    params: tuple[str, ...] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Turn per-group keep vectors into NNI-format masks ``{module: {param: 0/1 float tensor}}``.

    ``keep[g.id]`` is a bool (or 0/1) vector of length ``g.size``; groups not in ``keep`` are
    kept whole. By default every member parameter gets a mask (weights, biases, and parameters
    such as position embeddings, class tokens and layer scales, which must be zeroed too for the
    masked model to equal the pruned one); BatchNorm running statistics are left alone. Pass
    ``params=("weight", "bias")`` for masks of NNI's own kind only.
    """
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups:
        if group.id not in keep:
            continue
        k = torch.as_tensor(keep[group.id]).bool().flatten()
        if k.numel() != group.size:
            raise ValueError(f"keep vector for group {group.id} has {k.numel()} entries, the group has {group.size}")
        for m in group.members:
            if (params is not None and m.param not in params) or (params is None and m.param in UNMASKED):
                continue
            tensor = _param(model, m.module, m.param)
            mask = masks.setdefault(m.module, {}).get(m.param)
            if mask is None:
                mask = torch.ones_like(tensor, dtype=torch.float32)
                masks[m.module][m.param] = mask
            idx = torch.tensor(m.index, dtype=torch.long, device=mask.device)
            values = k.to(mask.device)[torch.tensor(m.channel, dtype=torch.long, device=mask.device)].to(mask.dtype)
            shape = [1] * mask.dim()
            shape[m.dim] = -1
            sel = mask.index_select(m.dim, idx) * values.view(shape)
            mask.index_copy_(m.dim, idx, sel)
    return masks


def _alive(mask: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """Per group channel: does ``mask`` keep any of the member's positions of it?"""
    idx = torch.tensor(member.index, dtype=torch.long, device=mask.device)
    sel = mask.index_select(member.dim, idx).cpu().movedim(member.dim, 0).reshape(len(member.index), -1)
    alive = torch.zeros(size, dtype=torch.bool)
    alive.index_fill_(0, torch.tensor(member.channel, dtype=torch.long)[(sel != 0).any(dim=1)], True)
    return alive


def _module_votes(group: ChannelGroup, masks: Mapping[str, Mapping[str, torch.Tensor]], role: str) -> dict[str, torch.Tensor | None]:
    """For each module with a member of ``role``: the channels its masks keep (``None``: none of
    its tensors of that role is masked). A masked ``weight`` decides for its module: the other
    tensors (bias, gain, a norm's shift) only add a constant to a channel the weight removed."""
    weights: dict[str, torch.Tensor | None] = {}
    others: dict[str, torch.Tensor | None] = {}
    for m in group.members:
        if m.role != role:
            continue
        weights.setdefault(m.module, None)
        others.setdefault(m.module, None)
        mask = masks.get(m.module, {}).get(m.param)
        if mask is not None:
            table = weights if m.param == "weight" else others
            alive = _alive(mask, m, group.size)
            have = table[m.module]
            table[m.module] = alive if have is None else have | alive
    return {module: weights[module] if weights[module] is not None else others[module] for module in weights}


def keep_from_masks(
    groups: Iterable[ChannelGroup], masks: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[int, torch.Tensor]:
    """Reconcile NNI-format masks into one keep vector per group.

    Rule (documented in ``ModelSpeedup``): a channel is removed when the masks remove it from
    everything that produces it, or from everything that reads it:

    - producers are the modules with an ``out`` member (a conv's or linear's output rows, an
      embedding's columns). Each must be masked there and zero the channel in its weight (or, with
      no weight mask, in all of its masked tensors); a producer no mask mentions keeps the
      channel. The producer's other tensors (the bias) go with the channel, as in NNI's speedup:
      without its weights the channel is a constant, which NNI removes too.
    - readers are the modules with an ``in`` member (the next layers' input slices); each masked
      and zero at the channel: nothing reads it.
    - when no producer and no reader is masked, the per-channel members (norms: SlimPruner's
      masks) decide alike: every such module masked and its scale (weight) zero at the channel.

    A channel kept because some member still uses it is kept whole (the masks are baked into the
    weights, so partly zero channels compute what the masked model computes). A group no mask
    mentions, and every unprunable group, is kept whole.
    """
    result: dict[int, torch.Tensor] = {}
    for group in groups:
        removed = torch.zeros(group.size, dtype=torch.bool)
        if group.prunable:
            decided = False
            for role in ("out", "in", "norm"):
                votes = _module_votes(group, masks, role)
                masked = [v for v in votes.values() if v is not None]
                if role == "norm" and decided:
                    break
                decided = decided or bool(masked)
                if masked and len(masked) == len(votes):
                    alive = torch.stack(masked).any(dim=0)
                    removed |= ~alive
        result[group.id] = ~removed
    return result


def random_keep(groups: Iterable[ChannelGroup], ratio: float, seed: int) -> dict[int, torch.Tensor]:
    """Keep vectors that remove ``round(ratio * size)`` channels of every prunable group, chosen at
    random (seeded): the pruning the coverage benchmark and the integration tests apply."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        if group.prunable:
            k = torch.ones(group.size, dtype=torch.bool)
            k[torch.randperm(group.size, generator=gen)[: int(round(ratio * group.size))]] = False
            keep[group.id] = k
    return keep


def channel_norms(model: nn.Module, group: ChannelGroup, p: float = 2.0, roles: tuple[str, ...] = ("out",)) -> torch.Tensor:
    """The p-norm of each group channel over the weights of its members with the given roles.

    Falls back to every ``weight`` member when no member has one of ``roles``. Used to initialise
    importance scores (HYDRA-style magnitude initialisation, per channel).
    """
    chosen = [m for m in group.members if m.role in roles and m.param == "weight"]
    if not chosen:
        chosen = [m for m in group.members if m.param == "weight"]
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in chosen:
        w = _param(model, m.module, m.param).detach().to(torch.float64)
        idx = torch.tensor(m.index, dtype=torch.long, device=w.device)
        rows = w.index_select(m.dim, idx).movedim(m.dim, 0).reshape(len(m.index), -1)
        contrib = rows.abs().pow(p).sum(dim=1).cpu()
        total.index_add_(0, torch.tensor(m.channel, dtype=torch.long), contrib)
    return total.pow(1.0 / p).to(torch.float32)
