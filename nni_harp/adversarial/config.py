"""Settings of an L-inf / L2 projected-gradient attack, shared by attacks, losses and evaluation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .._checks import check_flag, check_int, check_real, is_number
from .errors import AttackConfigError, UnknownNameError

__all__ = ["NORMS", "Norm", "AttackConfig"]

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")

# torchattacks spells the norms differently.
_TORCHATTACKS_NORM: dict[str, str] = {"linf": "Linf", "l2": "L2"}


def _positive_float(field: str, value: object, upper: float = math.inf) -> None:
    bound = "a finite number > 0" if math.isinf(upper) else f"in (0, {upper:g}]"
    # an infinite or NaN number is out of bounds, anything else that is no number is no real number
    check_real(value, 0.0, upper, low_open=True,
               error=lambda _: AttackConfigError(field, value, bound if is_number(value) else "a real number"))


@dataclass(frozen=True)
class AttackConfig:
    """How the adversary searches for a perturbation.

    Distances are measured on inputs in pixel space ``[0, 1]`` (wrap normalising models with
    :func:`nni_harp.adversarial.with_normalization`).

    Args:
        norm: ``'linf'`` (box of half-width ``eps``) or ``'l2'`` (Euclidean ball of radius ``eps``,
            per sample over all input dimensions).
        eps: radius of the threat model; in ``(0, 1]`` for ``'linf'``, ``> 0`` for ``'l2'``.
        step_size: size of one ascent step (L-inf: per coordinate; L2: Euclidean length), ``> 0``.
        steps: number of ascent steps, an ``int >= 1``.
        random_start: start from a uniformly random point of the ball instead of the input.
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise UnknownNameError("norm", self.norm, NORMS)
        _positive_float("eps", self.eps, upper=1.0 if self.norm == "linf" else math.inf)
        _positive_float("step_size", self.step_size)
        check_int(self.steps, 1, error=lambda span: AttackConfigError("steps", self.steps, f"an int {span}"))
        check_flag(self.random_start, lambda: AttackConfigError("random_start", self.random_start, "True or False"))

    @property
    def torchattacks_norm(self) -> str:
        """The norm as torchattacks names it (``'Linf'`` or ``'L2'``)."""
        return _TORCHATTACKS_NORM[self.norm]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
