"""``TensorImageDataset``: a whole dataset held in memory as one image tensor and one label tensor."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DatasetError

__all__ = ["TensorImageDataset"]


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """Samples ``(float32 [3, H', W'] in [0, 1], int label)`` from in-memory tensors.

    ``images`` is ``[N, C, H, W]`` with ``C`` 1 or 3, either ``uint8`` (0..255) or floating point
    already in ``[0, 1]``; one-channel images are repeated to three channels. ``transform`` (if
    any) receives a fresh float tensor ``[3, H, W]`` it may modify; the stored data is never
    handed out, so callers may modify returned samples in place.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
        name: str = "tensors",
    ) -> None:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DatasetError(f"{name}: images must be [N, C in (1, 3), H, W], got {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetError(
                f"{name}: labels must be [N] with N={images.shape[0]} (one per image), "
                f"got {tuple(labels.shape)}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise DatasetError(f"{name}: images must be uint8 or floating point, got {images.dtype}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if self.images.dtype == torch.uint8:
            x.div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset(name={self.name!r}, n={len(self)}, "
            f"images={tuple(self.images.shape)} {self.images.dtype}, transform={self.transform!r})"
        )
