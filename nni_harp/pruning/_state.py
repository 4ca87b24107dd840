"""The round trip of a HARP pruning run between epochs: :meth:`HARPPruner.state_dict` and
:meth:`HARPPruner.load_state_dict` are these two functions.

The state is plain tensors, numbers, lists and dicts, so it can be saved with :func:`torch.save`
and read back with ``weights_only=True``.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import PruningError

if TYPE_CHECKING:
    from .harp import HARPPruner

__all__ = ["STATE_VERSION", "pruner_state", "restore_pruner"]

#: Version of the dictionary :meth:`HARPPruner.state_dict` returns. 2: ``optimizer`` holds the
#: score and rate optimizers (``{'scores': ..., 'rates': ...}``) and history records their phase.
STATE_VERSION = 2

_logger = logging.getLogger(__name__)


def _plain_setting(value: Any) -> Any:
    """A settings value as stored in a state dict (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def pruner_state(pruner: HARPPruner) -> dict[str, Any]:
    """See :meth:`HARPPruner.state_dict`."""
    name = type(pruner).__name__
    if pruner._final_counts is not None:
        raise PruningError(f"this {name} has finished pruning; its scores and rates are gone")
    if pruner._compressing and pruner._epoch_steps:
        raise PruningError(
            f"state_dict() called after {pruner._epoch_steps} step(s) of epoch {len(pruner.history)}; "
            "call it between epochs (e.g. at the start of the evaluator's training function)"
        )
    return {
        "version": STATE_VERSION,
        "pruner": name,
        "settings": {f.name: _plain_setting(getattr(pruner.settings, f.name)) for f in fields(pruner.settings)},
        "epoch": len(pruner.history),
        "total_epochs": pruner._total_epochs,
        "schedule": pruner.schedule.state_dict(),
        "history": [dict(h) for h in pruner.history],
        "units": [
            {"name": u.name, "scores": u.scores.detach().cpu().clone(), "rate": u.rate.detach().cpu().clone(),
             "hard": u.hard.detach().cpu().clone()}
            for u in pruner._units
        ],
        "optimizer": None if pruner._optimizer is None else pruner._optimizer.state_dict(),
        # a latency budget's measured final plan (once the masks are fixed): resumed, it is not measured again
        "latency_check": None if pruner._latency_check is None else pruner._latency_check.state_dict(pruner._overall),
    }


@torch.no_grad()
def restore_pruner(pruner: HARPPruner, state: Mapping[str, Any]) -> None:
    """See :meth:`HARPPruner.load_state_dict`."""
    if pruner._final_counts is not None or pruner._compressing or pruner.history:
        raise PruningError("load_state_dict() must be called on a fresh pruner, before compress()")
    if state.get("version") != STATE_VERSION:
        raise PruningError(
            f"pruner state version {state.get('version')!r} is not supported (expected {STATE_VERSION}); it was "
            "written by another nni-harp release: start the pruning run again"
        )
    saved = dict(state.get("settings", {}))
    for f in fields(pruner.settings):
        mine = _plain_setting(getattr(pruner.settings, f.name))
        if f.name not in saved and mine == _plain_setting(f.default):
            continue  # a setting added after the state was written, left at its default here: the run takes it
        if f.name not in saved or saved[f.name] != mine:
            raise PruningError(
                f"the stored pruning run used HARPSettings.{f.name}={saved.get(f.name, '<missing>')!r}, "
                f"this pruner has {mine!r}; resume with the same settings"
            )
    units = list(state.get("units", []))
    if len(units) != len(pruner._units):
        raise PruningError(f"the stored run has {len(units)} pruning units, this pruner has {len(pruner._units)}")
    for unit, stored in zip(pruner._units, units):
        if stored["name"] != unit.name or tuple(stored["scores"].shape) != tuple(unit.scores.shape):
            raise PruningError(
                f"stored unit {stored['name']!r} with {tuple(stored['scores'].shape)} scores does not match "
                f"unit {unit.name!r} with {tuple(unit.scores.shape)}: was the state saved for another model "
                "or config_list?"
            )
    history = [dict(h) for h in state.get("history", [])]
    if int(state.get("epoch", -1)) != len(history):
        raise PruningError(f"pruner state is inconsistent: epoch={state.get('epoch')!r} with {len(history)} history records")
    pruner.schedule.load_state_dict(state["schedule"])
    for unit, stored in zip(pruner._units, units):
        unit.scores.copy_(stored["scores"])
        unit.rate.copy_(stored["rate"])
        unit.hard.copy_(stored["hard"])
    pruner.history = history
    total = state.get("total_epochs")
    pruner._total_epochs = None if total is None else int(total)
    pruner._pending_optimizer_state = state.get("optimizer")
    check, stored_check = pruner._latency_check, state.get("latency_check")
    if check is not None and stored_check is not None:
        pruner._set_overall(check.load_state_dict(stored_check, pruner._overall))
    _logger.info("%s resumes after %d pruning epoch(s)", type(pruner).__name__, len(history))
