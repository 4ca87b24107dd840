"""Settings declared once: :func:`setting` declares a field of a settings dataclass together with
what the command line, the NNI trial and the resume check need, and they read it back with
:func:`declared_settings` (``nni_harp._cli_args``, ``nni_harp.trial``, ``PipelineConfig.RESUME_KEYS``);
:func:`setting_like` declares a setting another settings class shares (``EvaluateConfig``).
A bad value is a :class:`ConfigError` that names the setting; :func:`coerce_number` reads numbers
from loosely typed sources (NNI's search spaces, ``--param`` strings)."""
from __future__ import annotations

import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

__all__ = [
    "ConfigError", "setting", "setting_like", "declared_settings", "setting_type", "is_optional", "resume_keys",
    "resume_defaults", "coerce_number",
]


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def setting(default: Any, help: str, *, choices: Callable[[], tuple[str, ...]] | None = None,
            metavar: str | None = None, group: str | None = "pruning target", resume: bool = True,
            flag: str | None = None, cli_default: Any = MISSING, hidden: bool = False,
            older_runs_default: bool = False, older_runs: Any = MISSING) -> Any:
    """A dataclass field declared with what the command line, the NNI trial and the resume check
    need, so that they are derived from it and nothing is written twice.

    ``default``: the field's default (``dataclasses.MISSING``: a required field, a positional
    argument on the command line, or a required option where ``flag`` names one). ``help``: for ``--help`` (argparse's ``%(default)s`` works).
    ``choices``: a function returning the allowed names, so that a registry is read when it is
    asked, not at import (the config's check uses the same function). ``metavar`` and ``group``:
    how ``--help`` shows it (``group=None``: among the parser's own arguments). ``resume``: a run
    may only be continued with the same value. ``flag``: the option's name where it is not
    ``--field-name``; a boolean's flag turns its default around (``--no-onnx`` sets
    ``export_onnx=False``). ``cli_default``: the command line's default where it differs (the
    command then derives the value, e.g. ``output_dir``). ``hidden``: an option kept out of
    ``--help`` (testing knobs). ``older_runs_default``: a stored run whose record lacks the
    setting (it came later) resumes as if it had the default; ``older_runs``: as if it had this
    value instead (what nni-harp did before the setting existed, where the default changed that).
    """
    if older_runs_default:
        older_runs = default
    metadata = {"help": help, "choices": choices, "metavar": metavar, "group": group, "resume": resume,
                "flag": flag, "cli_default": cli_default, "hidden": hidden, "older_runs": older_runs}
    return field(default=default, metadata=metadata)


def declared_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``, as declared there (once)."""
    return cls.__dataclass_fields__[name].default


def setting_like(cls: type, name: str, **changes: Any) -> Any:
    """A field declared as ``cls``'s setting ``name`` is, with ``changes`` to the arguments of
    :func:`setting` (``default``, ``help``, ``group``, ...): another settings class that shares a
    setting (``EvaluateConfig``'s attacks) declares it with this, so its default and help exist once."""
    f = cls.__dataclass_fields__[name]
    return setting(**{"default": f.default, **f.metadata, **changes})


def _default_cls(cls: type | None) -> type:
    if cls is not None:
        return cls
    from .config import PipelineConfig

    return PipelineConfig


def declared_settings(cls: type | None = None) -> tuple[Field, ...]:
    """The fields of ``cls`` (default :class:`~nni_harp.pipeline.PipelineConfig`) declared with
    :func:`setting`, in the order of the class."""
    return tuple(f for f in fields(_default_cls(cls)) if "help" in f.metadata)


def _hint(f: Field, cls: type | None) -> Any:
    return typing.get_type_hints(_default_cls(cls))[f.name]


def setting_type(f: Field, cls: type | None = None) -> type:
    """The value type of a declared field (``int``, ``float``, ``str``, ``bool``), ``None`` stripped."""
    hint = _hint(f, cls)
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0]


def is_optional(f: Field, cls: type | None = None) -> bool:
    """Whether the field may be ``None``."""
    return type(None) in typing.get_args(_hint(f, cls))


def resume_keys(cls: type | None = None) -> tuple[str, ...]:
    """The settings a stored run may only be continued with unchanged (``resume=True``)."""
    return tuple(f.name for f in declared_settings(cls) if f.metadata["resume"])


def resume_defaults(cls: type | None = None) -> dict[str, Any]:
    """What a stored run whose record lacks a setting (it came later) counts as on resume."""
    return {f.name: f.metadata["older_runs"] for f in declared_settings(cls) if f.metadata["older_runs"] is not MISSING}


def coerce_number(name: str, value: Any, kind: type) -> Any:
    """``value`` of the setting ``name`` as ``kind`` (``int``: a whole number, also written as a
    float or a string; ``float``: a number or a string of one), else a :class:`ConfigError`."""
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(name, f"must be {noun}, got {value!r}")
    if kind is int and isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(name, f"must be {noun}, got {value!r}") from None
    if kind is float:
        return number
    if not number.is_integer():
        raise ConfigError(name, f"must be an integer, got {value!r}")
    return int(number)
