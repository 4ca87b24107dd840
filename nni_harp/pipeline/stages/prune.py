"""``prune``: the pruner named by ``config.pruner`` (see :mod:`nni_harp.registry`), driven by an
NNI ``TorchEvaluator`` whose training loop is the pipeline's :class:`~nni_harp.pipeline._loop.EpochLoop`.

What the stage does with a pruner follows the flags of its registry spec
(:class:`~nni_harp.registry.PrunerSpec`), never its name: a ``resumable`` pruner (HARP, HYDRA)
is checkpointed every epoch (model incl. scores and rates, optimizers, schedulers, pruner state)
and resumes mid-stage; one that ``learns_scores`` freezes the weights and gets HARP's settings;
NNI's ``training`` pruners (Taylor, Movement) train the weights at ``finetune_lr`` while they
prune and restart the stage on resume; the others (L1/L2 norm, FPGM) prune in one pass. In
structured mode NNI's pruners get the uniform channel fraction that meets the FLOPs target and
dependency groups (coupled layers drop the same channels), and the masks of a pruner without
``group_masks`` are spread over the coupled channel groups of ``graph_passes``, so that speedup
removes what they removed.

Under ``torchrun`` the model is not wrapped in DDP here (the pruner adds its parameters after a
wrapper would be built): every gradient is averaged over the ranks before each optimizer step, so
scores, rates and masks stay identical; the stage measures the largest difference between ranks
(``ranks_*_max_abs_diff`` in the report's checks) and then gives every rank rank 0's masks and
BatchNorm statistics.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from ... import distributed as hd
from ...loading import load_weights
from .._loop import EpochLoop
from ..checkpoint import ResumeError, StageCheckpoint, restore_rank_rng
from ..context import Context, StageRun, stage
from ..training import cosine, epoch_evaluator, make_training_step, sgd
from ._pruning import (
    PRUNE_FORMAT,
    Masks,
    check_prune_checkpoint,
    group_consistent,
    mask_rates,
    masks_sparsity,
    plain_history,
    pruner_config_list,
    rank_differences,
    report_epoch,
    uniform_target,
)

__all__ = ["stage_prune", "PrunerTraining", "PRUNED_INIT", "MASKS"]

#: The weights the masks apply to (the dense weights, with a learned pruner's norm affine), and the
#: masks, under ``checkpoints/``.
PRUNED_INIT, MASKS = "pruned_init.pt", "masks.pt"


def stage_prune(ctx: Context, model: nn.Module) -> tuple[nn.Module, Masks, dict[str, Any]]:
    """Learn (or compute) masks with ``config.pruner``; returns the unwrapped model, NNI-format
    masks and the stage result (``layer_rates``, ``history``, ``uniform``, ``sparsity``,
    ``pruner``). Reuses the saved result when already finished."""
    import graph_passes

    from ...registry import get_pruner

    spec = get_pruner(ctx.config.pruner)
    with stage(ctx, "prune", reuse="its masks", one_pass=not spec.training) as s:
        if s.done:
            load_weights(model, s.load(PRUNED_INIT), str(s.artefact(PRUNED_INIT)))
            return model, s.load(MASKS, nested=True), s.result
        with graph_passes.trace_once():  # the stage and the pruner it builds share one trace of the model
            masks = _compute_masks(s, spec, model)
    return model, masks, s.result


def _compute_masks(s: StageRun, spec: Any, model: nn.Module) -> Masks:
    from nni.compression import TorchEvaluator

    from ...registry import PruneRequest

    ctx, cfg, store = s.ctx, s.ctx.config, s.ctx.store
    example = ctx.example.to(ctx.device)
    latency = None
    if cfg.budget_kind == "latency":
        from .._latency import fit_for_run

        # measured before training (pipeline.run), with a progress bar; the pruner reads it from the cache
        latency = ctx.latency if ctx.latency is not None else fit_for_run(ctx, model, example)
    uniform = uniform_target(model, example, cfg.mode, cfg.target_keep, latency)
    evaluate = epoch_evaluator(ctx, model)
    ck = store.load_epoch("prune", required=("model",)) if spec.resumable else None
    resume_state = check_prune_checkpoint(ck, store.stage_path("prune"), cfg.prune_epochs) if ck is not None else None
    training = PrunerTraining(ctx, s.loop(), spec.resumable, ck, evaluate,
                              (lambda: hd.all_reduce_grads(model)) if ctx.world > 1 else None)

    # A pruner that learns scores freezes the weights and trains scores and rates with its own
    # optimizer (at prune_lr); NNI's training-aware pruners train the weights with this one, as in fine-tuning
    weight_lr = cfg.prune_lr if spec.learns_scores else cfg.finetune_lr
    optimizer = sgd(model.parameters(), weight_lr, 0.0 if spec.learns_scores else cfg.weight_decay, traced=True)
    scheduler = cosine(optimizer, cfg.prune_epochs, traced=True)
    evaluator = TorchEvaluator(training, optimizer, make_training_step(ctx), lr_schedulers=scheduler,
                               dummy_input=example)
    options: dict[str, Any] = {}
    if spec.learns_scores:
        from .._latency import harp_options

        options = {"score_lr": cfg.prune_lr}  # the rates keep HARPSettings' own optimizer and rate
        options.update(harp_options(cfg))
    if spec.learns_rates:
        options.update(gamma_0=cfg.gamma_0, init_allocation=cfg.init_allocation, init_keep=cfg.init_keep)
    kept = cfg.target_keep if cfg.mode == "structured" else cfg.flops_target
    cl = pruner_config_list(spec.name, cfg.mode, cfg.sparsity, kept, uniform)
    steps = training.loop.steps_per_epoch()
    request = PruneRequest(model, cl, evaluator if spec.training else None, example,
                           steps_per_epoch=steps, epochs=cfg.prune_epochs, options=options)
    pruner = training.pruner = spec.build(request)
    if resume_state is not None:
        from ...pruning import PruningError

        try:
            pruner.load_state_dict(resume_state)
        except PruningError as exc:
            raise ResumeError(
                f"cannot resume pruning from {store.stage_path('prune')}: {exc}; start this run again with --overwrite"
            ) from exc
    _, masks = spec.compress(pruner, cfg.prune_epochs, steps)
    if spec.resumable:
        report_epoch(pruner, cfg.prune_epochs, ctx.cb)

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    history = plain_history(pruner)
    learned_rates = pruner.layer_rates() if hasattr(pruner, "layer_rates") else None
    start_rates = {str(k): float(v) for k, v in getattr(pruner, "start_rates", {}).items()}
    pruner.unwrap_model()
    masks = {m: {p: t.detach().cpu() for p, t in d.items() if t is not None} for m, d in masks.items()}
    if cfg.mode == "structured" and not spec.group_masks:
        masks = group_consistent(model, example, masks)
    if learned_rates is None:
        learned_rates = mask_rates(model, masks, cfg.mode == "structured")
    rates = {str(k): float(learned_rates[k])
             for k in sorted(learned_rates, key=lambda k: (order.get(k, len(order)), str(k)))}
    rank_differences(ctx, masks, rates)
    hd.broadcast_masks(masks)  # rank 0's masks everywhere (identical already when the ranks agreed)
    hd.broadcast_buffers(model)  # BatchNorm statistics were updated from each rank's own batches
    sparsity = masks_sparsity(model, masks)
    if not spec.training:  # the one pass: the kept fraction, and the validation of the masked model
        s.metrics = {"kept_fraction": 1.0 - sparsity}
        if evaluate is not None:
            import graph_passes

            s.metrics.update(epoch_evaluator(ctx, graph_passes.masked_copy(model, masks))())
    s.save(model.state_dict(), PRUNED_INIT)
    s.save(masks, MASKS)
    s.result = {"layer_rates": rates, "start_rates": start_rates, "history": history, "uniform": uniform,
                "sparsity": sparsity, "pruner": spec.name}
    if latency is not None and ctx.is_main:
        from .._latency import plan_latency

        # the pruner's model refitted on its measured final plan (HARPSettings.latency_checks), where it has one
        s.result["latency"] = plan_latency(model, example, masks, getattr(pruner, "latency_model", None) or latency,
                                           rates, cfg)
        s.result["latency"]["checks"] = list(getattr(pruner, "latency_checks", []))
    return masks


class PrunerTraining:
    """The ``training_func`` of the pruner's ``TorchEvaluator``: epochs of the stage's loop.

    A ``resumable`` pruner (HARP, HYDRA) calls it once per epoch (``max_epochs=1``) and does its
    own end-of-epoch bookkeeping (history, gamma schedule) after it returns. So the checkpoint of
    epoch e is written when epoch e + 1 starts (or, for the last epoch, once ``compress()``
    returned and the stage is marked finished), when the pruner's state for epoch e is complete.
    NNI's training-aware pruners get the epochs (or steps) they ask for, counted across their calls.
    """

    def __init__(self, ctx: Context, loop: EpochLoop, resumable: bool, checkpoint: StageCheckpoint | None,
                 evaluate: Callable[[], dict[str, float]] | None, grad_sync: Callable[[], None] | None) -> None:
        self.ctx, self.loop, self.resumable, self.checkpoint = ctx, loop, resumable, checkpoint
        self.evaluate, self.grad_sync = evaluate, grad_sync
        self.pruner: Any = None  # set once built: the pruner takes the evaluator, which takes this
        self.epochs_done = 0  # NNI's training-aware pruners: epochs run so far, over all calls
        self.saved_epoch = checkpoint.epoch if checkpoint is not None else -1
        self.resumed = False
        self.announced = False  # on_stage_start sent (by the first epoch)
        self.metrics: dict[str, float] = {}  # of the last epoch, kept in its checkpoint

    def __call__(self, model: nn.Module, optimizers: Any, training_step: Any, lr_schedulers: Any = None,
                 max_steps: int | None = None, max_epochs: int | None = None, *args: Any, **kwargs: Any) -> None:
        opts, scheds = _as_list(optimizers), _as_list(lr_schedulers)
        if self.resumable:
            self._pruner_epoch(model, opts, scheds, training_step, max_steps)
            return
        first = self.epochs_done
        if max_epochs is not None:
            epochs = first + max_epochs
        elif max_steps is not None:
            epochs = first + max(1, math.ceil(max_steps / max(self.loop.steps_per_epoch(), 1)))
        else:
            epochs = first + self.ctx.config.prune_epochs
        done = self.loop.run(model, opts, scheds, training_step, epochs, first, None, max_steps=max_steps,
                             announce=not self.announced, grad_sync=self.grad_sync, evaluate=self.evaluate)
        self.announced = True
        self.epochs_done = first + len(done)

    def _pruner_epoch(self, model: nn.Module, opts: list[Any], scheds: list[Any], training_step: Any,
                      max_steps: int | None) -> None:
        ctx, ck, epochs = self.ctx, self.checkpoint, self.ctx.config.prune_epochs
        epoch = len(self.pruner.history)
        if ck is not None and epoch == ck.epoch + 1 and not self.resumed:
            # resuming: the pruner got its state (scores, rates, masks, momentum, schedule, history)
            # before compress(), so it starts at the first unfinished epoch; the model's buffers
            # (BatchNorm statistics), the evaluator's optimizer and scheduler and the RNG follow here
            model.load_state_dict(ck.state["model"])
            for opt, opt_state in zip(opts, ck.state["optimizers"]):
                opt.load_state_dict(opt_state)
            for sched, sched_state in zip(scheds, ck.state["schedulers"]):
                sched.load_state_dict(sched_state)
            restore_rank_rng(ck.state)
            self.resumed = True
            ctx.cb.on_message(f"prune: resuming after epoch {ck.epoch + 1}/{epochs}")
        elif epoch > 0 and epoch - 1 > self.saved_epoch:
            report_epoch(self.pruner, epochs, ctx.cb)
            # Every rank calls it (their RNG states are gathered); the pruner state is the same on
            # every rank, so only rank 0 builds it.
            ctx.store.save_epoch("prune", epoch - 1, self._state(model, opts, scheds) if ctx.store.writer else {})
            self.saved_epoch = epoch - 1

        # Every epoch starts from rank 0's BatchNorm statistics on every rank (they drift apart
        # within an epoch: each rank normalises its own batches). That is also what a resumed run
        # has, since the checkpoint holds rank 0's model, so an interrupted run continues exactly.
        hd.broadcast_buffers(model)

        def epoch_end(done: int, metrics: dict[str, float]) -> None:
            self.metrics = dict(metrics)

        self.loop.run(model, opts, scheds, training_step, epochs, epoch, None, max_steps=max_steps,
                      on_epoch_end=epoch_end, stop_epoch=epoch + 1, announce=not self.announced,
                      grad_sync=self.grad_sync, evaluate=self.evaluate)
        self.announced = True

    def _state(self, model: nn.Module, opts: list[Any], scheds: list[Any]) -> dict[str, Any]:
        """The checkpoint of a finished epoch. ``pruner`` is what the pruner keeps outside the
        model's weights: scores, rates and hard masks, the momentum of its own score/rate
        optimizer, the gamma schedule, the history and the epochs done (its ``state_dict()``:
        plain tensors and numbers, which load with ``weights_only=True``)."""
        return {
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in opts],
            "schedulers": [s.state_dict() for s in scheds],
            "prune_format": PRUNE_FORMAT,
            "pruner": self.pruner.state_dict(),
            "metrics": self.metrics,
        }


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
