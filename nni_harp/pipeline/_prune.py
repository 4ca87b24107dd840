"""The ``prune`` stage: the pruner named by ``config.pruner`` (see :mod:`nni_harp.registry`),
driven by an NNI ``TorchEvaluator`` whose training loop is the pipeline's :class:`EpochLoop`.

HARP and HYDRA checkpoint every epoch (model incl. scores and rates, optimizers, schedulers,
pruner state) and resume mid-stage; NNI's training-aware pruners (Taylor, Movement) train the
weights at ``finetune_lr`` while they prune and restart the stage on resume; the one-shot ones
(L1/L2 norm, FPGM) prune in one pass. In structured mode NNI's pruners get the uniform channel
fraction that meets the FLOPs target and dependency groups (``nni_harp.registry``: coupled layers
drop the same channels), and their masks are spread over the coupled channel groups of
``graph_passes``, so that speedup removes what they removed.

Under ``torchrun`` the model is not wrapped in DDP here (the pruner adds its parameters after a
wrapper would be built): every gradient is averaged over the ranks before each optimizer step, so
scores, rates and masks stay identical; the stage measures the largest difference between ranks
(``ranks_*_max_abs_diff`` in the report's checks) and then gives every rank rank 0's masks and
BatchNorm statistics.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Mapping

import torch
from torch import nn

from .. import distributed as hd
from ..loading import load_weights
from .checkpoint import ResumeError, StageCheckpoint, restore_rank_rng
from .stages import Context, _training_step, cosine, epoch_evaluator, finish_stage, reuse_stage, sgd

__all__ = ["stage_prune", "pruner_config_list", "uniform_target", "masks_sparsity"]

logger = logging.getLogger(__name__)

Masks = dict[str, dict[str, torch.Tensor]]


def pruner_config_list(pruner: str, mode: str, sparsity: float, flops_target: float, uniform: float) -> list[dict[str, Any]]:
    """NNI config_list of ``pruner`` (see :func:`nni_harp.registry.config_list`): Conv2d/Linear.

    Unstructured: ``sparsity`` of the weights removed. Structured, HARP/HYDRA: one global budget
    on FLOPs (their cost model; or the predicted latency with a latency budget, whose target is
    then passed as ``flops_target``), written as the sparse ratio ``1 - flops_target``.
    Structured, NNI's pruners: every layer loses the channel fraction ``1 - uniform`` that
    removes ``1 - flops_target`` of the FLOPs (or of the latency) when applied to every group.
    """
    from ..registry import config_list, get_pruner

    if mode == "unstructured":
        return config_list(pruner, mode, sparsity)
    ratio = 1.0 - flops_target if get_pruner(pruner).global_budget else 1.0 - uniform
    return config_list(pruner, mode, min(max(ratio, 1e-6), 1.0 - 1e-6))


def uniform_target(model: nn.Module, example: torch.Tensor, mode: str, target_keep: float, latency: Any = None) -> float:
    """The kept fraction every layer would have under uniform pruning at the same budget.

    Unstructured: the parameter budget itself. Structured: the channel fraction ``k`` (the same
    for every prunable group) whose FLOPs equal ``target_keep`` of the dense FLOPs, found by
    bisection on the cost model; ``sqrt(target_keep)`` when the graph cannot be analysed. With a
    ``latency`` model (a latency budget): the ``k`` whose predicted latency is ``target_keep`` of
    the dense latency.
    """
    if mode == "unstructured":
        return target_keep
    if latency is not None:
        from ._latency import uniform_latency_fraction

        return uniform_latency_fraction(model, example, latency, target_keep)
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


#: Layout of the prune stage's checkpoint (``prune_format`` in ``prune.pt``). 2: ``pruner`` holds the
#: learned pruner's full :meth:`~nni_harp.pruning.HARPPruner.state_dict`. 1 (no field): only its
#: history and the epoch gamma froze at, from which a run cannot be continued exactly.
PRUNE_FORMAT = 2


def _pruner_state(pruner: Any) -> dict[str, Any]:
    """What HARP/HYDRA keep outside the model's weights: scores, rates and hard masks, the momentum
    of their own score/rate optimizer, the gamma schedule, the history and the epochs done
    (:meth:`HARPPruner.state_dict`). Plain tensors and numbers: loads with ``weights_only=True``."""
    return pruner.state_dict()


def _check_prune_checkpoint(ck: StageCheckpoint, path: Any, epochs: int) -> Mapping[str, Any]:
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


def _mask_rates(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]], structured: bool) -> dict[str, float]:
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


def _group_consistent(model: nn.Module, example: torch.Tensor, masks: Masks) -> Masks:
    """NNI's per-layer output-channel masks (coupled layers agree: the registry gives NNI's pruners
    dependency groups) read as ``graph_passes.ModelSpeedup`` reads them
    (``graph_passes.keep_from_masks``), then spread over every member of each prunable group
    (producers, consumers, norms): the masked model computes what the pruned one will."""
    import graph_passes

    groups = graph_passes.channel_groups(model, (example,))
    keep = graph_passes.keep_from_masks(groups, masks)
    return graph_passes.group_masks(model, groups, {g.id: keep[g.id] for g in groups if g.prunable})


def _rank_differences(ctx: Context, masks: Masks, rates: Mapping[str, float]) -> None:
    """Largest difference of masks and rates between this rank and rank 0 (0.0 in one process)."""
    if ctx.world <= 1:
        return
    flat = {f"{m}.{t}": v for m, d in masks.items() for t, v in d.items()}
    ctx.checks["ranks_masks_max_abs_diff"] = hd.max_difference(flat)
    ctx.checks["ranks_rates_max_abs_diff"] = hd.max_difference({k: torch.tensor(float(v)) for k, v in rates.items()})


def stage_prune(ctx: Context, model: nn.Module) -> tuple[nn.Module, Masks, dict[str, Any]]:
    """Learn (or compute) masks with ``config.pruner``; returns the unwrapped model, NNI-format
    masks and the stage result (``layer_rates``, ``history``, ``uniform``, ``sparsity``,
    ``pruner``). Reuses the saved result when already finished."""
    cfg, store, cb = ctx.config, ctx.store, ctx.cb
    init_path, masks_path = store.artefact("pruned_init.pt"), store.artefact("masks.pt")
    if store.is_done("prune"):
        load_weights(model, store.load_artefact(init_path.name, ctx.device), str(init_path))
        masks = store.load_artefact(masks_path.name, ctx.device, nested=True)
        return model, masks, reuse_stage(ctx, "prune", "its masks")

    from nni.compression import TorchEvaluator

    from ..registry import PruneRequest, get_pruner

    spec = get_pruner(cfg.pruner)
    start_time = time.perf_counter()
    example = ctx.example.to(ctx.device)
    latency = None
    if cfg.budget_kind == "latency":
        from ._latency import fit_for_run

        # measured before training (pipeline.run), with a progress bar; the pruner reads it from the cache
        latency = ctx.latency if ctx.latency is not None else fit_for_run(ctx, model, example)
    uniform = uniform_target(model, example, cfg.mode, cfg.target_keep, latency)
    loop = ctx.loop("prune")
    holder: dict[str, Any] = {"done": 0}
    grad_sync = (lambda: hd.all_reduce_grads(model)) if ctx.world > 1 else None
    evaluate = epoch_evaluator(ctx, model)
    learned = spec.name in ("harp", "hydra")
    ck = store.load_epoch("prune", required=("model",)) if learned else None
    resume_state = _check_prune_checkpoint(ck, store.stage_path("prune"), cfg.prune_epochs) if ck is not None else None
    saved = {"epoch": ck.epoch if ck is not None else -1}

    def harp_epoch(model: nn.Module, opts: list[Any], scheds: list[Any], training_step: Any, max_steps: int | None) -> None:
        # HARPPruner calls the training function once per epoch (max_epochs=1) and does its own
        # end-of-epoch bookkeeping (history, gamma schedule) after it returns. So the checkpoint of
        # epoch e is written when epoch e + 1 starts (or, for the last epoch, once compress()
        # returned and the stage is marked finished), when the pruner's state for epoch e is complete.
        pruner = holder["pruner"]
        epoch = len(pruner.history)

        def state() -> dict[str, Any]:
            return {
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in opts],
                "schedulers": [s.state_dict() for s in scheds],
                "prune_format": PRUNE_FORMAT,
                "pruner": _pruner_state(pruner),
                "metrics": holder.get("metrics", {}),
            }

        if ck is not None and epoch == ck.epoch + 1 and not holder.get("resumed"):
            # resuming: the pruner got its state (scores, rates, masks, momentum, schedule, history)
            # before compress(), so HARP starts at the first unfinished epoch; the model's buffers
            # (BatchNorm statistics), the evaluator's optimizer and scheduler and the RNG follow here
            model.load_state_dict(ck.state["model"])
            for opt, opt_state in zip(opts, ck.state["optimizers"]):
                opt.load_state_dict(opt_state)
            for sched, sched_state in zip(scheds, ck.state["schedulers"]):
                sched.load_state_dict(sched_state)
            restore_rank_rng(ck.state)
            holder["resumed"] = True
            cb.on_message(f"prune: resuming after epoch {ck.epoch + 1}/{cfg.prune_epochs}")
        elif epoch > 0 and epoch - 1 > saved["epoch"]:
            _report_epoch(pruner, cfg.prune_epochs, cb)
            # Every rank calls it (their RNG states are gathered); the pruner state is the same on
            # every rank, so only rank 0 builds it.
            store.save_epoch("prune", epoch - 1, state() if store.writer else {})
            saved["epoch"] = epoch - 1

        # Every epoch starts from rank 0's BatchNorm statistics on every rank (they drift apart
        # within an epoch: each rank normalises its own batches). That is also what a resumed run
        # has, since the checkpoint holds rank 0's model, so an interrupted run continues exactly.
        hd.broadcast_buffers(model)

        def epoch_end(done: int, metrics: dict[str, float]) -> None:
            holder["metrics"] = dict(metrics)

        loop.run(model, opts, scheds, training_step, cfg.prune_epochs, epoch, None, max_steps=max_steps,
                 on_epoch_end=epoch_end, stop_epoch=epoch + 1, announce=not holder.get("announced"),
                 grad_sync=grad_sync, evaluate=evaluate)
        holder["announced"] = True

    def training_func(
        model: nn.Module, optimizers: Any, training_step: Any, lr_schedulers: Any = None,
        max_steps: int | None = None, max_epochs: int | None = None, *args: Any, **kwargs: Any,
    ) -> None:
        opts, scheds = _as_list(optimizers), _as_list(lr_schedulers)
        if learned:
            harp_epoch(model, opts, scheds, training_step, max_steps)
            return
        # NNI's training-aware pruners: epochs (or steps) as they ask, counted across their calls
        first = holder["done"]
        if max_epochs is not None:
            epochs = first + max_epochs
        elif max_steps is not None:
            epochs = first + max(1, math.ceil(max_steps / max(loop.steps_per_epoch(), 1)))
        else:
            epochs = first + cfg.prune_epochs
        done = loop.run(model, opts, scheds, training_step, epochs, first, None, max_steps=max_steps,
                        announce=not holder.get("announced"), grad_sync=grad_sync, evaluate=evaluate)
        holder["announced"] = True
        holder["done"] = first + len(done)

    # HARP and HYDRA freeze the weights and train scores and rates with their own optimizer (at
    # prune_lr); NNI's training-aware pruners train the weights with this one, as in fine-tuning
    weight_lr = cfg.prune_lr if learned else cfg.finetune_lr
    optimizer = sgd(model.parameters(), weight_lr, 0.0 if learned else cfg.weight_decay, traced=True)
    scheduler = cosine(optimizer, cfg.prune_epochs, traced=True)
    evaluator = TorchEvaluator(training_func, optimizer, _training_step(ctx), lr_schedulers=scheduler,
                               dummy_input=example)
    options: dict[str, Any] = {}
    if learned:
        from ._latency import harp_options

        options = {"score_lr": cfg.prune_lr}  # the rates keep HARPSettings' own optimizer and rate
        options.update(harp_options(cfg))
        if spec.name == "harp":
            options.update(gamma_0=cfg.gamma_0, init_allocation=cfg.init_allocation, init_keep=cfg.init_keep)
    kept = cfg.target_keep if cfg.mode == "structured" else cfg.flops_target
    cl = pruner_config_list(spec.name, cfg.mode, cfg.sparsity, kept, uniform)
    request = PruneRequest(model, cl, evaluator if spec.training else None, example,
                           steps_per_epoch=loop.steps_per_epoch(), epochs=cfg.prune_epochs, options=options)
    pruner = spec.build(request)
    holder["pruner"] = pruner
    if resume_state is not None:
        from ..pruning import PruningError

        try:
            pruner.load_state_dict(resume_state)
        except PruningError as exc:
            raise ResumeError(
                f"cannot resume pruning from {store.stage_path('prune')}: {exc}; start this run again with --overwrite"
            ) from exc
    if not spec.training:
        cb.on_stage_start("prune", 1, 0, 1)
        cb.on_epoch_start("prune", 0, 1)
    _, masks = spec.compress(pruner, cfg.prune_epochs, loop.steps_per_epoch())
    if learned:
        _report_epoch(pruner, cfg.prune_epochs, cb)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    history = [{k: _plain(v) for k, v in h.items()} for h in getattr(pruner, "history", [])]
    learned_rates = pruner.layer_rates() if hasattr(pruner, "layer_rates") else None
    start_rates = {str(k): float(v) for k, v in getattr(pruner, "start_rates", {}).items()}
    pruner.unwrap_model()
    masks = {m: {p: t.detach().cpu() for p, t in d.items() if t is not None} for m, d in masks.items()}
    if cfg.mode == "structured" and not learned:
        masks = _group_consistent(model, example, masks)
    if learned_rates is None:
        learned_rates = _mask_rates(model, masks, cfg.mode == "structured")
    rates = {str(k): float(learned_rates[k])
             for k in sorted(learned_rates, key=lambda k: (order.get(k, len(order)), str(k)))}
    _rank_differences(ctx, masks, rates)
    hd.broadcast_masks(masks)  # rank 0's masks everywhere (identical already when the ranks agreed)
    hd.broadcast_buffers(model)  # BatchNorm statistics were updated from each rank's own batches
    sparsity = masks_sparsity(model, masks)
    if not spec.training:
        metrics: dict[str, float] = {"kept_fraction": 1.0 - sparsity}
        if evaluate is not None:
            import graph_passes

            metrics.update(epoch_evaluator(ctx, graph_passes.masked_copy(model, masks))())
        cb.on_step("prune", 0, 0, metrics)
        cb.on_epoch_end("prune", 0, metrics)
    ctx.save(model.state_dict(), init_path)
    ctx.save(masks, masks_path)
    result = {"layer_rates": rates, "start_rates": start_rates, "history": history, "uniform": uniform,
              "sparsity": sparsity, "pruner": spec.name}
    if latency is not None and ctx.is_main:
        from ._latency import plan_latency

        result["latency"] = plan_latency(model, example, masks, latency, rates, cfg)
    finish_stage(ctx, "prune", result, start_time)
    return model, masks, result
