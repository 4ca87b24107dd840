"""The ``prune`` stage: HARPPruner driven by an NNI ``TorchEvaluator`` whose training loop
checkpoints every epoch (model incl. scores and rates, optimizers, schedulers, pruner state).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import torch
from torch import nn

from .._io import atomic_save, safe_load
from ..loading import load_weights
from .checkpoint import restore_rng
from .stages import Context, _training_step, cosine, finish_stage, reuse_stage, sgd

__all__ = ["stage_prune", "config_list_for", "uniform_target"]

logger = logging.getLogger(__name__)

Masks = dict[str, dict[str, torch.Tensor]]


def config_list_for(mode: str, sparsity: float, flops_target: float) -> list[dict[str, Any]]:
    """NNI config_list: every Conv2d/Linear in one global budget.

    Unstructured: ``sparsity`` of the parameters removed, per weight. Structured: the budget is
    on FLOPs (the pruner's cost model), expressed as the sparse ratio ``1 - flops_target``,
    per output channel.
    """
    if mode == "unstructured":
        return [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": sparsity, "global_group_id": 0}]
    return [{
        "op_types": ["Conv2d", "Linear"], "sparse_ratio": 1.0 - flops_target, "global_group_id": 0,
        "granularity": "out_channel",
    }]


def uniform_target(model: nn.Module, example: torch.Tensor, mode: str, target_keep: float) -> float:
    """The kept fraction every layer would have under uniform pruning at the same budget.

    Unstructured: the parameter budget itself. Structured: the channel fraction ``k`` (the same
    for every prunable group) whose FLOPs equal ``target_keep`` of the dense FLOPs, found by
    bisection on the cost model; ``sqrt(target_keep)`` when the graph cannot be analysed.
    """
    if mode == "unstructured":
        return target_keep
    try:
        import graph_passes

        groups = graph_passes.channel_groups(model, (example,))
        cost = graph_passes.cost(model, (example,), groups)
        ids = [g.id for g in groups if g.prunable]
        total = float(cost.total_flops)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if float(cost.flops({i: mid for i in ids})) / total < target_keep:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2
    except Exception as exc:  # noqa: BLE001 - only the plot's reference line depends on it
        logger.info("uniform target from the cost model failed (%s); using sqrt(target)", exc)
        return float(target_keep) ** 0.5


def _pruner_state(pruner: Any) -> dict[str, Any]:
    """What HARPPruner keeps outside the model: its per-epoch history and the gamma schedule.

    Scores, rates and hard masks are tensors on NNI's module wrappers and travel in the model's
    state dict. The schedule is stored as the epoch at which gamma froze (None: still growing);
    replaying ``observe(frozen_at, True)`` on a fresh schedule restores it exactly.
    """
    schedule = getattr(pruner, "schedule", None)
    return {
        "history": [dict(h) for h in getattr(pruner, "history", [])],
        "gamma_frozen_at": getattr(schedule, "frozen_at", None),
    }


def _restore_schedule(pruner: Any, state: Mapping[str, Any]) -> None:
    frozen_at = state.get("gamma_frozen_at")
    schedule = getattr(pruner, "schedule", None)
    if frozen_at is not None and schedule is not None and not schedule.frozen:
        schedule.observe(int(frozen_at), True)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _report_epoch(pruner: Any, epochs: int, cb: Any) -> None:
    """One line per pruning epoch with what the pruner decided (gamma, kept fraction)."""
    if not pruner.history:
        return
    h = pruner.history[-1]
    met = ", target met" if h.get("target_met") else ""
    cb.on_message(
        f"prune epoch {int(h.get('epoch', 0)) + 1}/{epochs}: gamma {float(h.get('gamma', float('nan'))):.4g}, "
        f"kept {float(h.get('kept_fraction', float('nan'))):.4f} (target {float(h.get('target_fraction', float('nan'))):.4f}{met})"
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def stage_prune(ctx: Context, model: nn.Module) -> tuple[nn.Module, Masks, dict[str, Any]]:
    """Learn masks with HARP; returns the unwrapped model, NNI-format masks and the stage result
    (``layer_rates``, ``history``, ``uniform``). Reuses the saved result when already finished."""
    cfg, store, cb = ctx.config, ctx.store, ctx.cb
    init_path, masks_path = store.artefact("pruned_init.pt"), store.artefact("masks.pt")
    if store.is_done("prune"):
        load_weights(model, safe_load(init_path, map_location=ctx.device), str(init_path))
        masks = safe_load(masks_path, map_location=ctx.device)
        return model, masks, reuse_stage(ctx, "prune", "its masks")

    from nni.compression import TorchEvaluator

    from ..pruning import HARPPruner, HARPSettings

    start_time = time.perf_counter()
    uniform = uniform_target(model, ctx.example.to(ctx.device), cfg.mode, cfg.target_keep)
    ck = store.load_epoch("prune")
    loop = ctx.loop("prune")
    holder: dict[str, Any] = {}
    saved = {"epoch": ck.epoch if ck is not None else -1}

    def training_func(
        model: nn.Module, optimizers: Any, training_step: Any, lr_schedulers: Any = None,
        max_steps: int | None = None, max_epochs: int | None = None, *args: Any, **kwargs: Any,
    ) -> None:
        # HARPPruner calls this once per epoch (max_epochs=1) and does its own end-of-epoch
        # bookkeeping (history, gamma schedule) after it returns. So the checkpoint of epoch e is
        # written when epoch e + 1 starts (or, for the last epoch, once compress() returned and
        # the stage is marked finished), when the pruner's state for epoch e is complete.
        pruner = holder["pruner"]
        opts, scheds = _as_list(optimizers), _as_list(lr_schedulers)
        epoch = len(pruner.history)

        def state() -> dict[str, Any]:
            return {
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in opts],
                "schedulers": [s.state_dict() for s in scheds],
                "pruner": _pruner_state(pruner),
                "metrics": holder.get("metrics", {}),
            }

        if ck is not None and epoch <= ck.epoch:
            # resuming: the finished epochs are replayed without training. Load everything at the
            # first of them, so the pruner's bookkeeping of the replayed epochs sees the learned
            # rates (and reaches the same gamma decisions as the interrupted run did).
            if epoch == 0:
                model.load_state_dict(ck.state["model"])
                for opt, opt_state in zip(opts, ck.state["optimizers"]):
                    opt.load_state_dict(opt_state)
                for sched, sched_state in zip(scheds, ck.state["schedulers"]):
                    sched.load_state_dict(sched_state)
                _restore_schedule(pruner, ck.state["pruner"])
                cb.on_message(f"prune: resuming after epoch {ck.epoch + 1}/{cfg.prune_epochs}")
            return
        if ck is not None and epoch == ck.epoch + 1:
            pruner.history[:] = [dict(h) for h in ck.state["pruner"]["history"]]
            restore_rng(ck.state["rng"])
        elif epoch > 0 and epoch - 1 > saved["epoch"]:
            _report_epoch(pruner, cfg.prune_epochs, cb)
            store.save_epoch("prune", epoch - 1, state())
            saved["epoch"] = epoch - 1

        def epoch_end(done: int, metrics: dict[str, float]) -> None:
            holder["metrics"] = dict(metrics)

        loop.run(model, opts, scheds, training_step, cfg.prune_epochs, epoch, None, max_steps=max_steps,
                 on_epoch_end=epoch_end, stop_epoch=epoch + 1, announce=not holder.get("announced"))
        holder["announced"] = True

    device = ctx.device
    optimizer = sgd(model.parameters(), cfg.prune_lr, 0.0, traced=True)
    scheduler = cosine(optimizer, cfg.prune_epochs, traced=True)
    example = ctx.example.to(device)
    evaluator = TorchEvaluator(training_func, optimizer, _training_step(ctx), lr_schedulers=scheduler,
                               dummy_input=example)
    # HARP freezes the weights and trains scores and rates with its own optimizer; the evaluator's
    # (nni.trace'd) SGD is required by NNI but has nothing to update
    settings = HARPSettings(gamma_0=cfg.gamma_0, score_lr=cfg.prune_lr, rate_lr=cfg.prune_lr)
    pruner = HARPPruner(model, config_list_for(cfg.mode, cfg.sparsity, cfg.flops_target), evaluator,
                        settings=settings, dummy_input=example)
    holder["pruner"] = pruner
    _, masks = pruner.compress(max_steps=None, max_epochs=cfg.prune_epochs)
    _report_epoch(pruner, cfg.prune_epochs, cb)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    learned = pruner.layer_rates()
    rates = {str(k): float(learned[k]) for k in sorted(learned, key=lambda k: (order.get(k, len(order)), str(k)))}
    history = [{k: _plain(v) for k, v in h.items()} for h in pruner.history]
    pruner.unwrap_model()
    masks = {m: {p: t.detach().cpu() for p, t in d.items() if t is not None} for m, d in masks.items()}
    atomic_save(model.state_dict(), init_path)
    atomic_save(masks, masks_path)
    result = {"layer_rates": rates, "history": history, "uniform": uniform}
    finish_stage(ctx, "prune", result, start_time)
    return model, masks, result
