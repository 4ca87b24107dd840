"""``PipelineConfig``: every setting of one prune (or evaluate) run, validated once, up front.

The defaults are chosen so that ``nni-harp prune resnet18`` on the built-in ``digits`` dataset
finishes in a few minutes on a 2-core CPU: 32 px images, PGD-3 during training, a handful of
epochs per stage and a 200-image evaluation subset for PGD-10 and AutoAttack. The original HARP
recipe (100 + 20 + 100 epochs, PGD-10 everywhere, full test sets) is reachable through the same
fields. ``EvaluateConfig`` declares the settings it shares with a prune run from ``PipelineConfig``'s
declarations; the checks and the names a setting may take are in :mod:`._config_checks`.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from . import _config_checks as check
from ._config_checks import MODE_BUDGETS, MODES, check_model_name, suggest_models
from ._settings import (ConfigError, coerce_number, declared_default, declared_settings, is_optional, resume_defaults,
                        resume_keys, setting, setting_like, setting_type)

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "EvaluateConfig",
    "MODES",
    "MODE_BUDGETS",
    "check_model_name",
    "suggest_models",
    "setting",
    "declared_settings",
    "setting_type",
    "resume_defaults",
    "coerce_number",
    "coerce_setting",
]


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of one ``nni-harp prune`` run (see ``nni-harp prune --help`` for each one).

    Targets: ``sparsity`` is the fraction of prunable parameters removed (``mode='unstructured'``),
    ``flops_target`` the fraction of FLOPs kept (``mode='structured'``); the other one is ignored.
    With ``budget='latency'`` (structured) the target is ``latency_target``, the fraction of the
    dense model's latency on ``latency_backend`` kept (:attr:`budget_kind`, :attr:`target_keep`).
    Every field is declared with :func:`setting`, with its help, choices and resume flag: the
    command line's options (``nni_harp.cli``), the NNI trial's parameters (``nni_harp.trial``) and
    :attr:`RESUME_KEYS` are derived from the declarations, so a setting is added here, once.
    """

    model: str = setting(MISSING, "a timm model name (see `nni-harp list-models`)", metavar="MODEL", group=None)
    dataset: str = setting(
        "digits", "digits ships with scikit-learn; the others read --data-dir (default: %(default)s)",
        choices=check.datasets, group="data")
    data_dir: str | None = setting(None, "dataset folder (cifar10, svhn, imagefolder); nothing is downloaded",
                                   group="data")
    image_size: int = setting(32, "input resolution in pixels (default: %(default)s)", group="data")
    mode: str = setting("unstructured", "unstructured: single weights (budget: parameters); structured: channels, "
                                        "physically removed (budget: FLOPs) (default: %(default)s)", choices=check.modes)
    pruner: str = setting(
        "harp", "harp (learned per-layer rates), hydra (learned scores, uniform rates) or one of NNI's pruners: "
                "l1norm, l2norm, fpgm (structured only), taylor, movement (unstructured only); every one runs the "
                "same stages (default: %(default)s)", choices=check.pruners)
    sparsity: float = setting(0.9, "unstructured: fraction of parameters removed, in (0, 1) (default: %(default)s)")
    flops_target: float = setting(0.5, "structured: fraction of FLOPs kept, in (0, 1) (default: %(default)s)")
    adv_loss: str = setting("pgd", "PGD-AT, TRADES or MART (default: %(default)s)", choices=check.adv_losses,
                            group="adversarial training")
    eps: float = setting(8 / 255, "L-inf radius in pixel units, e.g. 8/255 (default: 8/255)",
                         group="adversarial training")
    attack_steps: int = setting(3, "PGD steps during training (default: %(default)s)", group="adversarial training")
    pretrain_epochs: int = setting(4, "default: %(default)s (ignored with --checkpoint)", group="schedule")
    # HARP's schedule: gamma grows until the target is met (~epoch 4 on digits), then holds
    prune_epochs: int = setting(
        8, "HARP's gamma grows every epoch until the target is met, then freezes (default: %(default)s)",
        group="schedule")
    finetune_epochs: int = setting(2, "default: %(default)s", group="schedule")
    # #11: a norm of the kept width is one fused op; exact statistics export as ~23 element-wise ones
    norm_stats: str = setting(
        check.NORM_STATS[0],
        "structured runs: what layer/RMS norms whose channels are pruned normalise over while fine-tuning. kept: "
        "the kept channels only, so the pruned model holds plain norms of the kept width (one LayerNormalization "
        "each in ONNX); exact: the removed channels too, as zeros, as the masked model does, so the pruned model "
        "holds exact-statistics norms (element-wise, 2-3.5x slower). Without fine-tuning (--finetune-epochs 0) the "
        "statistics stay exact: the masked model's function is not changed untrained (default: %(default)s)",
        choices=check.norm_stats, group="schedule", older_runs="exact")
    batch_size: int = setting(
        64, "the global batch; under torchrun each of N processes takes 1/N of it (default: %(default)s)",
        group="schedule")
    seed: int = setting(0, "default: %(default)s", group="schedule")
    # the command line derives its default folder from the model, mode and pruner
    output_dir: str = setting("runs/harp", "where everything is written (default: runs/MODEL-MODE)", group="files",
                              cli_default=None, resume=False)
    checkpoint: str | None = setting(None, "start from this trained dense model (a state dict file, or an earlier "
                                           "run's output folder) instead of pretraining", group="files")
    resume: bool = setting(False, "continue the run in --output-dir from its last finished epoch (give the same "
                                  "training settings; evaluation settings may change)", group="files", resume=False)
    overwrite: bool = setting(False, "start again in an --output-dir that holds a run", group="files", resume=False)
    # learning rates / schedule (SGD, momentum 0.9, cosine, weight decay)
    pretrain_lr: float = setting(0.05, "default: %(default)s", group="schedule")
    prune_lr: float = setting(
        0.1, "learning rate of HARP's (HYDRA's) scores, the weights being frozen (rates: HARPSettings.rate_lr); NNI's "
             "training-aware pruners train the weights at --finetune-lr (default: %(default)s)", group="schedule")
    finetune_lr: float = setting(0.01, "default: %(default)s", group="schedule")
    weight_decay: float = setting(5e-4, "default: %(default)s", group="schedule")
    gamma_0: float = setting(0.01, "initial weight of the hardware loss (default: %(default)s)", flag="--gamma0")
    # where HARP's rates start (HARPSettings.init_allocation / init_keep; None: sqrt of the target)
    init_allocation: str = setting(
        "uniform", "where HARP's per-layer rates start: one fraction for all, dense, or a global magnitude, LAMP or "
                   "ERK allocation (default: %(default)s)", choices=check.allocations)
    init_keep: float | None = setting(
        None, "kept fraction (of params or FLOPs) HARP starts at, between the target and 1 (default: the square "
              "root of the target, e.g. 0.32 for 90 %% sparsity)")
    trades_beta: float | None = setting(None, "TRADES/MART beta (default: the loss's own, TRADES 6, MART 5)",
                                        group="adversarial training")
    # evaluation: changing it does not stop a run from resuming
    eval_samples: int = setting(200, "test images attacked with PGD and AutoAttack (default: %(default)s)",
                                metavar="N", group="evaluation", resume=False)
    eval_attack_steps: int = setting(10, "PGD steps at evaluation (default: %(default)s)", metavar="N",
                                     group="evaluation", resume=False)
    # > 0: after every pruning and fine-tuning epoch, clean and PGD accuracy on this many test
    # images (``val_clean`` / ``val_pgd`` in the epoch metrics; the NNI trial reports them)
    epoch_eval_samples: int = setting(0, "test images evaluated after every pruning and fine-tuning epoch",
                                      group="testing", resume=False, hidden=True)
    # AutoAttack version (nni_harp.adversarial.AUTOATTACK_VERSIONS) or "off". The default runs
    # its gradient-based members; "standard" adds FAB-T and Square (5000 queries), some 5 s per
    # robust image for a resnet18 on a 2-core CPU
    autoattack: str = setting(
        "apgd-ce+apgd-t", "AutoAttack version (torchattacks): apgd-ce+apgd-t (its gradient-based members), standard "
                          "(adds FAB-T and Square: the number to publish, but slow on a CPU), apgd-ce, plus, rand, or "
                          "off (default: %(default)s)",
        choices=check.autoattack_versions, metavar="VERSION", group="evaluation", resume=False)
    latency_runs: int = setting(20, "timed runs per latency measurement (default: %(default)s)", metavar="N",
                                group="evaluation", resume=False)
    export_onnx: bool = setting(True, "skip the ONNX export (and the onnxruntime latency)", flag="--no-onnx",
                                group="evaluation", resume=False)
    # testing knobs, kept out of --help: cap the number of batches per epoch / evaluation (None: whole dataset)
    max_train_batches: int | None = setting(None, "batches per epoch at most", group="testing", hidden=True)
    num_workers: int = setting(0, "data loader worker processes", group="testing", hidden=True, resume=False)
    # the latency budget (#11); runs recorded before it resume with its defaults
    budget: str | None = setting(
        None, "what the target counts: params (unstructured), flops (structured, with --flops-target) or latency "
              "(structured, with --latency-target: the latency HARP's latency model predicts, measured first on "
              "--latency-backend) (default: params unstructured, flops structured)",
        choices=check.budgets, older_runs_default=True)
    latency_target: float = setting(
        0.5, "with --budget latency: fraction of the dense model's latency kept, in (0, 1) (default: %(default)s)",
        older_runs_default=True)
    latency_backend: str = setting(
        check.harp_default("latency_backend"),
        "with --budget latency: where the latency is measured: eager (PyTorch CPU), onnxruntime (CPU) or cuda; "
        "the fit is cached, a second run measures nothing (default: %(default)s)", choices=check.latency_backends,
        older_runs_default=True)
    latency_checks: int = setting(
        check.harp_default("latency_checks"),
        "with --budget latency: times HARP's learned plan is measured when its masks are fixed; a plan more than "
        "10 %% over the target is counted again under the latency model refitted on it (0: never) "
        "(default: %(default)s)", metavar="N", older_runs_default=True)
    latency_threads: int = setting(
        check.harp_default("latency_threads"),
        "CPU threads every latency is measured with: the report's PyTorch and onnxruntime latency and, with "
        "--budget latency, the latency model and the budget (default: %(default)s)", metavar="N",
        older_runs_default=True)
    #: the settings a stored run may only be continued with unchanged (``resume=True``; set below the class)
    RESUME_KEYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_model_name(self.model)
        check.check_data(self)
        check.choice(self, "mode", check.modes())
        check.check_pruner(self)
        check.float_in(self, "sparsity", 0.0, 1.0, low_open=True, high_open=True)
        check.float_in(self, "flops_target", 0.0, 1.0, low_open=True, high_open=True)
        check.check_latency(self)
        check.choice(self, "adv_loss", check.adv_losses())
        check.int_in(self, "attack_steps", 1, 1000)
        check.int_in(self, "pretrain_epochs", 0, 100_000)
        check.int_in(self, "prune_epochs", 1, 100_000)
        check.int_in(self, "finetune_epochs", 0, 100_000)
        check.choice(self, "norm_stats", check.norm_stats())
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError("output_dir", f"must be a non-empty path, got {self.output_dir!r}")
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().exists():
            raise ConfigError("checkpoint", f"file or directory does not exist: {self.checkpoint}")
        if self.checkpoint is None and self.pretrain_epochs == 0:
            raise ConfigError(
                "pretrain_epochs", "must be >= 1 when no --checkpoint is given (the model starts from random weights)"
            )
        for name in ("pretrain_lr", "prune_lr", "finetune_lr"):
            check.float_in(self, name, 0.0, 10.0)
        check.float_in(self, "weight_decay", 0.0, 1.0, low_open=False)
        check.float_in(self, "gamma_0", 0.0, 1e6, low_open=False)
        check.choice(self, "init_allocation", check.allocations())
        if self.init_keep is not None:
            check.float_in(self, "init_keep", 0.0, 1.0)
            if self.init_keep < self.target_keep:
                raise ConfigError("init_keep", f"must be at least the target {self.target_keep:g} (HARP's rates "
                                               f"start above the target and descend to it), got {self.init_keep:g}")
        if self.trades_beta is not None:
            check.float_in(self, "trades_beta", 0.0, 1e3, low_open=False)
        check.check_measurement(self)
        check.int_in(self, "epoch_eval_samples", 0)
        check.int_in(self, "max_train_batches", 1, optional=True)
        check.int_in(self, "num_workers", 0, 256)
        check.flag(self, "resume")
        check.flag(self, "overwrite")
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
    def kept_norm_stats(self) -> bool:
        """Whether the fine-tuned model's pruned layer norms normalise over the kept channels only
        (``norm_stats='kept'`` in a structured run that fine-tunes)."""
        return self.norm_stats == "kept" and self.mode == "structured" and self.finetune_epochs > 0

    @property
    def out_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, coerce: bool = False) -> "PipelineConfig":
        """The config of ``data`` (setting name -> value), checked as the constructor checks it.

        ``coerce``: ``data`` comes from a loosely typed source (an NNI search space sends ``2.0``
        for an integer, ``--param`` a string): integer and number settings are converted first,
        and one that is not a number is a :class:`ConfigError` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting (known: {', '.join(sorted(known))})")
        return cls(**{k: coerce_setting(k, v) if coerce else v for k, v in data.items()})


PipelineConfig.RESUME_KEYS = resume_keys(PipelineConfig)


def coerce_setting(name: str, value: Any) -> Any:
    """``value`` of :class:`PipelineConfig`'s setting ``name`` converted by :func:`coerce_number`
    where the setting is an integer or a number (and not ``None`` where that is allowed); other
    values are left to the config's checks."""
    f = PipelineConfig.__dataclass_fields__[name]
    kind = setting_type(f, PipelineConfig)
    if kind not in (int, float) or (value is None and is_optional(f, PipelineConfig)):
        return value
    return coerce_number(name, value, kind)


