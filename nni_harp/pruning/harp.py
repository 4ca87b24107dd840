"""HARP (Holistic Adversarially Robust Pruning, Zhao & Wressnegger, ICLR 2023) as an NNI 3.0 pruner,
and HYDRA (the same scores and straight-through masks, rates fixed at the target) beside it."""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import fields, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from nni.compression.base.compressor import Pruner
from nni.compression.base.target_space import PruningTargetSpace
from nni.compression.utils import Evaluator

from graph_passes.cost_model import CostModel
from graph_passes.groups import ChannelGroup

from ._apply import APPLY_METHOD, clear_masker, set_masker
from ._config import parse_config_list
from ._plan import Plan, plan_structured, plan_unstructured, structured_target
from ._structure import factor_mask
from ._units import ScoreUnit
from .budget import hinge, project_keep, round_to_counts
from .errors import PruningError, SettingsError, StructureError
from .schedule import GammaSchedule
from .settings import HARPSettings

__all__ = ["HARPPruner", "HydraPruner", "STATE_VERSION"]

#: Version of the dictionary :meth:`HARPPruner.state_dict` returns.
STATE_VERSION = 1

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

    While pruning, every model parameter is frozen; per unit (a layer, or a channel group) a score
    tensor and a rate ``r`` are trained by HARP's own optimizer, stepped together with the
    evaluator's first optimizer. The unit keeps its top ``round(k * n)`` ``|scores|``, with
    ``k = k_min + (k_max - k_min) * sigmoid(r)``, ``k_min = max(alpha * target_keep,
    1 - max_sparse_ratio)`` and ``k_max = 1 - min_sparse_ratio`` (1 by default). The loss is
    ``L_task + gamma * max(kept / target - 1, 0)``; gamma grows per epoch (or stage) until the
    target is first met, then stays frozen. Each epoch is logged and appended to :attr:`history`.

    At the end the learned rates are projected onto the budget (one common scale factor, so their
    ratios are kept) and rounded to whole entries as close to the target as one entry allows, so the
    returned masks meet the target *by construction*: for unstructured pruning to within one weight,
    for structured pruning to within the cost of the coarsest channel. The returned model is still
    wrapped by NNI and applies the final masks; :meth:`layer_rates` gives the kept fraction per unit.

    A pruning run can be interrupted and resumed: :meth:`state_dict` (between epochs, e.g. from the
    evaluator's training function at the start of an epoch) holds the scores, rates, hard masks,
    HARP's optimizer state (momentum), the gamma schedule and the history; a new pruner on the same
    model given it through :meth:`load_state_dict` continues where the first one stopped when
    ``compress`` is called with the same ``max_epochs``. The model's own parameters and buffers
    (e.g. BatchNorm statistics) are not part of it: save and restore them with the model.
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
        self._optimizer: torch.optim.Optimizer | None = None
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
            plan = plan_structured(inner, self._prefix, parsed, self.settings, self.budget_kind, target, groups, cost_model)
        else:
            plan = plan_unstructured(model, inner, self._prefix, parsed, self.settings, self.budget_kind, self.dummy_input)
        super().__init__(model, plan.config_list, evaluator)
        self._install(plan)

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
        try:
            from graph_passes import channel_groups, cost
        except ImportError as exc:
            raise StructureError(
                "structured HARP (granularity='out_channel') needs graph_passes.channel_groups and graph_passes.cost, "
                "which this installation does not provide"
            ) from exc
        if example_inputs is None:
            raise StructureError("structured HARP traces the model: pass dummy_input (or give the evaluator one)")
        groups = list(channel_groups(model, example_inputs))
        cost_model = cost(model, example_inputs)
        known = {g.id for g in groups}
        stray = sorted({gid for layer in cost_model.layers for f in (*layer.flops_factors, *layer.params_factors)
                        for gid, _ in f.parts} - known)
        if stray:
            raise StructureError(f"the cost model refers to channel groups {stray} that channel_groups did not return")
        return groups, cost_model

    def _install(self, plan: Plan) -> None:
        for unit_plan in plan.units:
            wrapper = self._module_wrappers[unit_plan.module]
            self._units.append(ScoreUnit(
                unit_plan.name, wrapper, unit_plan.attr, unit_plan.init_scores, unit_plan.floor, unit_plan.ceiling,
                unit_plan.init_keep, learn_rate=self.settings.learn_rates,
            ))
        self._budgets = plan.budgets
        self._overall = plan.overall
        self._groups = plan.groups
        self._factors = plan.factors
        if self.structured:
            masked = {module: set(params) for module, params in plan.factors.items()}
        else:
            masked = {u.module: {"weight"} for u in plan.units}
        self._unit_of_module = {u.module: i for i, u in enumerate(plan.units)}
        for module, targets in masked.items():
            wrapper = self._module_wrappers[module]
            for target_name in targets:
                space = wrapper.pruning_target_spaces.get(target_name)
                if space is not None:
                    space.apply_method = APPLY_METHOD
            set_masker(wrapper, self._masker_for(module))

    def _masker_for(self, module: str) -> Callable[[str, Tensor], Tensor | None]:
        ref = weakref.ref(self)

        def masker(target_name: str, target: Tensor) -> Tensor | None:
            pruner = ref()
            return None if pruner is None else pruner._soft_mask(module, target_name, target)

        return masker

    def _soft_mask(self, module: str, target_name: str, target: Tensor) -> Tensor | None:
        if self.structured:
            factors = self._factors.get(module, {}).get(target_name)
            if not factors:
                return None
            channel_masks = {f.unit: self._units[f.unit].soft_mask() for f in factors}
            return factor_mask(factors, channel_masks, target)
        if target_name != "weight" or module not in self._unit_of_module:
            return None
        return self._units[self._unit_of_module[module]].soft_mask().view_as(target).to(target.dtype)

    # ------------------------------------------------------------------ reporting
    @property
    def target_fraction(self) -> float:
        """The kept fraction HARP aims at (params or FLOPs, over what the budget counts)."""
        return float(self._overall.target)

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

    def _base_lrs(self) -> list[float]:
        """Learning rates of the optimizer's groups (scores, then rates when learned) before scheduling."""
        s = self.settings
        return [s.score_lr, s.rate_lr] if s.learn_rates else [s.score_lr]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        lrs = self._base_lrs()
        groups: list[dict[str, Any]] = [
            {"params": [u.scores for u in self._units], "lr": lrs[0], "weight_decay": s.score_weight_decay}
        ]
        if s.learn_rates:
            groups.append({"params": [u.rate for u in self._units], "lr": lrs[1], "weight_decay": 0.0})
        if s.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=s.score_lr, momentum=s.momentum)
        return torch.optim.Adam(groups, lr=s.score_lr)

    def _step_task(self, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        clip = self.settings.rate_grad_clip if self.settings.learn_rates else None

        def task() -> None:
            if clip is not None:
                for unit in self._units:
                    if unit.rate.grad is not None:
                        unit.rate.grad.clamp_(-clip, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._epoch_steps += 1
            for unit in self._units:
                unit.refresh()

        return task

    def _freeze(self) -> dict[nn.Parameter, bool]:
        own = {id(p) for unit in self._units for p in (unit.scores, unit.rate)}
        saved: dict[nn.Parameter, bool] = {}
        for param in self.bound_model.parameters():
            if id(param) not in own:
                saved[param] = param.requires_grad
                param.requires_grad_(False)
        return saved

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
        steps_per_epoch = self.settings.steps_per_epoch
        if max_epochs is not None:
            epochs = max_epochs
        else:
            if steps_per_epoch is None:
                raise SettingsError("steps_per_epoch", None, "an int >= 1 when compress() is driven by max_steps alone")
            epochs = math.ceil(max_steps / steps_per_epoch)  # type: ignore[operator]
        if self._total_epochs is not None and self._total_epochs != epochs:
            raise PruningError(
                f"the loaded state belongs to a run of {self._total_epochs} pruning epochs, but compress() was asked "
                f"for {epochs}; resume with the same max_epochs (or max_steps and steps_per_epoch)"
            )
        self._total_epochs = epochs
        if self._units:  # index tensors of the structured masks live where the scores live
            device = self._units[0].scores.device
            self._factors = {
                module: {name: [replace(f, index=f.index.to(device), channel=f.channel.to(device)) for f in factors]
                         for name, factors in targets.items()}
                for module, targets in self._factors.items()
            }
        saved = self._freeze() if self.settings.freeze_weights else {}
        try:
            self.evaluator.bind_model(self.bound_model, self._get_param_names_map())
            try:
                optimizer = self._make_optimizer()
                if self._pending_optimizer_state is not None:
                    optimizer.load_state_dict(self._pending_optimizer_state)
                    self._pending_optimizer_state = None
                self._optimizer = optimizer
                self.evaluator.patch_loss(self._loss_patch)
                self.evaluator.patch_optimizer_step(before_step_tasks=[self._step_task(optimizer)], after_step_tasks=[])
                self._compressing = True
                self._run_epochs(optimizer, epochs, max_steps, max_epochs is not None)
            finally:
                self._compressing = False
                self.evaluator.unbind_model()
        finally:
            for param, flag in saved.items():
                param.requires_grad_(flag)
        self._finalize()

    def _run_epochs(self, optimizer: torch.optim.Optimizer, epochs: int, max_steps: int | None, by_epoch: bool) -> None:
        s = self.settings
        base_lrs = self._base_lrs()
        start = len(self.history)  # > 0 when resumed from a state_dict
        steps_left = None if max_steps is None else max_steps - sum(int(h["steps"]) for h in self.history)
        for epoch in range(start, epochs):
            if steps_left is not None and steps_left <= 0:
                break
            self._gamma = self.schedule.gamma_for(epoch) if s.learn_rates else 0.0
            factor = 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) if s.lr_schedule == "cosine" else 1.0
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * factor
            self._reset_epoch_stats()
            if by_epoch:
                self.evaluator.train(max_steps=steps_left, max_epochs=1)
            else:
                chunk = min(s.steps_per_epoch, steps_left)  # type: ignore[type-var]
                self.evaluator.train(max_steps=chunk, max_epochs=None)
            if steps_left is not None:
                steps_left -= self._epoch_steps
            kept = self.kept_fraction()
            met = self._targets_met()
            if s.learn_rates:
                self.schedule.observe(epoch, met)
            record = {
                "epoch": epoch,
                "gamma": self._gamma,
                "kept_fraction": kept,
                "target_fraction": self.target_fraction,
                "adv_loss": float(self._task_sum) / self._batches if self._batches else float("nan"),
                "hw_loss": float(self._hw_sum) / self._batches if self._batches else float("nan"),
                "target_met": met,
                "steps": self._epoch_steps,
            }
            self.history.append(record)
            _logger.info(
                "%s epoch %d: gamma=%.4g kept=%.4f (target %.4f%s) task_loss=%.4f hw_loss=%.4g steps=%d",
                type(self).__name__, epoch, record["gamma"], kept, self.target_fraction,
                ", met" if met else "", record["adv_loss"], record["hw_loss"], self._epoch_steps,
            )

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """HARP's state after the epochs run so far, as plain tensors, numbers, lists and dicts (so it
        can be saved with :func:`torch.save` and read back with ``weights_only=True``).

        Holds ``epoch`` (epochs completed), ``total_epochs`` (of the running ``compress``; ``None``
        before it), the settings, the gamma ``schedule`` (gamma and stage of every later epoch follow
        from it), the ``history``, per unit its ``scores``, ``rate`` and ``hard`` mask, and HARP's
        ``optimizer`` state (``None`` before ``compress``). Call it before ``compress`` or between
        epochs, not halfway through one and not after ``compress`` finished.
        """
        if self._final_counts is not None:
            raise PruningError(f"this {type(self).__name__} has finished pruning; its scores and rates are gone")
        if self._compressing and self._epoch_steps:
            raise PruningError(
                f"state_dict() called after {self._epoch_steps} step(s) of epoch {len(self.history)}; "
                "call it between epochs (e.g. at the start of the evaluator's training function)"
            )
        return {
            "version": STATE_VERSION,
            "pruner": type(self).__name__,
            "settings": {f.name: _plain_setting(getattr(self.settings, f.name)) for f in fields(self.settings)},
            "epoch": len(self.history),
            "total_epochs": self._total_epochs,
            "schedule": self.schedule.state_dict(),
            "history": [dict(h) for h in self.history],
            "units": [
                {"name": u.name, "scores": u.scores.detach().cpu().clone(), "rate": u.rate.detach().cpu().clone(),
                 "hard": u.hard.detach().cpu().clone()}
                for u in self._units
            ],
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a pruner built the same way (same model, config_list,
        settings). Call it before ``compress``; then ``compress`` runs the remaining epochs of the
        stored run, with the stored momentum, gamma schedule and learning-rate schedule."""
        if self._final_counts is not None or self._compressing or self.history:
            raise PruningError("load_state_dict() must be called on a fresh pruner, before compress()")
        if state.get("version") != STATE_VERSION:
            raise PruningError(f"pruner state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        saved = dict(state.get("settings", {}))
        for f in fields(self.settings):
            mine = _plain_setting(getattr(self.settings, f.name))
            if f.name not in saved or saved[f.name] != mine:
                raise PruningError(
                    f"the stored pruning run used HARPSettings.{f.name}={saved.get(f.name, '<missing>')!r}, "
                    f"this pruner has {mine!r}; resume with the same settings"
                )
        units = list(state.get("units", []))
        if len(units) != len(self._units):
            raise PruningError(f"the stored run has {len(units)} pruning units, this pruner has {len(self._units)}")
        for unit, stored in zip(self._units, units):
            if stored["name"] != unit.name or tuple(stored["scores"].shape) != tuple(unit.scores.shape):
                raise PruningError(
                    f"stored unit {stored['name']!r} with {tuple(stored['scores'].shape)} scores does not match "
                    f"unit {unit.name!r} with {tuple(unit.scores.shape)}: was the state saved for another model "
                    "or config_list?"
                )
        history = [dict(h) for h in state.get("history", [])]
        if int(state.get("epoch", -1)) != len(history):
            raise PruningError(f"pruner state is inconsistent: epoch={state.get('epoch')!r} with {len(history)} history records")
        self.schedule.load_state_dict(state["schedule"])
        for unit, stored in zip(self._units, units):
            unit.scores.copy_(stored["scores"])
            unit.rate.copy_(stored["rate"])
            unit.hard.copy_(stored["hard"])
        self.history = history
        total = state.get("total_epochs")
        self._total_epochs = None if total is None else int(total)
        self._pending_optimizer_state = state.get("optimizer")
        _logger.info("%s resumes after %d pruning epoch(s)", type(self).__name__, len(history))

    # ------------------------------------------------------------------ finishing
    @torch.no_grad()
    def _finalize(self) -> None:
        """Project the learned rates onto the budget, fix the hard masks, hand them to NNI's wrappers
        and remove HARP's tensors from the model."""
        keep = {i: unit.keep_value() for i, unit in enumerate(self._units)}
        floors = {i: unit.floor for i, unit in enumerate(self._units)}
        ceilings = {i: unit.ceiling for i, unit in enumerate(self._units)}
        sizes = {i: unit.size for i, unit in enumerate(self._units)}
        lows = {i: unit.min_count for i, unit in enumerate(self._units)}
        highs = {i: unit.max_count for i, unit in enumerate(self._units)}
        step = self.settings.round_to if self.structured else 1
        multiples = {i: step if size >= 4 * step else 1 for i, size in sizes.items()}
        counts: dict[int, int] = {}
        for budget in self._budgets:
            members = budget.units
            projected = project_keep(budget, {u: keep[u] for u in members}, floors, ceilings)
            counts.update(round_to_counts(budget, projected, sizes, lows, highs, multiples))
        for i, unit in enumerate(self._units):
            unit.refresh(counts[i])
        self._write_masks()
        self._final_counts = counts
        for module in {*self._factors, *self._unit_of_module}:
            wrapper = self._module_wrappers[module]
            clear_masker(wrapper)
            for space in wrapper.pruning_target_spaces.values():
                if space.apply_method == APPLY_METHOD:
                    space.apply_method = "mul"
        for unit in self._units:
            unit.detach()
        kept = self.kept_fraction()
        _logger.info("%s done: kept %s fraction %.4f (target %.4f)", type(self).__name__, self.budget_kind, kept, self.target_fraction)
        if abs(kept - self.target_fraction) > 0.01:
            _logger.warning(
                "kept %s fraction %.4f is %.2f pp off the target %.4f: the units are too coarse (or floors/ceilings "
                "too tight) to get closer", self.budget_kind, kept, 100 * abs(kept - self.target_fraction), self.target_fraction,
            )
        for name, rate in self.layer_rates().items():
            _logger.debug("  %s keeps %.4f", name, rate)

    def _write_masks(self) -> None:
        """Store the final hard masks in NNI's target spaces. Structured: every member of a group gets
        the group's channel mask (the same product rule as ``graph_passes.group_masks``)."""
        if not self.structured:
            for module, i in self._unit_of_module.items():
                space = self._module_wrappers[module].pruning_target_spaces["weight"]
                space.mask = self._units[i].hard.view_as(space.mask).to(space.mask.dtype)
            return
        channel_masks = {i: unit.hard for i, unit in enumerate(self._units)}
        for module, targets in self._factors.items():
            wrapper = self._module_wrappers.get(module)
            if wrapper is None:
                raise StructureError(f"channel-group member {module!r} is not wrapped by NNI; cannot store its mask")
            for target_name, factors in targets.items():
                space = wrapper.pruning_target_spaces.get(target_name)
                if space is None or space.mask is None:
                    continue
                mask = factor_mask(factors, channel_masks, space.mask)
                space.mask = (torch.ones_like(space.mask) * mask).to(space.mask.dtype)


def _plain_setting(value: Any) -> Any:
    """A settings value as stored in a state dict (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


class HydraPruner(HARPPruner):
    """HYDRA (Sehwag et al., 2020): HARP's scores and straight-through top-k masks, but every
    layer's (or group's) rate is fixed at the target, so only the scores are learned. Takes the
    same arguments as :class:`HARPPruner`; ``learn_rates`` is always ``False``."""

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator,
        settings: HARPSettings | None = None,
        dummy_input: Any | None = None,
        **settings_kwargs: Any,
    ) -> None:
        if settings_kwargs.get("learn_rates", False) is not False:
            raise SettingsError("learn_rates", settings_kwargs["learn_rates"], "False for HydraPruner (HARPPruner learns rates)")
        settings_kwargs["learn_rates"] = False
        super().__init__(model, config_list, evaluator, settings, dummy_input, **settings_kwargs)
