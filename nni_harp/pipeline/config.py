"""``PipelineConfig``: every setting of one prune (or evaluate) run, validated once, up front.

The defaults are chosen so that ``nni-harp prune resnet18`` on the built-in ``digits`` dataset
finishes in a few minutes on a 2-core CPU: 32 px images, PGD-3 during training, a handful of
epochs per stage and a 200-image evaluation subset for PGD-10 and AutoAttack. The original HARP
recipe (100 + 20 + 100 epochs, PGD-10 everywhere, full test sets) is reachable through the same
fields.
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "EvaluateConfig",
    "MODES",
    "ADV_LOSSES",
    "DATASET_NAMES",
    "MODE_BUDGETS",
    "check_model_name",
    "suggest_models",
    "setting",
    "declared_settings",
    "setting_type",
]

MODES = ("unstructured", "structured")
#: What the pruning target counts, per mode (the first one is the mode's default).
MODE_BUDGETS = {"unstructured": ("params",), "structured": ("flops", "latency")}
ADV_LOSSES = ("pgd", "trades", "mart")
DATASET_NAMES = ("digits", "cifar10", "svhn", "imagefolder")


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


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


def _int_in(cfg: Any, name: str, low: int, high: int | None = None, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer {span}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(name, f"must be an integer {span}, got {value}")


def _float_in(
    cfg: Any, name: str, low: float, high: float, low_open: bool = True, high_open: bool = False
) -> None:
    value = getattr(cfg, name)
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a number in {span}, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ConfigError(name, f"must be in {span}, got {value:g}")
    object.__setattr__(cfg, name, float(value))


def _choice(cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}; got {value!r}")


def _check_pruner(cfg: Any) -> None:
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


def setting(default: Any, help: str, *, choices: Callable[[], tuple[str, ...]] | None = None,
            metavar: str | None = None, group: str = "pruning target", resume: bool = True) -> Any:
    """A :class:`PipelineConfig` field declared with what the command line, the NNI trial and the
    resume check need, so that they are derived from it (:func:`declared_settings`) and nothing
    is written twice: ``help`` for ``--help`` (argparse's ``%(default)s`` works), ``choices`` (a
    function, so a registry is read when it is asked, not at import), the argument group it is
    shown in, and ``resume``: whether a run may only be continued with the same value."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar, "group": group,
                                            "resume": resume})


def declared_settings(cls: type | None = None) -> tuple[Field, ...]:
    """The fields of ``cls`` (default :class:`PipelineConfig`) declared with :func:`setting`."""
    return tuple(f for f in fields(cls or PipelineConfig) if "help" in f.metadata)


def setting_type(f: Field, cls: type | None = None) -> type:
    """The value type of a declared field (``int``, ``float``, ``str``, ``bool``), ``None`` stripped."""
    hint = typing.get_type_hints(cls or PipelineConfig)[f.name]
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0]


def _harp_default(name: str) -> Any:
    """The default of one of :class:`~nni_harp.pruning.HARPSettings`' fields (declared there once)."""
    from ..pruning.settings import HARPSettings

    return HARPSettings.__dataclass_fields__[name].default


def _latency_backends() -> tuple[str, ...]:
    from graph_passes.latency import BACKENDS

    return tuple(BACKENDS)


