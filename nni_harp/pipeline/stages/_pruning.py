"""The parts of the ``prune`` stage that do not drive the pruner: its NNI config list and the
uniform kept fraction of its budget, statistics of the masks it returns, spreading NNI's per-layer
masks over channel groups, the check of a prune checkpoint, and the checks between ranks."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from ... import distributed as hd
from ..checkpoint import ResumeError, StageCheckpoint
from ..context import Context

__all__ = [
    "PRUNE_FORMAT", "Masks", "pruner_config_list", "uniform_target", "masks_sparsity", "mask_rates",
    "group_consistent", "check_prune_checkpoint", "report_epoch", "plain_history", "rank_differences",
]

logger = logging.getLogger(__name__)

Masks = dict[str, dict[str, torch.Tensor]]

#: Layout of the prune stage's checkpoint (``prune_format`` in ``prune.pt``). 2: ``pruner`` holds the
#: learned pruner's full :meth:`~nni_harp.pruning.HARPPruner.state_dict`. 1 (no field): only its
#: history and the epoch gamma froze at, from which a run cannot be continued exactly.
PRUNE_FORMAT = 2


def pruner_config_list(pruner: str, mode: str, sparsity: float, flops_target: float, uniform: float) -> list[dict[str, Any]]:
    """NNI config_list of ``pruner`` (see :func:`nni_harp.registry.config_list`): Conv2d/Linear.

    Unstructured: ``sparsity`` of the weights removed. Structured, HARP/HYDRA: one global budget
    on FLOPs (their cost model; or the predicted latency with a latency budget, whose target is
    then passed as ``flops_target``), written as the sparse ratio ``1 - flops_target``.
    Structured, NNI's pruners: every layer loses the channel fraction ``1 - uniform`` that
    removes ``1 - flops_target`` of the FLOPs (or of the latency) when applied to every group.
    """
    from ...registry import config_list, get_pruner

    if mode == "unstructured":
        return config_list(pruner, mode, sparsity)
    ratio = 1.0 - flops_target if get_pruner(pruner).global_budget else 1.0 - uniform
    return config_list(pruner, mode, min(max(ratio, 1e-6), 1.0 - 1e-6))


def uniform_target(model: nn.Module, example: torch.Tensor, mode: str, target_keep: float, latency: Any = None) -> float:
    """The kept fraction every layer would have under uniform pruning at the same budget.

    Unstructured: the parameter budget itself. Structured: the channel fraction ``k`` (the same
    for every prunable group) whose FLOPs equal ``target_keep`` of the dense FLOPs on the cost
    model (``budget.uniform_keep``); ``sqrt(target_keep)`` when the graph cannot be analysed. With
    a ``latency`` model (a latency budget): the ``k`` whose predicted latency is ``target_keep`` of
    the dense latency (errors pass through: that graph was analysed to fit the model).
    """
    if mode == "unstructured":
        return target_keep
    try:
        from ...pruning._plan import channel_structure
        from ...pruning.budget import uniform_keep

        groups, cost = channel_structure(model, (example,))
        return uniform_keep(cost, [g.id for g in groups if g.prunable], target_keep, latency)
    except Exception as exc:  # noqa: BLE001 - only the plot's reference line depends on it
        if latency is not None:
            raise  # the latency model was fitted on this very graph: a failure here is not a graph that cannot be traced
        logger.info("uniform target from the cost model failed (%s); using sqrt(target)", exc)
        return float(target_keep) ** 0.5


def masks_sparsity(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> float:
    """Fraction of all Conv/Linear weight entries that ``masks`` set to zero."""
    total = removed = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            total += module.weight.numel()
            mask = masks.get(name, {}).get("weight")
            if mask is not None:
                removed += int((mask == 0).sum())
    return removed / max(total, 1)


def mask_rates(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]], structured: bool) -> dict[str, float]:
    """Kept fraction per masked layer, for pruners that learn no rates: of the weights
    (unstructured) or of the output channels (structured)."""
    rates: dict[str, float] = {}
    for name, _ in model.named_modules():
        mask = masks.get(name, {}).get("weight")
        if mask is None or mask.dim() < 2:
            continue
        if structured:
            rates[name] = float((mask.reshape(mask.shape[0], -1) != 0).any(dim=1).float().mean())
        else:
            rates[name] = float((mask != 0).float().mean())
    return rates


def group_consistent(model: nn.Module, example: torch.Tensor, masks: Masks) -> Masks:
    """NNI's per-layer output-channel masks (coupled layers agree: the registry gives NNI's pruners
    dependency groups) read as ``graph_passes.ModelSpeedup`` reads them
    (``graph_passes.keep_from_masks``), then spread over every member of each prunable group
    (producers, consumers, norms): the masked model computes what the pruned one will."""
    import graph_passes

    groups = graph_passes.channel_groups(model, (example,))
    keep = graph_passes.keep_from_masks(groups, masks)
    return graph_passes.group_masks(model, groups, {g.id: keep[g.id] for g in groups if g.prunable})


def check_prune_checkpoint(ck: StageCheckpoint, path: Any, epochs: int) -> Mapping[str, Any]:
    """The pruner state of a prune checkpoint, or a :class:`ResumeError` saying why the run cannot be
    continued from it (written by an older nni-harp, or for another number of epochs)."""
    state = ck.state.get("pruner")
    if ck.state.get("prune_format") != PRUNE_FORMAT or not isinstance(state, Mapping) or "units" not in state:
        raise ResumeError(
            f"cannot resume pruning from {path}: it was written by an older nni-harp that did not save the "
            "pruner's full state (scores, rates, optimizer momentum, gamma schedule), so the run cannot be "
            "continued exactly. Start this run again with --overwrite (or choose another --output-dir)"
        )
    if int(state.get("epoch", -1)) != ck.epoch + 1:
        raise ResumeError(
            f"{path} is inconsistent: checkpoint of prune epoch {ck.epoch + 1} holds a pruner state after "
            f"{state.get('epoch')!r} epoch(s); start this run again with --overwrite"
        )
    total = state.get("total_epochs")
    if total is not None and int(total) != epochs:
        raise ResumeError(f"{path} belongs to a run of {total} prune epochs, not {epochs}; use the same --prune-epochs")
    return state


def report_epoch(pruner: Any, epochs: int, cb: Any) -> None:
    """One line per pruning epoch with what the pruner decided (gamma, kept fraction)."""
    if not pruner.history:
        return
    h = pruner.history[-1]
    met = ", target met" if h.get("target_met") else ""
    cb.on_message(
        f"prune epoch {int(h.get('epoch', 0)) + 1}/{epochs}: gamma {float(h.get('gamma', float('nan'))):.4g}, "
        f"kept {float(h.get('kept_fraction', float('nan'))):.4f} (target {float(h.get('target_fraction', float('nan'))):.4f}{met})"
    )


def plain_history(pruner: Any) -> list[dict[str, Any]]:
    """The pruner's per-epoch history (none for pruners without one), tensors as numbers."""
    return [{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in h.items()}
            for h in getattr(pruner, "history", [])]


def rank_differences(ctx: Context, masks: Masks, rates: Mapping[str, float]) -> None:
    """Largest difference of masks and rates between this rank and rank 0 (0.0 in one process)."""
    if ctx.world <= 1:
        return
    flat = {f"{m}.{t}": v for m, d in masks.items() for t, v in d.items()}
    ctx.checks["ranks_masks_max_abs_diff"] = hd.max_difference(flat)
    ctx.checks["ranks_rates_max_abs_diff"] = hd.max_difference({k: torch.tensor(float(v)) for k, v in rates.items()})
