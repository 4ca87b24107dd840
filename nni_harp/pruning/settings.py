"""HARP's own knobs: a frozen, validated dataclass (NNI's ``config_list`` schema is closed to them)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from graph_passes.latency import BACKENDS as LATENCY_BACKENDS
from graph_passes.latency import NORMS as LATENCY_NORMS

from ._allocation import ALLOCATIONS
from .._checks import check_choice, check_flag, check_int, check_real, is_int
from .errors import SettingsError

__all__ = ["HARPSettings", "BUDGETS", "OPTIMIZERS", "RATE_OPTIMIZERS", "LR_SCHEDULES"]

BUDGETS: tuple[str, ...] = ("params", "flops", "latency")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
#: Optimizers of the rates: those of the scores, and Adam with one second moment shared by all rates.
RATE_OPTIMIZERS: tuple[str, ...] = (*OPTIMIZERS, "shared-adam")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def _real(field: str, value: object, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    check_real(value, low, high, low_open=low_open, high_open=high_open,
               error=lambda _: SettingsError(field, value, "a finite real number"),
               out_of_range=lambda span: SettingsError(field, value, span))


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    check_choice(value, allowed, lambda: SettingsError(field, value, "one of " + ", ".join(repr(a) for a in allowed)))


def _flag(field: str, value: object) -> None:
    check_flag(value, lambda: SettingsError(field, value, "True or False"))


def _int(field: str, value: object, low: int, expected: str = "an int {}") -> None:
    check_int(value, low, error=lambda span: SettingsError(field, value, expected.format(span)))


#: ``descent_deadline`` when left at ``None``, by mode (``structured``): see the field.
DEFAULT_DEADLINE: dict[bool, float] = {False: 1.0, True: 0.5}
#: ``norm_lr / score_lr`` when ``norm_lr`` is left at ``None``: see the field.
DEFAULT_NORM_LR_FACTOR = 0.1


@dataclass(frozen=True)
class HARPSettings:
    """Settings of :class:`~nni_harp.pruning.HARPPruner` (and :class:`~nni_harp.pruning.HydraPruner`).

    Args:
        gamma_0: initial weight of the hardware loss, ``> 0``; gamma grows by ``gamma_0`` per epoch
            (or stage) until the target is first met. The paper uses 0.01 (CIFAR-10/SVHN) and 0.1
            (ImageNet) with ~8,000 rate steps per run; see ``rate_optimizer`` for why the default
            here is larger.
        alpha: floor factor, in ``(0, 1]``: a layer (or channel group) never keeps less than
            ``k_min = alpha * target_keep`` of its entries (and never fewer than one).
        stage_boundaries: epochs (0-based, strictly increasing, ``>= 1``) at which gamma grows by
            ``gamma_0``; ``None`` grows it every epoch, ``gamma_t = (t + 1) * gamma_0``, as in the
            paper. Growth stops for good once the target is first met.
        budget: what the hardware loss counts: ``'params'``, ``'flops'`` or ``'latency'`` (structured
            only: the latency a :class:`graph_passes.LatencyModel` measured on ``latency_backend``
            predicts, so ``sparse_ratio`` is the fraction of the dense latency removed); ``None``
            picks ``'params'`` for unstructured and ``'flops'`` for structured (``out_channel``)
            pruning.
        latency_backend: where the latency budget is measured: a name of
            ``graph_passes.LATENCY_BACKENDS`` (``'eager'`` PyTorch CPU, ``'onnxruntime'`` CPU,
            ``'cuda'``), on the dummy input's shape and batch.
        latency_threads: CPU threads the latency is measured with, an ``int >= 1``.
        latency_cache: folder where fitted latency models are kept, so a second run measures
            nothing; ``None``: ``$XDG_CACHE_HOME/nni_harp/latency`` (``~/.cache/...``).
        latency_norms: how the latency model's pruned configurations build their layer norms
            (``graph_passes.fit_latency(norms=...)``): ``'exact'`` (``ExactStatsNorm``, what plain
            masks speed up to) or ``'kept'`` (plain norms of the kept width, what a model fine-tuned
            with ``graph_passes.kept_stats_norms`` speeds up to: the pipeline's default for
            structured runs that fine-tune). Models without layer norms time the same either way.
        latency_checks: how many times the final plan of a latency budget is measured on the
            backend when the masks are fixed, an ``int >= 0``: after each measurement the latency
            model is fitted again with it (``graph_passes.refine_latency``) and, if the plan
            measured more than 10 % over the target, the final counts are taken again under the
            refitted model (a plan under the target is kept: the target is a limit). The model is
            fitted on random plans and refined at the uniform plan before pruning; HARP's learned
            plan is neither. ``0``: the plan follows the model as fitted.
        init_allocation: where the per-unit kept fractions start, at an overall kept fraction of
            ``init_keep``: ``'uniform'`` (every unit the same fraction), ``'magnitude'`` (one global
            threshold on weight magnitudes; structured: on channels' RMS weight), ``'lamp'`` (one
            global threshold on LAMP scores, Lee et al. 2021, which rescale magnitudes per unit),
            ``'erk'`` (Erdos-Renyi-Kernel densities, unstructured only), or ``'dense'`` (every unit
            at its ceiling; ``init_keep`` is ignored). HYDRA (``learn_rates=False``) always starts,
            and stays, uniform at the target.
        init_keep: overall kept fraction (of the budgeted params or FLOPs) the allocation starts
            at, in ``[target, 1]``; ``None`` (default) starts at ``sqrt(target)``, the geometric
            middle between the target and the dense model: 0.32 of the weights for a 90 % target,
            0.1 for 99 % (the authors' 10 % start), 0.71 of the FLOPs for half the FLOPs.
            Starting *above* the target is what gives HARP its stagewise schedule: while the
            kept fraction is above the target the hardware loss is active and gamma grows
            (robustness first, then the kept fraction is pushed down), and gamma freezes at the
            first epoch that meets the target (then both are held in balance). Starting *at* the
            target meets it at once, freezes gamma at ``gamma_0`` and skips the descent.
        learn_rates: learn per-layer rates (HARP). ``False`` fixes them uniformly at the target and
            only learns scores (HYDRA).
        optimizer: ``'sgd'`` (momentum ``momentum``) or ``'adam'``, for the scores (and the norm
            affine parameters, see ``train_norm_affine``).
        score_lr: learning rate of the importance scores, ``> 0``.
        rate_optimizer: ``'adam'`` (AdamW, default), ``'shared-adam'`` or ``'sgd'`` (with
            ``momentum``), for the rate parameters (weight decay ``rate_weight_decay``, decoupled
            under both Adams). A rate's straight-through gradient sums ``dL/dmask`` over its unit;
            once the scores settle it is 1e-3-1e-2, so an SGD step of ``rate_lr * grad`` only moves
            rates in runs of thousands of steps (the paper's 20 epochs x 391 steps). Adam's step is
            ``~rate_lr`` whatever the gradient's scale, so rates move in short runs as in long ones;
            it is per entry, so every unit moves at about the same speed in the direction of its
            gradient's sign. ``'shared-adam'``
            (:class:`~nni_harp.pruning._optim.SharedScaleAdam`) divides by one running RMS over all
            rates instead, so units keep SGD's relative speeds. Measured on the robust-pruning
            benchmark (test_resnet, digits): 95 % unstructured (seed 0, norm affine frozen, robust
            accuracy after fine-tuning), Adam 69.0 %, shared Adam 3.0 % (the large late layers
            moved fastest and ended at 0.6-1 % of their weights); structured, with every other
            setting at its default (3 seeds, PGD-20 after fine-tuning,
            ``benchmarks/results/harp_settings_ab_rate_optimizer_structured_*.md``): 75 % of the
            FLOPs removed, shared Adam 63.5 ± 2.6 % against Adam 62.7 ± 1.3 %, 90 %, 57.3 ± 0.6 %
            against 59.5 ± 2.3 %. (A single seed had read 70.0 against 62.0 % at 75 % with the
            norms frozen; the 3-seed difference, 0.8 points, is less than single seeds of the
            default moved between two commits: 60.7 / 65.9 / 62.7 % in
            ``harp_settings_ab_grid_after_structured_0.75.md``, 61.8 / 64.2 / 62.1 % now.)
        rate_lr: learning rate of the rate parameters (logits of the kept fraction), ``> 0``; with
            Adam about the largest move per step.
        momentum: SGD momentum, in ``[0, 1)``; ignored by Adam.
        score_weight_decay: weight decay on the scores (and norm affine parameters), ``>= 0``.
        rate_weight_decay: weight decay on the rate parameters, ``>= 0`` (the authors decay them
            with the rest); decoupled under Adam, so it only slowly pulls unused rates to the middle.
        train_norm_affine: train the affine weight and bias of the normalisation layers (BatchNorm,
            LayerNorm, GroupNorm, ...) with the scores while pruning, as the authors and HYDRA do
            (at ``norm_lr``); every other model parameter stays frozen (when ``freeze_weights``).
            On by default.
        lr_schedule: ``'cosine'`` (annealed per epoch over the pruning run) or ``'constant'``.
        freeze_weights: keep the model's weights frozen while scores and rates are learned.
        steps_per_epoch: length of a gamma epoch in optimizer steps, an ``int >= 1``; needed only
            when ``compress`` is driven by ``max_steps`` alone.
        rate_grad_clip: bound on the magnitude of each rate's gradient before every optimizer step,
            ``> 0``, or ``None`` for no bound. A rate's straight-through gradient sums
            ``dL/dmask`` over the whole unit and can be huge (a nearly emptied layer in front of a
            BatchNorm: 1e3-1e5 at 99 % sparsity); one such step would throw an SGD-trained ``r``
            far into the flat tail of the sigmoid, and it would dominate Adam's second moment.
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
            the dense one. The hard masks keep counts on this grid while HARP learns too, so the
            structure the scores and rates learn on is the one kept: with channel-by-channel counts
            while learning, the final rounding moved test_resnet's groups by up to 7 channels at 90 %
            of the FLOPs removed (one group learned 1 of 96 channels and kept 8) and the pruned
            models' PGD-20 after fine-tuning was 56.2 % against 59.5 % with the grid (mean of 3
            seeds, ``benchmarks/results/harp_settings_ab_grid_{before,after}_structured_0.9.md``;
            63.4 against 63.1 % at 75 %). ``1`` disables it; ignored by unstructured pruning.
        descent_deadline: share of the pruning epochs, in ``(0, 1]``, by whose end the target must
            be met: if the rates are still above it at the end of epoch ``ceil(share * epochs) - 1``
            (0-based), they are projected onto the budget there (one common factor: the learned
            ratios between units are kept), gamma freezes, and every later epoch end above the
            target is projected again, so the remaining epochs train the scores at the target's
            sparsity (the balance phase) instead of meeting the final cut untrained. ``1.0`` never
            forces. ``None`` (default): :data:`DEFAULT_DEADLINE`, ``1.0`` for unstructured pruning,
            whose rates met the target by themselves at epochs 11-15 of 20 on the robust-pruning
            benchmark, and ``0.5`` for structured pruning, whose rates had not got below 41-45 % of
            the FLOPs (target 25 %) by the end of the same 20 epochs, so the whole cut came at once
            (``benchmarks/results/robust_pruning_01384ec.md`` for the run before this default).
        descent_glide: hold the descent to a glide path: from the end of the first epoch to the
            epoch that must meet the target (the ``descent_deadline`` epoch, else the epoch before
            settling), every epoch end whose kept fraction lies above the path is projected onto it
            (one common factor, the learned ratios kept; recorded as ``held`` in the history). The
            path falls geometrically, from the kept fraction at the end of the first epoch to the
            target. Rates that descend faster by themselves never touch it; rates that lag are
            pushed down a few per cent per epoch, while the scores adapt, instead of being cut all
            at once where the target must be met. Without it, at 99 % unstructured the rates
            stalled at 1.5-1.6 % of the weights (the large layers at their floor, the small ones held
            by the task loss) and the cut to 1 % at settling left the models at 31-44 % clean
            accuracy before fine-tuning (``benchmarks/results/robust_pruning_b9f353c.md``).
            Measured with and without it (``benchmarks/results/harp_settings_ab_glide_*.md``, 3
            seeds, PGD-20 after fine-tuning): 99 % unstructured 54.3 ± 13.0 vs 46.3 ± 11.6 %, 75 % of
            the FLOPs removed 71.1 ± 5.5 vs 69.7 ± 10.8 %. ``False``: only the deadline (and
            settling) project.
        norm_lr: learning rate of the normalisation layers' affine parameters when
            ``train_norm_affine``, ``> 0``. ``None`` (default): ``score_lr`` times
            :data:`DEFAULT_NORM_LR_FACTOR` (0.1; the authors train them at the score rate). Scores
            are scale-free (only their order matters), the affine parameters are not: at the score
            rate the structured runs' pruning-time adversarial loss climbed to chance (2.3) on 2 of 3
            seeds, for HYDRA's uniform rates too (``benchmarks/results/robust_pruning_01384ec.md``),
            and at 90 % unstructured it rose from 0.4 to 1-1.8 late in the balance phase. A tenth of
            the score rate, measured on the robust-pruning setup (3 seeds, PGD-20 after fine-tuning,
            ``benchmarks/results/harp_settings_ab_norm_lr_unstructured_*.md``): 90 % unstructured
            72.9 ± 2.4 vs 52.9 ± 19.0 %, 99 % 64.1 ± 6.5 vs 54.3 ± 13.0 %, 95 % 75.7 ± 1.2 vs
            78.3 ± 2.0 % (the one cost: the rates descend more slowly without the norms' help).
        met_tolerance: the target counts as met once the rates' kept fraction (the one the hardware
            loss sees) is ``<= target + met_tolerance``, in ``[0, 1)``.
        settle_epochs: the last ``settle_epochs`` pruning epochs (of a run longer than that) train
            with the final masks fixed, an ``int >= 0``: at their start the rates are projected onto
            the budget if they are still above it, the final counts are taken, and from then on
            scores and rates stay put while the normalisation layers' affine parameters (with
            ``train_norm_affine``) go on training and their running statistics settle on the final
            structure. While scores learn, the kept channels change from step to step, so a
            BatchNorm's running statistics average over many structures: without settling, the
            structured HARP models of the robust-pruning benchmark had 29 % clean accuracy in eval
            mode before fine-tuning, mean of 3 seeds ("before FT" in
            ``benchmarks/results/robust_pruning_01384ec.md``). ``0`` disables it. The settling
            epochs' adversarial loss (``history``, the report's pruning history) can read higher
            than the epochs before: this package's attacks craft their examples in eval mode, on the
            running statistics, which fit the model's structure only once it stops changing, so
            the training attack reaches its full strength there (structured, 75 % of the FLOPs
            removed, benchmark seed 0: 0.83 in the epoch before, 1.55 in the settling one, about
            1.1 in its first steps and 1.4-2.1 in its second half while only the norms changed).
            Crafting the training attack on batch statistics while pruning instead (an ad-hoc A/B,
            not kept; 3 seeds, 75 %) read 0.8-1.8 through the run and gave PGD-20 after
            fine-tuning 63.4 against 62.7 %: no gain, so the attacks stay as they are.
    """

    gamma_0: float = 0.01
    alpha: float = 0.1
    stage_boundaries: tuple[int, ...] | None = None
    budget: Literal["params", "flops", "latency"] | None = None
    latency_backend: str = "eager"
    latency_threads: int = 1
    latency_cache: str | None = None
    latency_norms: Literal["exact", "kept"] = "exact"
    latency_checks: int = 2
    init_allocation: Literal["uniform", "dense", "magnitude", "lamp", "erk"] = "uniform"
    init_keep: float | None = None
    learn_rates: bool = True
    optimizer: Literal["sgd", "adam"] = "sgd"
    score_lr: float = 0.1
    rate_optimizer: Literal["sgd", "adam", "shared-adam"] = "adam"
    rate_lr: float = 0.05
    momentum: float = 0.9
    score_weight_decay: float = 5e-4
    rate_weight_decay: float = 5e-4
    train_norm_affine: bool = True
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    freeze_weights: bool = True
    steps_per_epoch: int | None = None
    descent_deadline: float | None = None
    norm_lr: float | None = None
    descent_glide: bool = True
    met_tolerance: float = 0.0
    settle_epochs: int = 1
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
            if any(not is_int(b) or b < 1 for b in bounds):
                raise SettingsError("stage_boundaries", value, "None or a sequence of ints >= 1")
            if any(b >= c for b, c in zip(bounds, bounds[1:])):
                raise SettingsError("stage_boundaries", value, "strictly increasing")
            object.__setattr__(self, "stage_boundaries", bounds)
        if self.budget is not None:
            _choice("budget", self.budget, BUDGETS)
        _choice("latency_backend", self.latency_backend, tuple(LATENCY_BACKENDS))
        _int("latency_threads", self.latency_threads, 1)
        _choice("latency_norms", self.latency_norms, LATENCY_NORMS)
        _int("latency_checks", self.latency_checks, 0)
        if self.latency_cache is not None and not isinstance(self.latency_cache, str):
            raise SettingsError("latency_cache", self.latency_cache, "None or a folder path (str)")
        _choice("init_allocation", self.init_allocation, tuple(ALLOCATIONS))
        if self.init_keep is not None:
            _real("init_keep", self.init_keep, 0.0, 1.0, low_open=True, high_open=False)
        _flag("learn_rates", self.learn_rates)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _real("score_lr", self.score_lr, 0.0, math.inf, low_open=True, high_open=True)
        _choice("rate_optimizer", self.rate_optimizer, RATE_OPTIMIZERS)
        _real("rate_lr", self.rate_lr, 0.0, math.inf, low_open=True, high_open=True)
        _real("momentum", self.momentum, 0.0, 1.0, low_open=False, high_open=True)
        _real("score_weight_decay", self.score_weight_decay, 0.0, math.inf, low_open=False, high_open=True)
        _real("rate_weight_decay", self.rate_weight_decay, 0.0, math.inf, low_open=False, high_open=True)
        _flag("train_norm_affine", self.train_norm_affine)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _flag("freeze_weights", self.freeze_weights)
        if self.steps_per_epoch is not None:
            _int("steps_per_epoch", self.steps_per_epoch, 1, "None or an int {}")
        if self.descent_deadline is not None:
            _real("descent_deadline", self.descent_deadline, 0.0, 1.0, low_open=True, high_open=False)
        _flag("descent_glide", self.descent_glide)
        if self.norm_lr is not None:
            _real("norm_lr", self.norm_lr, 0.0, math.inf, low_open=True, high_open=True)
        _real("met_tolerance", self.met_tolerance, 0.0, 1.0, low_open=False, high_open=True)
        _int("settle_epochs", self.settle_epochs, 0)
        if self.rate_grad_clip is not None:
            _real("rate_grad_clip", self.rate_grad_clip, 0.0, math.inf, low_open=True, high_open=True)
        _int("min_kept_per_output", self.min_kept_per_output, 0)
        _int("round_to", self.round_to, 1, "an int {} (1: no rounding)")

    def budget_for(self, structured: bool) -> str:
        """The budget the hardware loss counts: the explicit one, else params/FLOPs by granularity."""
        if self.budget == "latency" and not structured:
            raise SettingsError("budget", "latency", "'params' or 'flops' for unstructured pruning: zeroed weights "
                                "do not make dense kernels faster; prune channels (granularity='out_channel')")
        if self.budget is not None:
            return self.budget
        return "flops" if structured else "params"

    def deadline_for(self, structured: bool) -> float:
        """The descent deadline: the explicit one, else :data:`DEFAULT_DEADLINE` of the mode."""
        return self.descent_deadline if self.descent_deadline is not None else DEFAULT_DEADLINE[structured]

    def deadline_epoch(self, epochs: int, structured: bool) -> int | None:
        """The 0-based epoch of ``epochs`` at whose end an unmet target is forced
        (:meth:`deadline_for`); ``None`` for a deadline of 1.0 (only the final masks project)."""
        share = self.deadline_for(structured)
        if share >= 1.0:
            return None
        return max(0, math.ceil(share * epochs - 1e-9) - 1)

    def glide_end(self, epochs: int, structured: bool) -> int | None:
        """The 0-based epoch whose end the glide path (``descent_glide``) reaches the target at: the
        deadline epoch, else the epoch before settling; ``None`` when off or neither exists."""
        if not self.descent_glide or not self.learn_rates:
            return None
        deadline = self.deadline_epoch(epochs, structured)
        if deadline is not None:
            return deadline
        settle = self.settle_epoch(epochs)
        return settle - 1 if settle is not None else None

    def norm_lr_value(self) -> float:
        """The norm affine parameters' learning rate: the explicit one, else ``score_lr`` times
        :data:`DEFAULT_NORM_LR_FACTOR`."""
        return self.norm_lr if self.norm_lr is not None else self.score_lr * DEFAULT_NORM_LR_FACTOR

    def settle_epoch(self, epochs: int) -> int | None:
        """The 0-based epoch of ``epochs`` from which the final masks are fixed (``settle_epochs``);
        ``None`` when off or when the run is not longer than the settling."""
        if self.settle_epochs == 0 or epochs <= self.settle_epochs:
            return None
        return epochs - self.settle_epochs

    def latency_cache_dir(self) -> Path:
        """Where fitted latency models are kept: ``latency_cache``, else ``$XDG_CACHE_HOME/nni_harp/latency``
        (``~/.cache/nni_harp/latency``)."""
        if self.latency_cache is not None:
            return Path(self.latency_cache).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nni_harp" / "latency"

    def start_keep(self, target: float) -> float:
        """The overall kept fraction the rates start at for a budget ``target``: ``init_keep`` (at
        least the target), or ``sqrt(target)``; the target itself for HYDRA, whose rates are fixed."""
        if not self.learn_rates:
            return target
        if self.init_keep is None:
            return math.sqrt(target)
        if self.init_keep < target:
            raise SettingsError("init_keep", self.init_keep, f"None or in [target, 1] = [{target:.4g}, 1]: the rates start "
                                "above the target and descend to it")
        return float(self.init_keep)

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
