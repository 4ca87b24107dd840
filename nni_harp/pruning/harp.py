"""HARP (Holistic Adversarially Robust Pruning, Zhao & Wressnegger, ICLR 2023) as an NNI 3.0 pruner,
and HYDRA (the same scores and straight-through masks, rates fixed at the target) beside it."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from nni.compression.base.compressor import Pruner
from nni.compression.base.target_space import PruningTargetSpace
from nni.compression.utils import Evaluator

from graph_passes.cost_model import CostModel
from graph_passes.groups import ChannelGroup
from graph_passes.latency import LatencyModel

from ._apply import APPLY_METHOD, quicken, set_masker
from ._config import parse_config_list
from ._masking import Masking, StructuredMasking, UnstructuredMasking
from ._optim import HarpOptimizer, freeze_for_pruning, norm_affine_parameters
from ._plan import Plan, channel_structure, plan_structured, plan_unstructured, structured_target
from ._state import STATE_VERSION, pruner_state, restore_pruner
from ._units import ScoreUnit
from ._loop import finalize, run_epochs, run_length
from .budget import hinge
from .errors import PruningError
from .schedule import GammaSchedule
from .settings import HARPSettings

__all__ = ["HARPPruner", "STATE_VERSION"]

_logger = logging.getLogger(__name__)


def _split_parallel(model: nn.Module) -> tuple[nn.Module, str]:
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module, "module."
    return model, ""


class HARPPruner(Pruner):
    """HARP: learn importance scores *and* per-layer compression rates under a hardware budget.

    Used like NNI's training-aware pruners::

        pruner = HARPPruner(model, [{'op_types': ['Conv2d', 'Linear'], 'sparse_ratio': 0.99}], evaluator)
        model, masks = pruner.compress(max_steps=None, max_epochs=20)

    ``evaluator`` is an NNI evaluator (``TorchEvaluator`` with ``nni.trace``'d optimizers); its
    ``training_step`` gives the task loss (HARP uses an adversarial one, see
    :func:`nni_harp.adversarial.training_step_for`). The model may be wrapped in
    ``DistributedDataParallel``.

    ``config_list`` uses NNI's keys. ``sparse_ratio`` is the target of the layers an entry selects;
    entries sharing a ``global_group_id`` share one budget, an entry without one is a budget of its
    own, and HARP distributes each budget over its layers. ``max_sparse_ratio`` /
    ``min_sparse_ratio`` bound every layer's kept fraction. ``granularity='default'`` prunes single
    weights (budget: parameters); ``'out_channel'`` prunes the coupled channel groups found by
    :func:`graph_passes.channel_groups` (budget: the whole model's FLOPs from
    :func:`graph_passes.cost`; needs ``dummy_input``, or the evaluator's). A group is pruned iff it
    is prunable, one of its member modules is selected and none is excluded; every member gets the
    group's channel mask. HARP's own knobs are :class:`HARPSettings` fields, given as ``settings``
    and/or keyword arguments.

    While pruning, the model's weights are frozen (its normalisation layers' affine parameters too,
    unless ``HARPSettings.train_norm_affine``); per unit (a layer, or a channel group) a
    score tensor and a rate ``r`` are trained by HARP's own optimizers, stepped together with the
    evaluator's first optimizer. The unit keeps its top ``round(k * n)`` ``|scores|``, with
    ``k = k_min + (k_max - k_min) * sigmoid(r)``, ``k_min = max(alpha * target_keep,
    1 - max_sparse_ratio)`` and ``k_max = 1 - min_sparse_ratio`` (1 by default). The rates start
    above the target (``HARPSettings.init_allocation`` at ``init_keep``). The loss is
    ``L_task + gamma * max(kept / target - 1, 0)``; gamma grows per epoch (or stage) until the
    target is first met, then stays frozen: robustness first, then the kept fraction is pushed
    down to the target, then both are held in balance. Each epoch is logged and appended to
    :attr:`history` with its phase (``'robustness'``, ``'descent'``, ``'balance'``);
    :attr:`frozen_at` is the epoch that first met the target.

    The last ``HARPSettings.settle_epochs`` epochs train with the final masks fixed, so that the
    normalisation layers' running statistics match the pruned structure. At the end the learned
    rates are projected onto the budget (one common scale factor, so their
    ratios are kept) and rounded to whole entries as close to the target as one entry allows, so the
    returned masks meet the target *by construction*: for unstructured pruning to within one weight,
    for structured pruning to within the cost of the coarsest channel. The returned model is still
    wrapped by NNI and applies the final masks; :meth:`layer_rates` gives the kept fraction per unit.

    A pruning run can be interrupted and resumed: :meth:`state_dict` (between epochs, e.g. from the
    evaluator's training function at the start of an epoch) holds the scores, rates, hard masks,
    HARP's optimizer states (momentum), the gamma schedule and the history; a new pruner on the same
    model given it through :meth:`load_state_dict` continues where the first one stopped when
    ``compress`` is called with the same ``max_epochs``. The model's own parameters and buffers
    (e.g. BatchNorm statistics and affine parameters) are not part of it: save and restore them
    with the model.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator,
        settings: HARPSettings | None = None,
        dummy_input: Any | None = None,
        **settings_kwargs: Any,
    ) -> None:
        # NNI calls overridable hooks from Pruner.__init__: set everything they may read first.
        self.settings = HARPSettings.resolve(settings, settings_kwargs)
        if evaluator is None or not isinstance(evaluator, Evaluator):
            raise PruningError(
                f"{type(self).__name__} trains scores and rates, so it needs an NNI evaluator "
                f"(e.g. nni.compression.TorchEvaluator), got {type(evaluator).__name__}"
            )
        self.history: list[dict[str, Any]] = []
        self.schedule = GammaSchedule(self.settings.gamma_0, self.settings.stage_boundaries)
        self._units: list[ScoreUnit] = []
        self._final_counts: dict[int, int] | None = None
        self._gamma = 0.0
        self._total_epochs: int | None = None  # of the running (or resumed) compress()
        self._optimizer: HarpOptimizer | None = None
        self._pending_optimizer_state: dict[str, Any] | None = None
        self._compressing = False
        self._reset_epoch_stats()
        inner, self._prefix = _split_parallel(model)
        parsed = parse_config_list(model, config_list)
        self.structured: bool = parsed.structured
        self.budget_kind: str = self.settings.budget_for(parsed.structured)
        self.dummy_input = dummy_input if dummy_input is not None else self._evaluator_dummy_input(evaluator)
        if self.structured:
            target = structured_target(parsed, self.budget_kind)
            groups, cost_model = self._channel_structure(inner, self.dummy_input)
            plan = plan_structured(inner, self._prefix, parsed, self.settings, self.budget_kind, target, groups,
                                   cost_model, self.dummy_input)
        else:
            plan = plan_unstructured(model, inner, self._prefix, parsed, self.settings, self.budget_kind, self.dummy_input)
        super().__init__(model, plan.config_list, evaluator)
        self._install(plan)
        #: :meth:`layer_rates` where pruning started (``HARPSettings.init_allocation``).
        self.start_rates: dict[str, float] = self.layer_rates()

    # ------------------------------------------------------------------ NNI hooks
    def _set_default_sparse_granularity(self, target_space: PruningTargetSpace) -> list[int] | str | None:
        return None  # HARP computes its masks itself; NNI's scalers are not used

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _evaluator_dummy_input(evaluator: Evaluator) -> Any | None:
        try:
            return evaluator.get_dummy_input()
        except NotImplementedError:
            return None

    def _channel_structure(self, model: nn.Module, example_inputs: Any) -> tuple[list[ChannelGroup], CostModel]:
        """The model's coupled channel groups and cost model (override point, e.g. for hand-built ones)."""
        return channel_structure(model, example_inputs)

    def _install(self, plan: Plan) -> None:
        for unit_plan in plan.units:
            wrapper = self._module_wrappers[unit_plan.module]
            self._units.append(ScoreUnit(
                unit_plan.name, wrapper, unit_plan.attr, unit_plan.init_scores, unit_plan.floor, unit_plan.ceiling,
                unit_plan.init_keep, learn_rate=self.settings.learn_rates,
                round_to=self.settings.round_to if self.structured else 1,
            ))
        self._budgets = plan.budgets
        self._overall = plan.overall
        self._latency_check = plan.latency_check
        self._groups = plan.groups
        self._masking: Masking = (StructuredMasking(self._units, plan.factors) if self.structured
                                  else UnstructuredMasking(self._units, [u.module for u in plan.units]))
        for module, targets in self._masking.targets().items():
            wrapper = self._module_wrappers[module]
            for target_name in targets:
                space = wrapper.pruning_target_spaces.get(target_name)
                if space is not None:
                    space.apply_method = APPLY_METHOD
            set_masker(wrapper, self._masker_for(module))
        for wrapper in self._module_wrappers.values():
            quicken(wrapper)

    def _masker_for(self, module: str) -> Callable[[str, Tensor, Tensor], Tensor]:
        # the masking, not the pruner: the wrapped model does not keep the pruner alive
        return functools.partial(self._masking.masked, module)

    # ------------------------------------------------------------------ reporting
    @property
    def target_fraction(self) -> float:
        """The kept fraction HARP aims at (params or FLOPs, over what the budget counts)."""
        return float(self._overall.target)

    @property
    def frozen_at(self) -> int | None:
        """The pruning epoch (0-based) whose end first met the target, from which gamma is frozen."""
        return self.schedule.frozen_at

    @property
    def latency_model(self) -> LatencyModel | None:
        """The fitted latency model of a ``budget='latency'`` run (``None`` for other budgets);
        once the masks are fixed, refitted on the measured final plans (``latency_checks``)."""
        return getattr(self._overall, "latency", None)

    @property
    def latency_checks(self) -> list[dict[str, Any]]:
        """The measured checks of a latency budget's final plan, per check the plan's
        ``predicted`` and ``measured`` latency fraction and whether it was ``within_limit`` (kept;
        a plan more than 10 % over the target was counted again under the model refitted on it);
        empty before the masks are fixed, for other budgets, or with ``latency_checks=0``."""
        check = self._latency_check
        return [dict(r) for r in check.records] if check is not None else []

    def _budgets_with(self, budget: Any) -> list[Any]:
        """The pruner's budgets with ``budget`` in the place of the overall one."""
        return [budget if b is self._overall else b for b in self._budgets]

    def _set_overall(self, budget: Any) -> None:
        """Put ``budget`` in the place of the overall budget (a latency model refitted by the check)."""
        self._budgets, self._overall = self._budgets_with(budget), budget

    def _counts(self) -> dict[int, int]:
        if self._final_counts is not None:
            return dict(self._final_counts)
        return {i: unit.count() for i, unit in enumerate(self._units)}

    def kept_fraction(self) -> float:
        """The kept fraction of the budgeted resource under the current (or final) hard masks."""
        counts = self._counts()
        return float(self._overall.kept({i: c / self._units[i].size for i, c in counts.items()}))

    def layer_rates(self) -> dict[str, float]:
        """Kept fraction per layer (unstructured; keyed by module name) or per channel group
        (structured; keyed by the group's first producing module): the learned, non-uniform rates."""
        counts = self._counts()
        return {unit.name: counts[i] / unit.size for i, unit in enumerate(self._units)}

    def _targets_met(self) -> bool:
        """Whether every budget is met by the current rates (the hardware loss is zero, up to
        ``met_tolerance``); the kept fraction of the continuous rates, as the hinge sees it."""
        with torch.no_grad():
            keep = {i: unit.keep_value() for i, unit in enumerate(self._units)}
            return all(
                float(b.kept({u: keep[u] for u in b.units})) <= b.target * (1 + 1e-6) + self.settings.met_tolerance
                for b in self._budgets
            )

    # ------------------------------------------------------------------ training
    def _reset_epoch_stats(self) -> None:
        self._task_sum: Tensor | float = 0.0
        self._hw_sum: Tensor | float = 0.0
        self._batches = 0
        self._epoch_steps = 0

    def _hardware_loss(self) -> Tensor:
        keep = {i: unit.keep() for i, unit in enumerate(self._units)}
        losses = [hinge(b.kept({u: keep[u] for u in b.units}), b.target) for b in self._budgets]
        return torch.stack([torch.as_tensor(x) for x in losses]).sum()

    def _loss_patch(self, loss: Tensor, batch: Any) -> Tensor:
        self._task_sum = self._task_sum + loss.detach()
        self._batches += 1
        if not self.settings.learn_rates:
            return loss
        hw = self._hardware_loss().to(loss.device)
        self._hw_sum = self._hw_sum + hw.detach()
        return loss + self._gamma * hw

    def _step_task(self, optimizer: HarpOptimizer) -> Callable[[], None]:
        def task() -> None:
            optimizer.step()
            self._epoch_steps += 1

        return task

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None) -> tuple[nn.Module, dict[str, dict[str, Tensor]]]:
        """Prune for ``max_epochs`` epochs (or ``max_steps`` steps, whichever ends first); returns the
        (still NNI-wrapped) model and its masks ``{module: {'weight': 0/1 tensor, 'bias': ...}}``
        (tensors the module does not have, e.g. a missing bias, are left out)."""
        for name, value in (("max_steps", max_steps), ("max_epochs", max_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if max_steps is None and max_epochs is None:
            raise ValueError("give max_epochs (or max_steps): HARP's gamma schedule counts epochs")
        if self._final_counts is not None:
            raise PruningError(f"this {type(self).__name__} has already compressed its model; create a new pruner")
        model, masks = super().compress(max_steps, max_epochs)
        # NNI lists absent targets (a conv without bias) with a None mask; leave them out, so the
        # masks name only tensors the model has (as graph_passes.ModelSpeedup and masked_copy expect)
        return model, {module: {name: mask for name, mask in targets.items() if mask is not None}
                       for module, targets in masks.items()}

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        epochs = run_length(self.settings, max_steps, max_epochs)
        if self._total_epochs is not None and self._total_epochs != epochs:
            raise PruningError(
                f"the loaded state belongs to a run of {self._total_epochs} pruning epochs, but compress() was asked "
                f"for {epochs}; resume with the same max_epochs (or max_steps and steps_per_epoch)"
            )
        self._total_epochs = epochs
        if self._units:  # index tensors of the structured masks live where the scores live
            self._masking.to(self._units[0].scores.device)
        saved = freeze_for_pruning(self.bound_model, self._units, self.settings.train_norm_affine) \
            if self.settings.freeze_weights else {}
        try:
            self.evaluator.bind_model(self.bound_model, self._get_param_names_map())
            try:
                norms = norm_affine_parameters(self.bound_model) if self.settings.train_norm_affine else []
                optimizer = HarpOptimizer(self.settings, self._units, norms)
                if self._pending_optimizer_state is not None:
                    optimizer.load_state_dict(self._pending_optimizer_state)
                    self._pending_optimizer_state = None
                self._optimizer = optimizer
                self.evaluator.patch_loss(self._loss_patch)
                self.evaluator.patch_optimizer_step(before_step_tasks=[self._step_task(optimizer)], after_step_tasks=[])
                self._compressing = True
                run_epochs(self, optimizer, epochs, max_steps, max_epochs is not None)
            finally:
                self._compressing = False
                self.evaluator.unbind_model()
        finally:
            for param, flag in saved.items():
                param.requires_grad_(flag)
        self._finalize()

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """HARP's state after the epochs run so far, as plain tensors, numbers, lists and dicts (so it
        can be saved with :func:`torch.save` and read back with ``weights_only=True``).

        Holds ``epoch`` (epochs completed), ``total_epochs`` (of the running ``compress``; ``None``
        before it), the settings, the gamma ``schedule`` (gamma and stage of every later epoch follow
        from it), the ``history``, per unit its ``scores``, ``rate`` and ``hard`` mask, and HARP's
        ``optimizer`` states (``None`` before ``compress``). Call it before ``compress`` or between
        epochs, not halfway through one and not after ``compress`` finished.
        """
        return pruner_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a pruner built the same way (same model, config_list,
        settings). Call it before ``compress``; then ``compress`` runs the remaining epochs of the
        stored run, with the stored momentum, gamma schedule and learning-rate schedule."""
        restore_pruner(self, state)

    # ------------------------------------------------------------------ finishing
    def _finalize(self) -> None:
        """Project the learned rates onto the budget, fix the hard masks, hand them to NNI's wrappers
        and remove HARP's tensors from the model."""
        finalize(self)
