"""Modules the speedup pass puts in place of norms whose statistics span removed channels."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ExactStatsNorm", "exact_stats_norm"]


def exact_stats_norm(
    x: torch.Tensor,
    kind: str,
    axis: int,
    reduce_all: bool,
    original: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
) -> torch.Tensor:
    """Normalise ``x`` as if the removed channels were still present and zero.

    In the masked model a removed channel is exactly zero, yet LayerNorm/RMSNorm (and one-group
    GroupNorm) still count it in their mean and variance. Computing the statistics with the
    original count keeps the pruned model equal to the masked one. ``kind``: 'layer' (centre and
    scale), 'rms' (scale by the root mean square), 'simple' (scale by the standard deviation).
    """
    if eps is None:  # torch's RMSNorm default: the machine epsilon of the input's dtype
        eps = torch.finfo(x.dtype).eps
    axis = axis % x.dim()
    dims = tuple(range(1, x.dim())) if reduce_all else (axis,)
    kept = x.shape[axis]
    per_channel = math.prod(x.shape[d] for d in dims) // kept
    total = float(per_channel * original)
    missing = float(per_channel * (original - kept))
    if kind == "rms":
        y = x * torch.rsqrt(x.pow(2).sum(dims, keepdim=True) / total + eps)
    else:
        mean = x.sum(dims, keepdim=True) / total
        centred = x - mean
        var = (centred.pow(2).sum(dims, keepdim=True) + missing * mean.pow(2)) / total
        y = (centred if kind == "layer" else x) * torch.rsqrt(var + eps)
    shape = [1] * x.dim()
    shape[axis] = kept
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


class ExactStatsNorm(nn.Module):
    """A LayerNorm / RMSNorm / one-group GroupNorm over ``num_channels`` kept channels out of
    ``original_channels``; see :func:`exact_stats_norm`."""

    def __init__(self, kind: str, axis: int, reduce_all: bool, original_channels: int,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float | None) -> None:
        super().__init__()
        if kind not in ("layer", "rms", "simple"):
            raise ValueError(f"kind must be 'layer', 'rms' or 'simple', got {kind!r}")
        self.kind, self.axis, self.reduce_all, self.eps = kind, axis, reduce_all, None if eps is None else float(eps)
        self.original_channels = int(original_channels)
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def num_channels(self) -> int:
        """Kept channels, read from the parameters (-1 without any), so it stays right when the
        speedup slices them again."""
        p = self.weight if self.weight is not None else self.bias
        return int(p.shape[0]) if p is not None else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exact_stats_norm(x, self.kind, self.axis, self.reduce_all, self.original_channels, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, channels={self.num_channels}/{self.original_channels}, axis={self.axis}, eps={self.eps}"