def _check_latency(cfg: Any) -> None:
    """``budget`` fits ``mode``; with a latency budget, a target in (0, 1) and a backend that runs here."""
    allowed = MODE_BUDGETS[cfg.mode]
    if cfg.budget is not None and cfg.budget not in allowed:
        if cfg.budget == "latency":
            raise ConfigError("budget", "--budget latency needs --mode structured (zeroed weights do not make dense "
                                        "kernels faster; only removed channels do)")
        raise ConfigError("budget", f"--budget must be one of {', '.join(allowed)} with --mode {cfg.mode}; "
                                    f"got {cfg.budget!r}")
    try:
        _float_in(cfg, "latency_target", 0.0, 1.0, low_open=True, high_open=True)
    except ConfigError as exc:
        raise ConfigError("latency_target", f"--latency-target {str(exc).split(': ', 1)[1]} (the fraction of the "
                                            "dense model's latency to keep, e.g. 0.5)") from None
    try:
        _int_in(cfg, "latency_threads", 1, 1024)
    except ConfigError as exc:
        raise ConfigError("latency_threads", f"--latency-threads {str(exc).split(': ', 1)[1]} (CPU threads, "
                                             "e.g. 1 or the number of cores)") from None
    backends = _latency_backends()
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


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of one ``nni-harp prune`` run (see ``nni-harp prune --help`` for each one).

    Targets: ``sparsity`` is the fraction of prunable parameters removed (``mode='unstructured'``),
    ``flops_target`` the fraction of FLOPs kept (``mode='structured'``); the other one is ignored.
    With ``budget='latency'`` (structured) the target is ``latency_target``, the fraction of the
    dense model's latency on ``latency_backend`` kept (:attr:`budget_kind`, :attr:`target_keep`).
    The fields declared with :func:`setting` are the command line's options and the NNI trial's
    parameters of the same names, and are compared on resume: add a setting there, once.
    """

    model: str
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 32
    mode: str = "unstructured"
    # a name of nni_harp.registry: harp, hydra, or one of NNI's pruners (l1norm, l2norm, fpgm,
    # taylor, movement); every pruner runs through the same stages
    pruner: str = "harp"
    sparsity: float = 0.9
    flops_target: float = 0.5
    adv_loss: str = "pgd"
    eps: float = 8 / 255
    attack_steps: int = 3
    pretrain_epochs: int = 4
    prune_epochs: int = 8  # HARP's schedule: gamma grows until the target is met (~epoch 4 on digits), then holds
    finetune_epochs: int = 2
    batch_size: int = 64
    seed: int = 0
    output_dir: str = "runs/harp"
    checkpoint: str | None = None
    resume: bool = False
    overwrite: bool = False
    # learning rates / schedule (SGD, momentum 0.9, cosine, weight decay)
    pretrain_lr: float = 0.05
    prune_lr: float = 0.1  # HARP's score learning rate (the weights are frozen while pruning)
    finetune_lr: float = 0.01
    weight_decay: float = 5e-4
    gamma_0: float = 0.01
    # where HARP's rates start (HARPSettings.init_allocation / init_keep; None: sqrt of the target)
    init_allocation: str = "uniform"
    init_keep: float | None = None
    trades_beta: float | None = None  # TRADES/MART beta; None: the loss's own (TRADES 6, MART 5)
    # evaluation
    eval_samples: int = 200
    eval_attack_steps: int = 10
    # > 0: after every pruning and fine-tuning epoch, clean and PGD accuracy on this many test
    # images (``val_clean`` / ``val_pgd`` in the epoch metrics; the NNI trial reports them)
    epoch_eval_samples: int = 0
    # AutoAttack version (nni_harp.adversarial.AUTOATTACK_VERSIONS) or "off". The default runs
    # its gradient-based members; "standard" adds FAB-T and Square (5000 queries), some 5 s per
    # robust image for a resnet18 on a 2-core CPU
    autoattack: str = "apgd-ce+apgd-t"
    latency_runs: int = 20
    export_onnx: bool = True
    # testing knobs: cap the number of batches per epoch / evaluation (None: whole dataset)
    max_train_batches: int | None = None
    num_workers: int = 0
    # -- settings declared once (setting()): --help, the NNI trial and the resume check derive from these
    budget: str | None = setting(
        None, "what the target counts: params (unstructured), flops (structured, with --flops-target) or latency "
              "(structured, with --latency-target: the latency HARP's latency model predicts, measured first on "
              "--latency-backend) (default: params unstructured, flops structured)",
        choices=lambda: tuple(dict.fromkeys(b for bs in MODE_BUDGETS.values() for b in bs)))
    latency_target: float = setting(
        0.5, "with --budget latency: fraction of the dense model's latency kept, in (0, 1) (default: %(default)s)")
    latency_backend: str = setting(
        _harp_default("latency_backend"),
        "with --budget latency: where the latency is measured: eager (PyTorch CPU), onnxruntime (CPU) or cuda; "
        "the fit is cached, a second run measures nothing (default: %(default)s)", choices=_latency_backends)
    latency_threads: int = setting(
        _harp_default("latency_threads"),
        "with --budget latency: CPU threads the latency is measured with (default: %(default)s)", metavar="N")

    def __post_init__(self) -> None:
        check_model_name(self.model)
        _choice(self, "dataset", DATASET_NAMES)
        if self.dataset == "imagefolder" and not self.data_dir:
            raise ConfigError("data_dir", "--data-dir is required with --dataset imagefolder")
        if self.data_dir is not None:
            path = Path(self.data_dir).expanduser()
            if not path.exists():
                raise ConfigError("data_dir", f"directory does not exist: {path}")
            if not path.is_dir():
                raise ConfigError("data_dir", f"not a directory: {path}")
        _int_in(self, "image_size", 8, 1024)
        _choice(self, "mode", MODES)
        _check_pruner(self)
        _float_in(self, "sparsity", 0.0, 1.0, low_open=True, high_open=True)
        _float_in(self, "flops_target", 0.0, 1.0, low_open=True, high_open=True)
        _check_latency(self)
        _choice(self, "adv_loss", ADV_LOSSES)
        _float_in(self, "eps", 0.0, 1.0)
        _int_in(self, "attack_steps", 1, 1000)
        _int_in(self, "pretrain_epochs", 0, 100_000)
        _int_in(self, "prune_epochs", 1, 100_000)
        _int_in(self, "finetune_epochs", 0, 100_000)
        _int_in(self, "batch_size", 1, 65_536)
        _int_in(self, "seed", 0, 2**32 - 1)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError("output_dir", f"must be a non-empty path, got {self.output_dir!r}")
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().exists():
            raise ConfigError("checkpoint", f"file or directory does not exist: {self.checkpoint}")
        if self.checkpoint is None and self.pretrain_epochs == 0:
            raise ConfigError(
                "pretrain_epochs", "must be >= 1 when no --checkpoint is given (the model starts from random weights)"
            )
        for name in ("pretrain_lr", "prune_lr", "finetune_lr"):
            _float_in(self, name, 0.0, 10.0)
        _float_in(self, "weight_decay", 0.0, 1.0, low_open=False)
        _float_in(self, "gamma_0", 0.0, 1e6, low_open=False)
        from ..pruning._allocation import ALLOCATIONS

        _choice(self, "init_allocation", tuple(ALLOCATIONS))
        if self.init_keep is not None:
            _float_in(self, "init_keep", 0.0, 1.0)
            if self.init_keep < self.target_keep:
                raise ConfigError("init_keep", f"must be at least the target {self.target_keep:g} (HARP's rates "
                                               f"start above the target and descend to it), got {self.init_keep:g}")
        if self.trades_beta is not None:
            _float_in(self, "trades_beta", 0.0, 1e3, low_open=False)
        _int_in(self, "eval_samples", 1)
        _int_in(self, "eval_attack_steps", 1, 10_000)
        _int_in(self, "epoch_eval_samples", 0)
        _int_in(self, "latency_runs", 1, 100_000)
        _int_in(self, "max_train_batches", 1, optional=True)
        _int_in(self, "num_workers", 0, 256)
        from ..adversarial import AUTOATTACK_VERSIONS

        _choice(self, "autoattack", (*AUTOATTACK_VERSIONS, "off"))
        for name in ("resume", "overwrite", "export_onnx"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume", "--resume and --overwrite exclude each other")

    # -- derived values -------------------------------------------------------------------
    @property
    def step_size(self) -> float:
        """PGD step for training: 2.5 * eps / steps (Madry et al.)."""
        return 2.5 * self.eps / self.attack_steps

    @property
    def eval_step_size(self) -> float:
        return 2.5 * self.eps / self.eval_attack_steps

    @property
    def budget_kind(self) -> str:
        """What the target counts: ``budget``, else the mode's default (params or FLOPs)."""
        return self.budget or MODE_BUDGETS[self.mode][0]

    @property
    def target_keep(self) -> float:
        """The kept fraction of the budgeted resource: parameters (unstructured), FLOPs or latency."""
        return {"params": 1.0 - self.sparsity, "flops": self.flops_target, "latency": self.latency_target}[self.budget_kind]

    @property
    def target(self) -> dict[str, float]:
        """The target as the report names it: ``sparsity``, ``flops_kept`` or ``latency_kept``."""
        kind = self.budget_kind
        return {"sparsity": self.sparsity} if kind == "params" else {f"{kind}_kept": self.target_keep}

    @property
    def out_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting (known: {', '.join(sorted(known))})")
        return cls(**dict(data))

    # fields whose change makes a stored run incompatible with the new request
    RESUME_KEYS = (
        "model", "dataset", "data_dir", "image_size", "mode", "pruner", "sparsity", "flops_target", "adv_loss", "eps",
        "attack_steps", "pretrain_epochs", "prune_epochs", "finetune_epochs", "batch_size", "seed",
        "checkpoint", "pretrain_lr", "prune_lr", "finetune_lr", "weight_decay", "gamma_0", "init_allocation", "init_keep", "trades_beta",
        "max_train_batches",
    )  # and the settings declared with resume=True (added below the class)


