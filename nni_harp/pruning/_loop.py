"""The pruning run of :class:`~nni_harp.pruning.HARPPruner`: its epochs and its end.

- :func:`run_epochs`: per epoch, set gamma (the stagewise schedule) and the learning rates, let the
  evaluator train one epoch (or ``steps_per_epoch`` steps), observe whether the target is met
  (forcing it at ``HARPSettings.descent_deadline`` and at every later epoch end above it:
  :func:`force_target`; before that, holding the kept fraction to ``descent_glide``'s path:
  :func:`hold_to_glide_path`), and append the epoch's
  record (with its phase) to ``pruner.history``;
- :func:`finalize`: project the learned rates onto the budgets, fix the hard masks, hand them to
  NNI's wrappers and remove HARP's tensors from the model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ._apply import APPLY_METHOD, clear_masker
from ._optim import HarpOptimizer
from .budget import Budget, final_counts, project_budgets
from .errors import SettingsError, StructureError
from .schedule import epoch_phase

if TYPE_CHECKING:
    from .harp import HARPPruner
    from .settings import HARPSettings

__all__ = ["run_length", "run_epochs", "glide_slack", "hold_to_glide_path", "force_target", "fix_final_masks",
           "finalize"]

_logger = logging.getLogger("nni_harp.pruning.harp")  # one logger for the pruner's whole run


def run_length(settings: HARPSettings, max_steps: int | None, max_epochs: int | None) -> int:
    """Pruning epochs of a ``compress(max_steps, max_epochs)`` call (``max_steps`` alone counts
    epochs of ``settings.steps_per_epoch`` steps)."""
    if max_epochs is not None:
        return max_epochs
    if settings.steps_per_epoch is None:
        raise SettingsError("steps_per_epoch", None, "an int >= 1 when compress() is driven by max_steps alone")
    return math.ceil(max_steps / settings.steps_per_epoch)  # type: ignore[operator]


def run_epochs(pruner: HARPPruner, optimizer: HarpOptimizer, epochs: int, max_steps: int | None, by_epoch: bool) -> None:
    """Epochs ``len(pruner.history)`` (> 0 when resumed) to ``epochs``, or until ``max_steps``."""
    s = pruner.settings
    steps_left = None if max_steps is None else max_steps - sum(int(h["steps"]) for h in pruner.history)
    deadline, settle = s.deadline_epoch(epochs, pruner.structured), s.settle_epoch(epochs)
    glide_end = s.glide_end(epochs, pruner.structured)
    for epoch in range(len(pruner.history), epochs):
        if steps_left is not None and steps_left <= 0:
            break
        pruner._gamma = pruner.schedule.gamma_for(epoch) if s.learn_rates else 0.0
        optimizer.set_epoch(epoch, epochs)
        pruner._reset_epoch_stats()
        kept_start = pruner.kept_fraction()
        settling = settle is not None and epoch >= settle
        if settling and not optimizer.masks_fixed:  # fixed at the end of epoch settle - 1; again after a resume
            fix_final_masks(pruner, optimizer)
        if by_epoch:
            pruner.evaluator.train(max_steps=steps_left, max_epochs=1)
        else:
            pruner.evaluator.train(max_steps=min(s.steps_per_epoch, steps_left), max_epochs=None)  # type: ignore[type-var]
        if steps_left is not None:
            steps_left -= pruner._epoch_steps
        met = pruner._targets_met()
        # past the deadline the target is held: an epoch that ends above it (the rates drift back up
        # when gamma froze at a value the rates had not met by themselves) is projected again
        forced = s.learn_rates and not settling and not met and deadline is not None and epoch >= deadline
        if forced:
            force_target(pruner)
            met = True
        held = False
        if not met and not settling and glide_end is not None and 0 < epoch < glide_end:
            held = hold_to_glide_path(pruner, glide_slack(pruner.history, pruner.target_fraction, epoch, glide_end))
        if settle is not None and epoch == settle - 1:  # the last epochs train on the final masks
            forced = fix_final_masks(pruner, optimizer) or forced
            met = met or s.learn_rates
        kept = pruner.kept_fraction()
        if s.learn_rates:
            pruner.schedule.observe(epoch, met)
        batches = pruner._batches
        record = {
            "epoch": epoch,
            "gamma": pruner._gamma,
            "kept_start": kept_start,
            "kept_fraction": kept,
            "target_fraction": pruner.target_fraction,
            "adv_loss": float(pruner._task_sum) / batches if batches else float("nan"),
            "hw_loss": float(pruner._hw_sum) / batches if batches else float("nan"),
            "target_met": met,
            "forced": forced,
            "held": held,
            "settled": settling,
            # HYDRA's rates are fixed: it has no schedule, so no phases
            "phase": epoch_phase(pruner.schedule, epoch, kept_start, kept) if s.learn_rates else None,
            "steps": pruner._epoch_steps,
        }
        pruner.history.append(record)
        _logger.info(
            "%s epoch %d (%s): gamma=%.4g kept=%.4f -> %.4f (target %.4f%s) task_loss=%.4f hw_loss=%.4g steps=%d",
            type(pruner).__name__, epoch, record["phase"], record["gamma"], kept_start, kept, pruner.target_fraction,
            ", forced" if forced else ", met" if met else ", held to the glide path" if held else "",
            record["adv_loss"], record["hw_loss"], pruner._epoch_steps,
        )


def glide_slack(history: Sequence[Mapping[str, Any]], target: float, epoch: int, end: int) -> float:
    """The glide path (``HARPSettings.descent_glide``) at the end of ``epoch`` (``0 < epoch < end``),
    as the largest allowed ratio of kept fraction to target: ``r0 ** ((end - epoch) / end)``, where
    ``r0`` is that ratio at the end of epoch 0 (``history[0]``), falling geometrically to 1 at ``end``."""
    r0 = max(float(history[0]["kept_fraction"]) / target, 1.0)
    return r0 ** ((end - epoch) / end)


@torch.no_grad()
def hold_to_glide_path(pruner: HARPPruner, slack: float) -> bool:
    """Project every budget whose rates keep more than ``slack`` times its target onto that much
    (:func:`force_target`); returns whether any was."""
    keep = {i: unit.keep_value() for i, unit in enumerate(pruner._units)}
    above = [b for b in pruner._budgets if float(b.kept({u: keep[u] for u in b.units})) > b.target * slack * (1 + 1e-6)]
    if above:
        force_target(pruner, [replace(b, target=b.target * slack) for b in above], "held to the glide path")
    return bool(above)


@torch.no_grad()
def force_target(pruner: HARPPruner, budgets: Sequence[Budget] | None = None, why: str = "target not met by the "
                 "descent deadline") -> None:
    """Project the rates onto ``budgets`` (default: the pruner's; one factor per budget, the units'
    ratios kept) and refresh the hard masks: the descent deadline's (and the glide path's) move."""
    units = pruner._units
    keep = project_budgets(pruner._budgets if budgets is None else budgets,
                           {i: u.keep_value() for i, u in enumerate(units)},
                           {i: u.floor for i, u in enumerate(units)}, {i: u.ceiling for i, u in enumerate(units)})
    for i, unit in enumerate(units):
        unit.set_keep(keep[i])
        unit.refresh()
    _logger.info("%s: %s; rates projected onto the budget (kept %.4f)", type(pruner).__name__, why,
                 pruner.kept_fraction())


def _final_counts(pruner: HARPPruner, budgets: Sequence[Budget]) -> dict[int, int]:
    """The units' final counts: the rates projected onto every one of ``budgets``, rounded."""
    units = dict(enumerate(pruner._units))
    return final_counts(
        budgets, {i: u.keep_value() for i, u in units.items()}, {i: u.floor for i, u in units.items()},
        {i: u.ceiling for i, u in units.items()}, {i: u.size for i, u in units.items()},
        {i: u.min_count for i, u in units.items()}, {i: u.max_count for i, u in units.items()},
        {i: u.multiple for i, u in units.items()},
    )