def _like(name: str, **changes: Any) -> Any:
    return setting_like(PipelineConfig, name, **changes)


def _default(name: str) -> Any:
    return declared_default(PipelineConfig, name)


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``nni-harp evaluate``: one saved model, the same attacks as a prune run.

    ``checkpoint`` is a dense state dict (file) or the output folder of ``nni-harp prune``. For
    an output folder, the dataset, image size and model construction come from its metadata
    unless given here. The settings a prune run has too are declared as :class:`PipelineConfig`
    declares them (their defaults and help exist there once; the evaluation batch is larger), and
    the ``evaluate`` command's arguments are derived from these declarations.
    """

    model: str = _like("model", help="the timm model name the weights belong to")
    checkpoint: str = setting(MISSING, "dense state dict file, or a `nni-harp prune` output folder",
                              flag="--checkpoint", group=None)
    dataset: str | None = _like(
        "dataset", default=None, group=None,
        help=f"default: the run's dataset (output folder) or {_default('dataset')}")
    data_dir: str | None = _like("data_dir", group=None)
    image_size: int | None = _like(
        "image_size", default=None, group=None,
        help=f"default: the run's (output folder) or {_default('image_size')}")
    eps: float = _like("eps", group=None)
    eval_attack_steps: int = _like("eval_attack_steps")
    eval_samples: int = _like("eval_samples")
    autoattack: str = _like("autoattack")
    batch_size: int = _like("batch_size", default=100, help="default: %(default)s", group=None)
    seed: int = _like("seed", group=None)
    latency_runs: int = _like("latency_runs")
    latency_threads: int = _like("latency_threads")
    export_onnx: bool = _like("export_onnx")
    output_dir: str | None = setting(None, "also write evaluate_report.json/.md (and model.onnx) here", group=None)

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if not isinstance(self.checkpoint, str) or not Path(self.checkpoint).expanduser().exists():
            raise ConfigError("checkpoint", f"file or directory does not exist: {self.checkpoint}")
        check.check_data(self, optional=True)
        check.check_measurement(self)
