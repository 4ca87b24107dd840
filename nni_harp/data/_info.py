"""``DatasetInfo``: what a model needs to know about a dataset (classes, input shape, statistics)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._checks import check_int
from .errors import DatasetError

__all__ = ["DatasetInfo", "MIN_IMAGE_SIZE", "MAX_IMAGE_SIZE", "check_image_size"]

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024


def check_image_size(image_size: object, field_name: str = "image_size") -> int:
    """Return ``image_size`` if it is an int in ``[MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]``, else raise."""
    return check_int(
        image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE,
        error=lambda span: DatasetError(
            f"{field_name} must be an int {span}, got {image_size!r} of type {type(image_size).__name__}"),
        out_of_range=lambda span: DatasetError(f"{field_name} must be {span} pixels, got {image_size}"),
    )


def _float_tuple(values: object, field_name: str, length: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{field_name} must be a sequence of {length} floats, got {values!r}") from exc
    if len(out) != length:
        raise DatasetError(
            f"{field_name} must have one value per input channel (in_chans={length}), "
            f"got {len(out)}: {out}"
        )
    if not all(math.isfinite(v) for v in out):
        raise DatasetError(f"{field_name} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a built dataset.

    ``mean``/``std`` are per-channel statistics of pixel values in ``[0, 1]``. The data itself is
    *not* normalised: the model wraps normalisation (``nni_harp.adversarial.with_normalization``)
    so that adversarial budgets stay in pixel space. ``class_names`` is optional (empty when not
    known); when given it has ``num_classes`` entries, index ``i`` naming label ``i``.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DatasetError(f"DatasetInfo.name must be a non-empty str, got {self.name!r}")
        for field_name, low in (("num_classes", 2), ("in_chans", 1)):
            value = getattr(self, field_name)
            check_int(value, low, error=lambda span: DatasetError(
                f"DatasetInfo.{field_name} must be an int {span}, got {value!r}"))
        check_image_size(self.image_size, "DatasetInfo.image_size")
        mean = _float_tuple(self.mean, "DatasetInfo.mean", self.in_chans)
        std = _float_tuple(self.std, "DatasetInfo.std", self.in_chans)
        if not all(0.0 <= m <= 1.0 for m in mean):
            raise DatasetError(f"DatasetInfo.mean must lie in [0, 1] (pixel scale), got {mean}")
        if not all(s > 0.0 for s in std):
            raise DatasetError(f"DatasetInfo.std must be > 0 in every channel, got {std}")
        names = tuple(self.class_names)
        if names and len(names) != self.num_classes:
            raise DatasetError(
                f"DatasetInfo.class_names must be empty or have num_classes={self.num_classes} "
                f"entries, got {len(names)}"
            )
        if not all(isinstance(n, str) for n in names):
            raise DatasetError(f"DatasetInfo.class_names must be strings, got {names!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "class_names", names)