def _apply_final_counts(pruner: HARPPruner) -> dict[int, int]:
    """Set every unit's hard mask to its final count (the rates projected onto every budget,
    rounded; a latency budget's plan measured and counted again under the refitted model the first
    time, :class:`~nni_harp.pruning._latency.FinalPlanCheck`); returns the counts."""
    units = dict(enumerate(pruner._units))
    check = pruner._latency_check
    counts = dict(check.counts) if check is not None and check.done else _final_counts(pruner, pruner._budgets)
    if check is not None and not check.done:
        overall, counts = check.run(pruner._overall, counts, {i: u.size for i, u in units.items()},
                                    lambda budget: _final_counts(pruner, pruner._budgets_with(budget)))
        pruner._set_overall(overall)
        for record in check.records:
            _logger.info("%s: final plan measured on %s: latency x%.3f of dense (x%.3f predicted)",
                         type(pruner).__name__, overall.latency.backend, record["measured"], record["predicted"])
    for i, unit in units.items():
        unit.refresh(counts[i])
    return counts


@torch.no_grad()
def fix_final_masks(pruner: HARPPruner, optimizer: HarpOptimizer) -> bool:
    """Start settling (``HARPSettings.settle_epochs``): project rates still above the target onto
    it, apply the final counts and stop stepping scores and rates. Returns whether it projected."""
    forced = pruner.settings.learn_rates and not pruner._targets_met()
    if forced:
        force_target(pruner)
    _apply_final_counts(pruner)
    optimizer.masks_fixed = True
    _logger.info("%s: final masks fixed for the last %d epoch(s) (kept %.4f)", type(pruner).__name__,
                 pruner.settings.settle_epochs, pruner.kept_fraction())
    return forced