PipelineConfig.RESUME_KEYS += tuple(f.name for f in declared_settings(PipelineConfig) if f.metadata["resume"])


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``nni-harp evaluate``: one saved model, the same attacks as a prune run.

    ``checkpoint`` is a dense state dict (file) or the output folder of ``nni-harp prune``. For
    an output folder, the dataset, image size and model construction come from its metadata
    unless given here.
    """

    model: str
    checkpoint: str
    dataset: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    eps: float = 8 / 255
    eval_attack_steps: int = 10
    eval_samples: int = 200
    autoattack: str = "apgd-ce+apgd-t"
    batch_size: int = 100
    seed: int = 0
    latency_runs: int = 20
    export_onnx: bool = True
    output_dir: str | None = None

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if not isinstance(self.checkpoint, str) or not Path(self.checkpoint).expanduser().exists():
            raise ConfigError("checkpoint", f"file or directory does not exist: {self.checkpoint}")
        if self.dataset is not None:
            _choice(self, "dataset", DATASET_NAMES)
        if self.dataset == "imagefolder" and not self.data_dir:
            raise ConfigError("data_dir", "--data-dir is required with --dataset imagefolder")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ConfigError("data_dir", f"directory does not exist: {self.data_dir}")
        _int_in(self, "image_size", 8, 1024, optional=True)
        _float_in(self, "eps", 0.0, 1.0)
        _int_in(self, "eval_attack_steps", 1, 10_000)
        _int_in(self, "eval_samples", 1)
        from ..adversarial import AUTOATTACK_VERSIONS

        _choice(self, "autoattack", (*AUTOATTACK_VERSIONS, "off"))
        _int_in(self, "batch_size", 1, 65_536)
        _int_in(self, "seed", 0, 2**32 - 1)
        _int_in(self, "latency_runs", 1, 100_000)
