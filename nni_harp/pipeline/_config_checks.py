"""The checks of the pipeline's settings and the names they may take, shared by
:class:`~nni_harp.pipeline.PipelineConfig` and :class:`~nni_harp.pipeline.EvaluateConfig`.

Each check raises a :class:`ConfigError` naming the setting and what is allowed. The names a
setting may take are read from their registries when asked (a loss added with ``register_loss``
is one); ``--help`` and the checks call the same functions.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

from .._checks import check_choice, check_flag, check_int, check_real
from ._settings import ConfigError, declared_default

__all__ = [
    "MODES", "MODE_BUDGETS", "suggest_models", "check_model_name", "int_in", "float_in", "choice", "flag",
    "check_data", "check_measurement", "check_pruner", "check_latency", "harp_default", "datasets", "modes",
    "pruners", "adv_losses", "allocations", "autoattack_versions", "latency_backends", "budgets", "norm_stats",
    "NORM_STATS",
]

MODES = ("unstructured", "structured")
#: What the pruning target counts, per mode (the first one is the mode's default).
MODE_BUDGETS = {"unstructured": ("params",), "structured": ("flops", "latency")}
#: What the fine-tuned model's layer norms normalise over where channels are pruned (the first: the default).
NORM_STATS = ("kept", "exact")


def suggest_models(name: str, n: int = 5) -> list[str]:
    """Close timm model names for a misspelt ``name`` (difflib over ``timm.list_models()``)."""
    import timm

    candidates = timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:
        # a prefix such as "resnet" or "vit_small" is a common way to get a name wrong
        close = [c for c in candidates if c.startswith(name.split("_")[0])][:n]
    return close


def check_model_name(name: str, field_name: str = "model") -> str:
    """Raise :class:`ConfigError` with suggestions when ``name`` is not a timm model."""
    import timm

    if not isinstance(name, str) or not name:
        raise ConfigError(field_name, f"must be a timm model name, got {name!r}")
    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            field_name, f"unknown timm model {name!r}{hint} (`nni-harp list-models PATTERN` lists names)"
        )
    return name


def int_in(cfg: Any, name: str, low: int, high: int | None = None, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if not (optional and value is None):
        check_int(value, low, high, error=lambda span: ConfigError(name, f"must be an integer {span}, got {value!r}"))


def float_in(
    cfg: Any, name: str, low: float, high: float, low_open: bool = True, high_open: bool = False
) -> None:
    value = getattr(cfg, name)
    number = check_real(value, low, high, low_open=low_open, high_open=high_open,
                        error=lambda span: ConfigError(name, f"must be a number {span}, got {value!r}"),
                        out_of_range=lambda span: ConfigError(name, f"must be {span}, got {value:g}"))
    object.__setattr__(cfg, name, number)


def choice(cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    check_choice(value, allowed, lambda: ConfigError(name, f"must be one of {', '.join(allowed)}; got {value!r}"))


def flag(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    check_flag(value, lambda: ConfigError(name, f"must be True or False, got {value!r}"))


def naming_flag(name: str, flag: str, hint: str, check: Callable[[], None]) -> None:
    """Run ``check`` of field ``name``; its error is raised again naming the command-line ``flag``
    and ending with ``hint`` (what the value means)."""
    try:
        check()
    except ConfigError as exc:
        raise ConfigError(name, f"{flag} {str(exc).split(': ', 1)[1]} ({hint})") from None


def check_data(cfg: Any, optional: bool = False) -> None:
    """``dataset``, ``data_dir`` and ``image_size`` (``optional``: the dataset and the image size
    may be ``None``, left to the saved run)."""
    if not (optional and cfg.dataset is None):
        choice(cfg, "dataset", datasets())
    if cfg.dataset == "imagefolder" and not cfg.data_dir:
        raise ConfigError("data_dir", "--data-dir is required with --dataset imagefolder")
    if cfg.data_dir is not None:
        path = Path(cfg.data_dir).expanduser()
        if not path.exists():
            raise ConfigError("data_dir", f"directory does not exist: {path}")
        if not path.is_dir():
            raise ConfigError("data_dir", f"not a directory: {path}")
    int_in(cfg, "image_size", 8, 1024, optional=optional)


def check_measurement(cfg: Any) -> None:
    """What evaluating a model takes: the attacks (radius, PGD steps, images, AutoAttack
    version), the batch, the seed, the latency runs and threads, the ONNX export."""
    float_in(cfg, "eps", 0.0, 1.0)
    int_in(cfg, "eval_attack_steps", 1, 10_000)
    int_in(cfg, "eval_samples", 1)
    choice(cfg, "autoattack", autoattack_versions())
    int_in(cfg, "batch_size", 1, 65_536)
    int_in(cfg, "seed", 0, 2**32 - 1)
    int_in(cfg, "latency_runs", 1, 100_000)
    naming_flag("latency_threads", "--latency-threads", "CPU threads, e.g. 1 or the number of cores",
                lambda: int_in(cfg, "latency_threads", 1, 1024))
    flag(cfg, "export_onnx")


def check_pruner(cfg: Any) -> None:
    """``pruner`` must be registered and able to prune in ``mode``; stored under its registry name."""
    from ..registry import check_mode, get_pruner, pruner_names

    if not isinstance(cfg.pruner, str):
        raise ConfigError("pruner", f"must be one of {', '.join(pruner_names())}; got {cfg.pruner!r}")
    try:
        get_pruner(cfg.pruner)
    except KeyError:
        raise ConfigError("pruner", f"must be one of {', '.join(pruner_names())}; got {cfg.pruner!r}") from None
    try:
        spec = check_mode(cfg.pruner, cfg.mode)
    except ValueError as exc:
        raise ConfigError("pruner", str(exc)) from exc
    object.__setattr__(cfg, "pruner", spec.name)


def harp_default(name: str) -> Any:
    """The default of one of :class:`~nni_harp.pruning.HARPSettings`' fields (declared there once)."""
    from ..pruning.settings import HARPSettings

    return declared_default(HARPSettings, name)


