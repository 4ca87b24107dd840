"""Errors raised by :mod:`nni_harp.pruning`; each names the setting, config entry or module at fault.

Every error is a ``ValueError`` (callers that only catch ``ValueError`` keep working).
"""
from __future__ import annotations

__all__ = ["PruningError", "SettingsError", "ConfigListError", "StructureError", "MaskError"]


class PruningError(ValueError):
    """Base class of every error raised by the pruning package."""


class SettingsError(PruningError):
    """A :class:`~nni_harp.pruning.HARPSettings` field is outside its allowed range."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"HARPSettings.{field}={value!r} is invalid: {field} must be {allowed}")


class ConfigListError(PruningError):
    """An entry of an NNI ``config_list`` cannot be used by HARP."""

    def __init__(self, index: int | None, message: str) -> None:
        self.index = index
        where = "config_list" if index is None else f"config_list[{index}]"
        super().__init__(f"{where}: {message}")


class StructureError(PruningError):
    """The channel structure (groups, cost model) cannot meet the requested budget or is inconsistent."""


class MaskError(PruningError):
    """Masks do not fit the model they are applied to; the message names the module and parameter."""

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module
