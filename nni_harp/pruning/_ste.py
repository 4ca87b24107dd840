"""Top-k masks with straight-through gradients, and the rate parametrisation that feeds them.

A unit (a layer's weight, or a channel group) of ``n`` entries keeps the ``round(k * n)`` entries
with the largest ``|s|`` (never fewer than one). The rate is ``k = floor + (ceiling - floor) *
sigmoid(r)``, so ``k`` can never leave ``[floor, ceiling]`` whatever ``r`` is.

Backward pass (HYDRA / HARP): the mask's gradient goes unchanged to ``|s|`` (so ``s`` gets
``sign(s) * dL/dmask``) and its sum over the unit goes to ``k``; a rate can thus grow or shrink.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["keep_from_rate", "rate_for_keep", "keep_count", "topk_mask", "straight_through_mask"]

_EPS = 1e-6


def keep_from_rate(rate: Tensor, floor: float, ceiling: float) -> Tensor:
    """``k = floor + (ceiling - floor) * sigmoid(rate)``: differentiable, always in ``[floor, ceiling]``."""
    return floor + (ceiling - floor) * torch.sigmoid(rate)


#: How far inside ``(floor, ceiling)`` a rate starts, as a fraction of the range (the authors' 1e-2):
#: a unit started at its ceiling (``init_allocation='dense'``) or floor is then ``logit(0.99) = 4.6``
#: from the middle, where the sigmoid still has 1 % of its slope, not 14 (``logit(1 - 1e-6)``).
START_MARGIN = 1e-2


def rate_for_keep(keep: float, floor: float, ceiling: float, margin: float = _EPS) -> float:
    """The rate whose kept fraction is ``keep``, clipped to ``margin`` of the range inside
    ``(floor, ceiling)``."""
    if ceiling - floor <= 0.0:
        return 0.0
    p = min(max((keep - floor) / (ceiling - floor), margin), 1.0 - margin)
    return math.log(p / (1.0 - p))


def keep_count(keep: float, n: int) -> int:
    """How many of ``n`` entries a kept fraction ``keep`` keeps: ``round(keep * n)``, at least 1."""
    if n < 1:
        raise ValueError(f"a unit needs at least one entry, got n={n}")
    return int(min(n, max(1, round(float(keep) * n))))


@torch.no_grad()
def topk_mask(scores_abs: Tensor, count: int) -> Tensor:
    """A float 0/1 tensor shaped like ``scores_abs`` with ones at its ``count`` largest entries."""
    flat = scores_abs.detach().reshape(-1)
    count = int(min(max(count, 0), flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.float32)
    if count > 0:
        mask[torch.topk(flat, count, sorted=False).indices] = 1.0
    return mask.view_as(scores_abs)


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the precomputed hard top-k mask. Backward: identity to the scores, sum to the rate."""

    @staticmethod
    def forward(ctx: Any, scores_abs: Tensor, keep: Tensor, hard: Tensor) -> Tensor:  # type: ignore[override]
        ctx.keep_shape = keep.shape
        return hard.to(scores_abs.dtype).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        return grad, grad.sum().reshape(ctx.keep_shape), None


def straight_through_mask(scores_abs: Tensor, keep: Tensor, hard: Tensor) -> Tensor:
    """The hard mask ``hard`` (which must be the top-``keep_count(keep)`` of ``scores_abs``) with
    straight-through gradients to ``scores_abs`` and ``keep``."""
    if hard.shape != scores_abs.shape:
        raise ValueError(f"hard mask of shape {tuple(hard.shape)} does not match scores of shape {tuple(scores_abs.shape)}")
    return _TopKStraightThrough.apply(scores_abs, keep, hard)
