"""Norms whose statistics span the channels, as pruning needs them: :class:`ExactStatsNorm`, what the
speedup puts in place of such a norm whose channels went (it counts the removed ones as zeros);
:class:`KeptStatsNorm`, what a masked model is fine-tuned with instead (statistics over the kept
channels only), which the speedup turns into a plain norm of the kept width; :class:`ChannelsFirstNorm`,
that plain norm for channels-first tensors (timm's ``LayerNorm2d``, ``RmsNorm2d``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExactStatsNorm", "exact_stats_norm", "KeptStatsNorm", "kept_stats_norm", "ChannelsFirstNorm"]


#: What a norm whose statistics span the channels does with them: centre and scale ('layer'), scale
#: by the root mean square ('rms'), scale by the (unbiased) standard deviation ('simple', timm's SimpleNorm).
KINDS = ("layer", "rms", "simple")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")


def _parameter(value: torch.Tensor | None) -> nn.Parameter | None:
    """``value`` as a parameter (itself if it is one already; ``None`` stays ``None``)."""
    return value if value is None or isinstance(value, nn.Parameter) else nn.Parameter(value)


def _reduction(x: torch.Tensor, axis: int, reduce_all: bool, eps: float | None) -> tuple[int, tuple[int, ...], list[int], float]:
    """The channel axis (non-negative), the axes the statistics reduce over, the shape of a per-channel
    parameter broadcast against ``x``, and ``eps`` (``None``: the machine epsilon of ``x``'s dtype,
    torch's RMSNorm default)."""
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return (axis, tuple(range(1, x.dim())) if reduce_all else (axis,), shape,
            torch.finfo(x.dtype).eps if eps is None else eps)


def _affine(y: torch.Tensor, shape: list[int], weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y * weight + bias`` with the per-channel parameters reshaped to ``shape``."""
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


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
    scale), 'rms' (scale by the root mean square), 'simple' (scale by the standard deviation, the
    unbiased one as timm's SimpleNorm takes it).
    """
    axis, dims, shape, eps = _reduction(x, axis, reduce_all, eps)
    kept = x.shape[axis]
    per_channel = math.prod(x.shape[d] for d in dims) // kept
    total = float(per_channel * original)
    missing = float(per_channel * (original - kept))
    if kind == "rms":
        y = x * torch.rsqrt(x.pow(2).sum(dims, keepdim=True) / total + eps)
    else:
        mean = x.sum(dims, keepdim=True) / total
        centred = x - mean
        # timm's SimpleNorm ('simple') takes torch.var's unbiased variance: n - 1
        var = (centred.pow(2).sum(dims, keepdim=True) + missing * mean.pow(2)) / (total - int(kind == "simple"))
        y = (centred if kind == "layer" else x) * torch.rsqrt(var + eps)
    return _affine(y, shape, weight, bias)


class ExactStatsNorm(nn.Module):
    """A LayerNorm / RMSNorm / one-group GroupNorm over ``num_channels`` kept channels out of
    ``original_channels``; see :func:`exact_stats_norm`."""

    def __init__(self, kind: str, axis: int, reduce_all: bool, original_channels: int,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float | None) -> None:
        super().__init__()
        _check_kind(kind)
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


def kept_stats_norm(
    x: torch.Tensor,
    kind: str,
    axis: int,
    reduce_all: bool,
    keep: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
) -> torch.Tensor:
    """Normalise ``x`` with statistics over the channels ``keep`` (a bool vector along ``axis``) only,
    as a norm of the kept width would: the removed channels neither count nor add to the sums.
    ``kind``, ``reduce_all`` and the rest as in :func:`exact_stats_norm`; outputs of removed channels
    are what the affine gives (their masked weight and bias make them zero)."""
    axis, dims, shape, eps = _reduction(x, axis, reduce_all, eps)
    kept = keep.to(device=x.device, dtype=x.dtype).reshape(shape)
    count = kept.sum() * (math.prod(x.shape[d] for d in dims) // x.shape[axis])
    if kind == "rms":
        y = x * torch.rsqrt((x * kept).pow(2).sum(dims, keepdim=True) / count + eps)
    else:
        centred = x - (x * kept).sum(dims, keepdim=True) / count
        var = (centred * kept).pow(2).sum(dims, keepdim=True) / (count - int(kind == "simple"))  # as exact_stats_norm
        y = (centred if kind == "layer" else x) * torch.rsqrt(var + eps)
    return _affine(y, shape, weight, bias)


class KeptStatsNorm(nn.Module):
    """A LayerNorm / RMSNorm / one-group GroupNorm (``kind``, ``axis``, ``reduce_all`` as in
    :class:`ExactStatsNorm`) whose statistics cover only the channels ``keep`` says stay: the masked
    model to fine-tune when those channels will be removed, since the speedup then emits a plain norm
    of the kept width and the pruned model equals it exactly. ``keep`` is a non-persistent buffer,
    so the state dict has the keys of the norm it replaces (``weight``, ``bias``; timm's norm+act
    layers: their ``drop`` and ``act``, applied after it, as theirs). Built by
    :func:`graph_passes.kept_stats_norms`."""

    keep: torch.Tensor

    def __init__(self, kind: str, axis: int, reduce_all: bool, keep: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float | None, drop: nn.Module | None = None,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        _check_kind(kind)
        keep = torch.as_tensor(keep).bool().flatten()
        if not keep.any():
            raise ValueError("keep must keep at least one channel")
        self.kind, self.axis, self.reduce_all, self.eps = kind, axis, reduce_all, None if eps is None else float(eps)
        self.weight, self.bias = _parameter(weight), _parameter(bias)
        self.register_buffer("keep", keep.to(weight.device if weight is not None else keep.device), persistent=False)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kept_stats_norm(x, self.kind, self.axis, self.reduce_all, self.keep, self.weight, self.bias, self.eps)
        return self.act(self.drop(y))

    def extra_repr(self) -> str:
        return f"{self.kind}, channels={int(self.keep.sum())}/{self.keep.numel()} kept, axis={self.axis}, eps={self.eps}"


class ChannelsFirstNorm(nn.Module):
    """A layer norm (``kind='layer'``) or RMS norm (``'rms'``) over axis 1 of an ``(N, C, ...)`` tensor,
    as timm's ``LayerNorm2d`` computes it: channels moved last, ``F.layer_norm`` / ``F.rms_norm``,
    moved back, so it exports as one ``LayerNormalization`` between two ``Transpose`` nodes."""

    def __init__(self, kind: str, num_channels: int, eps: float | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        if kind not in ("layer", "rms") or (kind == "rms" and bias is not None) or (kind == "layer" and eps is None):
            raise ValueError(f"a channels-first norm is a layer norm (with an eps) or a bias-free RMS norm, got {kind!r}")
        self.kind, self.eps, self.normalized_shape = kind, None if eps is None else float(eps), (int(num_channels),)
        self.weight, self.bias = _parameter(weight), _parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.dim() - 1  # explicit permutations: the ONNX exporter writes movedim's negative axes as they are
        x = x.permute(0, *range(2, last + 1), 1)
        if self.kind == "rms":
            x = F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, last, *range(1, last))

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.normalized_shape[0]}, eps={self.eps}"
