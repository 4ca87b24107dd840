"""Checks of setting values, written once for every package of ``nni_harp``.

What counts as an integer, a finite real number, a value in a range and a flag is decided here;
the message is not: each check takes ``error``, a function building the exception to raise, so
that every package keeps its own exception class and wording. Range checks pass ``error`` the
range as messages spell it (``'in (0, 1]'``, ``'in [8, 1024]'``, ``'>= 1'``); ``out_of_range``,
where given, replaces ``error`` for a value of the right type outside the range.
"""
from __future__ import annotations

import math
from typing import Callable, Collection, TypeVar

__all__ = ["is_int", "is_number", "is_real", "check_real", "check_int", "check_choice", "check_flag"]

T = TypeVar("T")
Error = Callable[[str], Exception]


def is_int(value: object) -> bool:
    """An ``int`` (``bool`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or a ``float``, finite or not (``bool`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite ``int`` or ``float`` (``bool`` is not one)."""
    return is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


def check_real(value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
               error: Error, out_of_range: Error | None = None) -> float:
    """``value`` as a ``float`` if it is a finite real number in the range from ``low`` to ``high``
    (each end closed unless ``*_open``; an infinite one written ``inf``), else raise."""
    span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if not is_real(value):
        raise error(span)
    v = float(value)  # type: ignore[arg-type]
    if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
        raise (out_of_range or error)(span)
    return v


def check_int(value: object, low: int, high: int | None = None, *, error: Error,
              out_of_range: Error | None = None) -> int:
    """``value`` if it is an ``int`` in ``[low, high]`` (``high=None``: no upper bound), else raise."""
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if not is_int(value):
        raise error(span)
    if value < low or (high is not None and value > high):  # type: ignore[operator]
        raise (out_of_range or error)(span)
    return value  # type: ignore[return-value]


def check_choice(value: T, allowed: Collection[object], error: Callable[[], Exception]) -> T:
    """``value`` if it is one of ``allowed``, else raise ``error()``."""
    if value not in allowed:
        raise error()
    return value


def check_flag(value: object, error: Callable[[], Exception]) -> bool:
    """``value`` if it is ``True`` or ``False``, else raise ``error()``."""
    if not isinstance(value, bool):
        raise error()
    return value
