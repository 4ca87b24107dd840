"""Per-sample transforms. Inputs and outputs are float tensors ``[C, H, W]`` in ``[0, 1]``.

Augmentation draws from torch's global RNG; inside ``DataLoader`` workers that RNG is seeded from
the loader's generator, so a seeded loader with ``num_workers > 0`` reproduces its augmentation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["ResizeClamp", "ToPlainTensor", "tensor_transform", "pil_train_transform", "pil_eval_transform"]

#: ImageNet convention: evaluate on a centre crop covering 87.5 % of the resized shorter side.
EVAL_CROP_PCT = 0.875


class ResizeClamp:
    """Bilinear resize of ``[C, H, W]`` or ``[N, C, H, W]`` to ``size x size``, clamped to [0, 1].

    Antialiased when shrinking. A no-op (same tensor) when the input already has that size.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        batch = x if x.dim() == 4 else x.unsqueeze(0)
        shrink = batch.shape[-1] > self.size or batch.shape[-2] > self.size
        out = F.interpolate(
            batch, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink
        ).clamp_(0.0, 1.0)
        return out if x.dim() == 4 else out.squeeze(0)

    def __repr__(self) -> str:
        return f"ResizeClamp(size={self.size})"


class ToPlainTensor:
    """Strip the ``tv_tensors.Image`` subclass so that samples are plain ``torch.Tensor``."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.as_subclass(Tensor)


def tensor_transform(
    image_size: int, native_size: int, train: bool, padding: int = 4, flip: bool = True
) -> v2.Compose | ResizeClamp | None:
    """Transform for datasets stored as tensors at ``native_size``.

    Train: random crop of ``native_size`` after zero padding by ``padding`` (the CIFAR recipe),
    optional horizontal flip, then resize to ``image_size``. Eval: resize only. ``None`` when there
    is nothing to do.
    """
    resize = ResizeClamp(image_size) if image_size != native_size else None
    if not train:
        return resize
    steps: list[object] = [v2.RandomCrop(native_size, padding=padding, fill=0.0)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if resize is not None:
        steps.append(resize)
    return v2.Compose(steps)


def pil_train_transform(image_size: int) -> v2.Compose:
    """PIL image -> random-resized crop (default scale 0.08..1) + horizontal flip, float in [0, 1]."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            ToPlainTensor(),
        ]
    )


def pil_eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> resize shorter side to ``image_size / 0.875``, centre crop, float in [0, 1]."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(image_size / EVAL_CROP_PCT), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            ToPlainTensor(),
        ]
    )
