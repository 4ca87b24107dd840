"""Shared helpers for the graph_passes tests: mask a model by channel groups, prune it, compare."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn

import graph_passes as gp
from graph_passes.tracing import as_tuple


@dataclass
class Pruned:
    model: nn.Module
    pruned: fx.GraphModule
    masked: nn.Module
    groups: list[gp.ChannelGroup]
    keep: dict[int, torch.Tensor]
    masks: dict[str, dict[str, torch.Tensor]]


def random_keep(groups: list[gp.ChannelGroup], seed: int = 0, fraction: float = 0.5) -> dict[int, torch.Tensor]:
    """A keep vector for every prunable group: about ``fraction`` of its channels, never none,
    never all (so every prunable group really shrinks)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        if not g.prunable:
            continue
        n_keep = min(g.size - 1, max(1, round(g.size * fraction)))
        vec = torch.zeros(g.size, dtype=torch.bool)
        vec[torch.randperm(g.size, generator=gen)[:n_keep]] = True
        keep[g.id] = vec
    return keep


def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module_name, params in masks.items():
            owner = masked.get_submodule(module_name) if module_name else masked
            for pname, mask in params.items():
                getattr(owner, pname).mul_(mask)
    return masked


def outputs(model: nn.Module, x: Any) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(*as_tuple(x))
    return [t for t in (out if isinstance(out, (list, tuple)) else [out])]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        assert torch.allclose(x, y, rtol=rtol, atol=atol), (x - y).abs().max().item()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(model: nn.Module, x: Any, keep: dict[int, torch.Tensor] | None = None,
          choose: Callable[[list[gp.ChannelGroup]], dict[int, torch.Tensor]] | None = None, seed: int = 0) -> Pruned:
    """Find the groups, mask ``model`` by ``keep`` (random by default), prune it with
    ``ModelSpeedup`` and assert the pruned model's outputs equal the masked model's."""
    torch.manual_seed(seed)
    model = model.eval()
    groups = gp.channel_groups(copy.deepcopy(model), x)
    if keep is None:
        keep = choose(groups) if choose is not None else random_keep(groups, seed)
    masks = gp.group_masks(model, groups, keep)
    masked = apply_masks(model, masks)
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(masked, x))
    return Pruned(model, pruned, masked, groups, keep, masks)


def kept_count(result: Pruned, module: str, param: str = "weight", dim: int = 0) -> int:
    """How many positions of ``module.param`` along ``dim`` the keep vectors leave."""
    total = 0
    size = result.model.get_submodule(module).get_parameter(param).shape[dim]
    alive = torch.ones(size, dtype=torch.bool)
    for g in result.groups:
        if g.id not in result.keep:
            continue
        for m in g.members:
            if (m.module, m.param, m.dim) == (module, param, dim):
                k = result.keep[g.id][torch.tensor(m.channel)]
                alive[torch.tensor(m.index)] &= k
    total = int(alive.sum())
    return total


def group_of(groups: list[gp.ChannelGroup], module: str, param: str = "weight", dim: int = 0) -> gp.ChannelGroup:
    found = [g for g in groups if any((m.module, m.param, m.dim) == (module, param, dim) for m in g.members)]
    assert len(found) == 1, f"{module}.{param}[{dim}] is in {len(found)} groups: {found}"
    return found[0]
