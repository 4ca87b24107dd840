"""HARP's own knobs: a frozen, validated dataclass (NNI's ``config_list`` schema is closed to them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Mapping

from .errors import SettingsError

__all__ = ["HARPSettings", "BUDGETS", "OPTIMIZERS", "LR_SCHEDULES"]

BUDGETS: tuple[str, ...] = ("params", "flops")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def _real(field: str, value: object, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise SettingsError(field, value, "a finite real number")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise SettingsError(field, value, f"in {left}{low:g}, {hi}{right}")


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(field, value, "one of " + ", ".join(repr(a) for a in allowed))


def _flag(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SettingsError(field, value, "True or False")


@dataclass(frozen=True)
class HARPSettings:
    """Settings of :class:`~nni_harp.pruning.HARPPruner` (and :class:`~nni_harp.pruning.HydraPruner`).

    Args:
        gamma_0: initial weight of the hardware loss, ``> 0``. The paper uses 0.01 (CIFAR-10/SVHN)
            and 0.1 (ImageNet).
        alpha: floor factor, in ``(0, 1]``: a layer (or channel group) never keeps less than
            ``k_min = alpha * target_keep`` of its entries (and never fewer than one).
        stage_boundaries: epochs (0-based, strictly increasing, ``>= 1``) at which gamma grows by
            ``gamma_0``; ``None`` grows it every epoch, ``gamma_t = (t + 1) * gamma_0``, as in the
            paper. Growth stops for good once the target is first met.
        budget: what the hardware loss counts: ``'params'`` or ``'flops'``; ``None`` picks
            ``'params'`` for unstructured and ``'flops'`` for structured (``out_channel``) pruning.
        learn_rates: learn per-layer rates (HARP). ``False`` fixes them uniformly at the target and
            only learns scores (HYDRA).
        optimizer: ``'sgd'`` (momentum ``momentum``) or ``'adam'``, for scores and rates.
        score_lr: learning rate of the importance scores, ``> 0``.
        rate_lr: learning rate of the rate parameters, ``> 0``.
        momentum: SGD momentum, in ``[0, 1)``; ignored by Adam.
        score_weight_decay: weight decay on the scores, ``>= 0`` (rates get none).
        lr_schedule: ``'cosine'`` (annealed per epoch over the pruning run) or ``'constant'``.
        freeze_weights: keep every model parameter frozen while scores and rates are learned.
        steps_per_epoch: length of a gamma epoch in optimizer steps, an ``int >= 1``; needed only
            when ``compress`` is driven by ``max_steps`` alone.
        rate_grad_clip: bound on the magnitude of each rate's gradient before every optimizer step,
            ``> 0``, or ``None`` for no bound. A rate's straight-through gradient sums
            ``dL/dmask`` over the whole unit and can be huge (a nearly emptied layer in front of a
            BatchNorm: 1e3-1e5 at 99 % sparsity), so one unbounded step throws ``r`` far into the
            flat tail of the sigmoid, where ``k`` sticks at its floor or ceiling for good (neither
            the task nor the hardware loss gradient can bring it back).
        min_kept_per_output: per-layer floor in whole weights, an ``int >= 0``: an unstructured
            layer keeps at least ``min_kept_per_output`` weights per output channel (row of its
            weight; capped by the layer's ceiling), on top of the ``alpha`` floor. At extreme
            sparsity ``alpha * target_keep * n`` is a handful of weights for small layers (a
            10-class classifier keeping 2 weights can tell at most 2 classes apart). Ignored by
            structured pruning, whose units are channels, and by HYDRA (``learn_rates=False``), whose
            rates stay uniform. ``0`` disables it.
        round_to: structured pruning keeps a multiple of ``round_to`` channels in every group of at
            least ``4 * round_to`` channels (smaller groups are counted channel by channel), an
            ``int >= 1``. Vectorised CPU kernels (oneDNN, ONNX Runtime's blocked layouts) work in
            blocks of 8 or 16 channels: a pruned model with odd channel counts can run slower than
            the dense one. ``1`` disables it; ignored by unstructured pruning.
        met_tolerance: the target counts as met once the rates' kept fraction (the one the hardware
            loss sees) is ``<= target + met_tolerance``, in
            ``[0, 1)``.
    """

    gamma_0: float = 0.01
    alpha: float = 0.1
    stage_boundaries: tuple[int, ...] | None = None
    budget: Literal["params", "flops"] | None = None
    learn_rates: bool = True
    optimizer: Literal["sgd", "adam"] = "sgd"
    score_lr: float = 0.1
    rate_lr: float = 0.1
    momentum: float = 0.9
    score_weight_decay: float = 5e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    freeze_weights: bool = True
    steps_per_epoch: int | None = None
    met_tolerance: float = 0.0
    rate_grad_clip: float | None = 1.0
    min_kept_per_output: int = 1
    round_to: int = 8

    def __post_init__(self) -> None:
        _real("gamma_0", self.gamma_0, 0.0, math.inf, low_open=True, high_open=True)
        _real("alpha", self.alpha, 0.0, 1.0, low_open=True, high_open=False)
        if self.stage_boundaries is not None:
            value = self.stage_boundaries
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise SettingsError("stage_boundaries", value, "None or a sequence of ints")
            bounds = tuple(value)
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bounds):
                raise SettingsError("stage_boundaries", value, "None or a sequence of ints >= 1")
            if any(b >= c for b, c in zip(bounds, bounds[1:])):
                raise SettingsError("stage_boundaries", value, "strictly increasing")
            object.__setattr__(self, "stage_boundaries", bounds)
        if self.budget is not None:
            _choice("budget", self.budget, BUDGETS)
        _flag("learn_rates", self.learn_rates)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _real("score_lr", self.score_lr, 0.0, math.inf, low_open=True, high_open=True)
        _real("rate_lr", self.rate_lr, 0.0, math.inf, low_open=True, high_open=True)
        _real("momentum", self.momentum, 0.0, 1.0, low_open=False, high_open=True)
        _real("score_weight_decay", self.score_weight_decay, 0.0, math.inf, low_open=False, high_open=True)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _flag("freeze_weights", self.freeze_weights)
        if self.steps_per_epoch is not None and (
            isinstance(self.steps_per_epoch, bool) or not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1
        ):
            raise SettingsError("steps_per_epoch", self.steps_per_epoch, "None or an int >= 1")
        _real("met_tolerance", self.met_tolerance, 0.0, 1.0, low_open=False, high_open=True)
        if self.rate_grad_clip is not None:
            _real("rate_grad_clip", self.rate_grad_clip, 0.0, math.inf, low_open=True, high_open=True)
        if (isinstance(self.min_kept_per_output, bool) or not isinstance(self.min_kept_per_output, int)
                or self.min_kept_per_output < 0):
            raise SettingsError("min_kept_per_output", self.min_kept_per_output, "an int >= 0")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise SettingsError("round_to", self.round_to, "an int >= 1 (1: no rounding)")

    def budget_for(self, structured: bool) -> str:
        """The budget the hardware loss counts: the explicit one, else params/FLOPs by granularity."""
        if self.budget is not None:
            return self.budget
        return "flops" if structured else "params"

    @classmethod
    def resolve(cls, settings: HARPSettings | None, overrides: Mapping[str, Any]) -> HARPSettings:
        """``settings`` (or the defaults) with ``overrides`` applied; unknown names raise ``TypeError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unknown HARP setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(names))}"
            )
        if settings is None:
            return cls(**dict(overrides))
        if not isinstance(settings, cls):
            raise TypeError(f"settings must be a HARPSettings, not {type(settings).__name__}")
        return replace(settings, **dict(overrides)) if overrides else settings
