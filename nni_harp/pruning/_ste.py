"""Straight-through gradients of top-k masks (the masks themselves: ``_topk``), and the rate parametrisation that feeds them.

A unit (a layer's weight, or a channel group) of ``n`` entries keeps the ``round(k * n)`` entries
with the largest ``|s|`` (never fewer than one; a channel group counted in blocks of ``round_to``
keeps the count of :func:`count_grid` nearest to ``k * n``). The rate is ``k = floor + (ceiling - floor) *
sigmoid(r)``, so ``k`` can never leave ``[floor, ceiling]`` whatever ``r`` is.

Backward pass (HYDRA / HARP): the mask's gradient goes unchanged to ``|s|`` (so ``s`` gets
``sign(s) * dL/dmask``) and its sum over the unit goes to ``k``; a rate can thus grow or shrink.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["keep_from_rate", "rate_for_keep", "keep_count", "count_grid", "nearest_count", "straight_through_mask",
           "masked_straight_through", "given_product"]

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


def count_grid(low: int, high: int, multiple: int) -> tuple[int, ...] | None:
    """The counts a unit bounded by ``[low, high]`` may keep when restricted to multiples of
    ``multiple``: those multiples, and ``high`` (a unit can always stay whole); ``None`` (any count)
    for ``multiple <= 1`` or bounds that hold fewer than two such counts."""
    if multiple <= 1:
        return None
    grid = tuple(sorted(set(range(multiple * -(-low // multiple), high + 1, multiple)) | {high}))
    return grid if len(grid) > 1 else None


def nearest_count(value: float, low: int, high: int, grid: tuple[int, ...] | None) -> int:
    """The allowed count nearest to ``value`` (the lower one on a tie): on ``grid`` (:func:`count_grid`)
    when there is one, else ``round(value)`` within ``[low, high]``."""
    if grid is not None:
        return min(grid, key=lambda c: (abs(c - value), c))
    return int(min(high, max(low, round(value))))


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


class _MaskedStraightThrough(torch.autograd.Function):
    """``target * straight_through_mask(|scores|, keep, hard)`` in one node, forward value given.

    Gradients as the unfused chain gives them, operation for operation (so bit for bit): the mask
    gets ``g * target`` (mul's backward), ``keep`` its sum, ``scores`` that times ``sgn(scores)``
    (abs's backward; ``sign``, the same values for real scores, is about 3x faster than ``sgn``,
    which also handles complex numbers), ``target`` ``g * mask``."""

    @staticmethod
    def forward(ctx: Any, target: Tensor, scores: Tensor, keep: Tensor, hard: Tensor,  # type: ignore[override]
                product: Tensor) -> Tensor:
        ctx.keep_shape = keep.shape
        ctx.save_for_backward(target, scores, hard if ctx.needs_input_grad[0] else None)
        return product.detach()  # a new tensor object: autograd's grad_fn must not stick to the caller's

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        target, scores, hard = ctx.saved_tensors
        g_target = grad * hard.view_as(grad).to(grad.dtype) if ctx.needs_input_grad[0] else None
        g_scores = g_keep = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_mask = (grad * target).view_as(scores).to(scores.dtype)
            if ctx.needs_input_grad[2]:
                g_keep = g_mask.sum().reshape(ctx.keep_shape)
            if ctx.needs_input_grad[1]:
                g_scores = g_mask.mul_(scores.sign())  # in place: g_mask is not needed any more
        return g_target, g_scores, g_keep, None, None


def masked_straight_through(target: Tensor, scores: Tensor, keep: Tensor, hard: Tensor, product: Tensor) -> Tensor:
    """``target * straight_through_mask(scores.abs(), keep, hard).view_as(target)``, whose value
    ``product`` (``target * hard``) the caller computed: the same value and gradients, without
    the ``|scores|``, mask and product temporaries."""
    if hard.shape != scores.shape or product.shape != target.shape:
        raise ValueError(f"hard mask {tuple(hard.shape)}, scores {tuple(scores.shape)}, product {tuple(product.shape)} "
                         f"and target {tuple(target.shape)} do not match")
    return _MaskedStraightThrough.apply(target, scores, keep, hard, product)


class _GivenProduct(torch.autograd.Function):
    """``torch.mul(target, mask)`` whose value ``product`` the caller computed; ``mask`` may
    broadcast. Gradients as mul's: ``g * mask`` and ``g * target`` summed to ``mask``'s shape."""

    @staticmethod
    def forward(ctx: Any, target: Tensor, mask: Tensor, product: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(target if ctx.needs_input_grad[1] else None, mask if ctx.needs_input_grad[0] else None)
        ctx.mask_shape = mask.shape
        return product.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        target, mask = ctx.saved_tensors
        g_target = grad * mask if ctx.needs_input_grad[0] else None
        g_mask = (grad * target).sum_to_size(ctx.mask_shape) if ctx.needs_input_grad[1] else None
        return g_target, g_mask, None


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """``torch.broadcast_shapes(target, shape) == target`` (which takes ~50 us a call, per forward
    pass and target)."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def given_product(target: Tensor, mask: Tensor, product: Tensor) -> Tensor:
    """``torch.mul(target, mask)`` (same value and gradients), its value ``product`` given."""
    if product.shape != target.shape or not _broadcasts_to(mask.shape, target.shape):
        raise ValueError(f"mask {tuple(mask.shape)} and product {tuple(product.shape)} do not fit target "
                         f"{tuple(target.shape)}")
    return _GivenProduct.apply(target, mask, product)
