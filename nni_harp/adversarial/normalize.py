"""Move input normalisation inside the model, so that attacks work in pixel space ``[0, 1]``.

A timm model expects ``(x - mean) / std``. Attacking that normalised input directly would measure
``eps`` in units of the standard deviation, per channel. Wrapping the model with
:func:`with_normalization` keeps the published threat model (e.g. ``eps = 8/255`` on pixels).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import AttackConfigError

__all__ = ["InputNormalization", "with_normalization"]


def _channel_stats(field: str, values: Sequence[float] | Tensor, positive: bool) -> Tensor:
    if isinstance(values, Tensor):
        flat = [float(v) for v in values.detach().flatten().tolist()]
    elif isinstance(values, Sequence) and not isinstance(values, str):
        flat = [float(v) for v in values]
    else:
        raise AttackConfigError(field, values, "a sequence of per-channel floats")
    if not flat:
        raise AttackConfigError(field, values, "a non-empty sequence of per-channel floats")
    if not all(math.isfinite(v) for v in flat) or (positive and min(flat) <= 0):
        allowed = "finite floats > 0, one per channel" if positive else "finite floats, one per channel"
        raise AttackConfigError(field, values, allowed)
    return torch.tensor(flat, dtype=torch.float32).view(-1, 1, 1)


class InputNormalization(nn.Module):
    """``model((x - mean) / std)`` for channel-first images ``x`` of shape ``[N, C, H, W]``.

    The wrapped model is ``self.model``, so parameter and module names gain a ``model.`` prefix.
    ``mean`` and ``std`` are non-persistent buffers: they follow ``.to(device)`` but are not part
    of the state dict (the wrapped model's state dict is unchanged apart from the prefix).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # No Python-level checks here: the forward must stay traceable by torch.fx.
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def with_normalization(
    model: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> InputNormalization:
    """Wrap ``model`` so that it takes inputs in ``[0, 1]`` and normalises them itself.

    ``mean`` and ``std`` hold one value per input channel (e.g. a timm model's
    ``pretrained_cfg['mean']`` / ``['std']``); every ``std`` must be ``> 0``. The buffers are
    placed on the device of the model's first parameter.
    """
    if not isinstance(model, nn.Module):
        raise AttackConfigError("model", type(model).__name__, "a torch.nn.Module")
    mean_t = _channel_stats("mean", mean, positive=False)
    std_t = _channel_stats("std", std, positive=True)
    if mean_t.shape != std_t.shape:
        raise AttackConfigError(
            "std", std, f"a sequence with as many values as mean ({mean_t.shape[0]} channels)"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return InputNormalization(model, mean_t.to(device), std_t.to(device))