@torch.no_grad()
def finalize(pruner: HARPPruner) -> None:
    """Fix the final masks (see the module docstring)."""
    counts = _apply_final_counts(pruner)
    _write_masks(pruner)
    pruner._masking.clear()
    pruner._final_counts = counts
    for module in pruner._masking.targets():
        wrapper = pruner._module_wrappers[module]
        clear_masker(wrapper)
        for space in wrapper.pruning_target_spaces.values():
            if space.apply_method == APPLY_METHOD:
                space.apply_method = "mul"
    for unit in pruner._units:
        unit.detach()
    kept, target, kind = pruner.kept_fraction(), pruner.target_fraction, pruner.budget_kind
    _logger.info("%s done: kept %s fraction %.4f (target %.4f)", type(pruner).__name__, kind, kept, target)
    if pruner.settings.learn_rates and pruner.history and pruner.schedule.frozen_at is None:
        last = pruner.history[-1]
        _logger.warning(
            "%s: the rates did not reach the target within %d pruning epoch(s) (kept %s fraction %.4f at the end, "
            "target %.4f), so gamma never froze and the final masks were scaled down onto the budget; for HARP's "
            "balance phase run more epochs or raise gamma_0 (now %g)", type(pruner).__name__, len(pruner.history),
            kind, float(last["kept_fraction"]), target, pruner.settings.gamma_0,
        )
    # a latency plan measured within the limit is kept as measured, wherever under the target it lies
    check = pruner._latency_check
    if abs(kept - target) > 0.01 and not (check is not None and check.kept_as_measured):
        _logger.warning(
            "kept %s fraction %.4f is %.2f pp off the target %.4f: the units are too coarse (or floors/ceilings "
            "too tight) to get closer", kind, kept, 100 * abs(kept - target), target,
        )
    for name, rate in pruner.layer_rates().items():
        _logger.debug("  %s keeps %.4f", name, rate)


def _write_masks(pruner: HARPPruner) -> None:
    """Store the final hard masks in NNI's target spaces."""
    for module, targets in pruner._masking.targets().items():
        wrapper = pruner._module_wrappers.get(module)
        if wrapper is None:
            raise StructureError(f"masked module {module!r} is not wrapped by NNI; cannot store its mask")
        for target_name in targets:
            space = wrapper.pruning_target_spaces.get(target_name)
            if space is None or space.mask is None:
                continue
            mask = pruner._masking.final_mask(module, target_name, space.mask)
            if mask is not None:
                space.mask = (torch.ones_like(space.mask) * mask).to(space.mask.dtype)