def latency_backends() -> tuple[str, ...]:
    from graph_passes.latency import BACKENDS

    return tuple(BACKENDS)


# the names a setting may take, read from their registries when asked (the option's help and
# the check below use the same function)
def datasets() -> tuple[str, ...]:
    from ..data import DATASETS

    return tuple(DATASETS)


def modes() -> tuple[str, ...]:
    return MODES


def pruners() -> tuple[str, ...]:
    from ..registry import pruner_names

    return pruner_names()


def adv_losses() -> tuple[str, ...]:
    from ..adversarial import LOSSES

    return tuple(LOSSES)


def allocations() -> tuple[str, ...]:
    from ..pruning._allocation import ALLOCATIONS

    return tuple(ALLOCATIONS)


def norm_stats() -> tuple[str, ...]:
    return NORM_STATS


def budgets() -> tuple[str, ...]:
    return tuple(dict.fromkeys(b for bs in MODE_BUDGETS.values() for b in bs))


def autoattack_versions() -> tuple[str, ...]:
    from ..adversarial import AUTOATTACK_VERSIONS

    return (*AUTOATTACK_VERSIONS, "off")


def check_latency(cfg: Any) -> None:
    """``budget`` fits ``mode``; with a latency budget, a target in (0, 1) and a backend that runs here."""
    allowed = MODE_BUDGETS[cfg.mode]
    if cfg.budget is not None and cfg.budget not in allowed:
        if cfg.budget == "latency":
            raise ConfigError("budget", "--budget latency needs --mode structured (zeroed weights do not make dense "
                                        "kernels faster; only removed channels do)")
        raise ConfigError("budget", f"--budget must be one of {', '.join(allowed)} with --mode {cfg.mode}; "
                                    f"got {cfg.budget!r}")
    naming_flag("latency_target", "--latency-target", "the fraction of the dense model's latency to keep, e.g. 0.5",
                lambda: float_in(cfg, "latency_target", 0.0, 1.0, low_open=True, high_open=True))
    naming_flag("latency_checks", "--latency-checks", "measurements of the final plan; 0 turns the check off",
                lambda: int_in(cfg, "latency_checks", 0, 100))
    backends = latency_backends()
    if cfg.latency_backend not in backends:
        raise ConfigError("latency_backend", f"unknown --latency-backend {cfg.latency_backend!r}; choose one of "
                                             f"{', '.join(backends)}")
    if cfg.budget == "latency":
        from graph_passes.latency import LatencyError, check_backend

        try:
            check_backend(cfg.latency_backend)
        except LatencyError as exc:
            others = [b for b in backends if b != cfg.latency_backend]
            raise ConfigError("latency_backend", f"--latency-backend {cfg.latency_backend}: {exc} (or choose "
                                                 f"another --latency-backend: {', '.join(others)})") from exc


