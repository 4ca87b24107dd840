"""A pruning unit: the importance scores, the rate and the current hard mask of one layer's weight
(unstructured) or of one channel group (structured).

The tensors live on an NNI module wrapper as ``{attr}_score`` / ``{attr}_rate`` (parameters) and
``{attr}_keep`` (buffer), the way NNI's MovementPruner keeps its scores: they follow the model
through ``.to()``, are seen by DistributedDataParallel and leave with :meth:`ScoreUnit.detach`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from graph_passes.groups import grid_step

from ._ste import (START_MARGIN, count_grid, keep_count, keep_from_rate, nearest_count, rate_for_keep,
                   straight_through_mask)
from ._topk import CutTracker, fill_topk

__all__ = ["ScoreUnit", "hydra_scores"]


def hydra_scores(values: Tensor, fan_in: int) -> Tensor:
    """HYDRA's score initialisation ``sqrt(6 / fan_in) * v / max|v|`` (``v``: weights or channel norms)."""
    values = values.detach().to(torch.float32)
    scale = values.abs().max().clamp_min(1e-12)
    return (6.0 / max(fan_in, 1)) ** 0.5 * values / scale


class ScoreUnit:
    """One unit HARP decides a kept fraction for."""

    def __init__(
        self,
        name: str,
        owner: nn.Module,
        attr: str,
        init_scores: Tensor,
        floor: float,
        ceiling: float,
        init_keep: float,
        learn_rate: bool,
        round_to: int = 1,
    ) -> None:
        if not 0.0 <= floor <= ceiling <= 1.0:
            raise ValueError(f"unit {name}: need 0 <= floor <= ceiling <= 1, got floor={floor}, ceiling={ceiling}")
        self.name = name
        self.owner = owner
        self.attr = attr
        self.floor = float(floor)
        self.ceiling = float(ceiling)
        self.size = int(init_scores.numel())
        self.min_count = keep_count(self.floor, self.size)
        self.max_count = max(self.min_count, keep_count(self.ceiling, self.size))
        # the counts the unit may keep (channel groups: multiples of round_to, graph_passes.grid_step);
        # the hard mask keeps one of them while learning, as the final masks will
        self.multiple = grid_step(self.size, round_to)
        self.grid = count_grid(self.min_count, self.max_count, self.multiple)
        device = next(iter(owner.parameters()), None)
        if device is None:
            device = next(iter(owner.buffers()), None)
        where = device.device if device is not None else torch.device("cpu")
        scores = init_scores.detach().to(device=where, dtype=torch.float32).clone()
        rate = torch.tensor(rate_for_keep(init_keep, self.floor, self.ceiling, START_MARGIN), device=where)
        owner.register_parameter(f"{attr}_score", nn.Parameter(scores))
        owner.register_parameter(f"{attr}_rate", nn.Parameter(rate, requires_grad=learn_rate))
        owner.register_buffer(f"{attr}_keep", torch.zeros_like(scores))
        self._cut = CutTracker()  # where the last refresh cut the scores: a head start for the next
        self.refresh()

    # read from the owner's parameter and buffer dicts (as Module.__getattr__ does, without its call:
    # several reads per unit and forward pass)
    @property
    def scores(self) -> nn.Parameter:
        return self.owner._parameters[f"{self.attr}_score"]  # type: ignore[return-value]

    @property
    def rate(self) -> nn.Parameter:
        return self.owner._parameters[f"{self.attr}_rate"]  # type: ignore[return-value]

    @property
    def hard(self) -> Tensor:
        """The current 0/1 mask over the unit's scores."""
        return self.owner._buffers[f"{self.attr}_keep"]  # type: ignore[return-value]

    def keep(self) -> Tensor:
        """The kept fraction ``k`` as a differentiable 0-dim tensor, always in ``[floor, ceiling]``."""
        return keep_from_rate(self.rate, self.floor, self.ceiling)

    def keep_value(self) -> float:
        return float(self.keep().detach())

    def target_count(self) -> int:
        """How many entries the current rate keeps: the allowed count nearest to ``keep * size``."""
        return nearest_count(self.keep_value() * self.size, self.min_count, self.max_count, self.grid)

    def count(self) -> int:
        """How many entries the current hard mask keeps."""
        return int(self.hard.sum().item())

    def soft_mask(self) -> Tensor:
        """The hard mask, with straight-through gradients to the scores and the rate."""
        return straight_through_mask(self.scores.abs(), self.keep(), self.hard)

    @torch.no_grad()
    def refresh(self, count: int | None = None) -> None:
        """Recompute the hard mask: the top ``count`` (default: the rate's count) of ``|scores|``."""
        count = self.target_count() if count is None else int(count)
        fill_topk(self.hard, self.scores.abs(), count, self._cut)

    @torch.no_grad()
    def set_keep(self, keep: float) -> None:
        """Move the rate so that the kept fraction is ``keep`` (clipped into ``[floor, ceiling]``)."""
        self.rate.fill_(rate_for_keep(keep, self.floor, self.ceiling))

    def detach(self) -> None:
        """Remove the unit's tensors from its owner module."""
        for suffix in ("_score", "_rate", "_keep"):
            name = f"{self.attr}{suffix}"
            if hasattr(self.owner, name):
                delattr(self.owner, name)

    def __repr__(self) -> str:
        return f"ScoreUnit({self.name!r}, size={self.size}, floor={self.floor:.4f}, ceiling={self.ceiling:.4f})"
