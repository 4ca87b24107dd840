"""A compact train -> prune -> fine-tune -> evaluate path with any registered pruner.

Used by the NNI trial (:mod:`nni_harp.trial`) and the torchrun example: the full pipeline
(:func:`nni_harp.pipeline.run`) always prunes with HARP and has no distributed mode, so baselines
and DDP runs go through these functions, which reuse :mod:`nni_harp.adversarial` for the losses
and attacks. Every function works in a single process and under ``torch.distributed``: gradients
are averaged over ranks before each optimizer step (see :mod:`nni_harp.distributed`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from . import distributed as hd
from .registry import PruneRequest, config_list, get_pruner

__all__ = ["train_epochs", "prune", "finetune", "evaluate", "sparsity_of", "flops_kept", "masks_from_model"]

logger = logging.getLogger(__name__)

Masks = dict[str, dict[str, torch.Tensor]]
EpochHook = Callable[[str, int, Mapping[str, float]], None]


def _batches(loader: Iterable[Any], epoch: int, max_batches: int | None) -> Iterable[Any]:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def train_epochs(
    model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer, training_step: Callable[[Any, nn.Module], torch.Tensor],
    epochs: int | None, max_steps: int | None = None, max_batches: int | None = None, scheduler: Any = None,
    sync_grads: bool = True, stage: str = "train", on_epoch_end: EpochHook | None = None, epoch_offset: int = 0,
) -> int:
    """Run ``epochs`` epochs (or ``max_steps`` steps); returns the number of steps taken.

    ``sync_grads`` averages gradients over ranks before each step (leave it on unless the model is
    wrapped in DDP, which does that itself for the parameters it knows).
    """
    steps, epoch = 0, 0
    model.train()
    while (epochs is None or epoch < epochs) and (max_steps is None or steps < max_steps):
        total, n = 0.0, 0
        for batch in _batches(loader, epoch_offset + epoch, max_batches):
            optimizer.zero_grad(set_to_none=True)
            loss = training_step(batch, model)
            loss.backward()
            if sync_grads:
                hd.all_reduce_grads(model)
            optimizer.step()
            total, n, steps = total + float(loss.detach()), n + 1, steps + 1
            if max_steps is not None and steps >= max_steps:
                break
        if scheduler is not None:
            scheduler.step()
        loss_mean = hd.all_reduce_mean(total / max(n, 1))
        if hd.is_main():
            logger.info("%s epoch %d: loss %.4f (%d steps)", stage, epoch_offset + epoch, loss_mean, n)
        if on_epoch_end is not None:
            on_epoch_end(stage, epoch_offset + epoch, {"loss": loss_mean})
        epoch += 1
        if n == 0:
            break
    return steps


def masks_from_model(model: nn.Module, masks: Masks) -> Masks:
    """Detached CPU copies of NNI-format masks, without the None entries NNI keeps for unmasked targets."""
    return {m: {p: t.detach().clone().cpu() for p, t in d.items() if t is not None} for m, d in masks.items()}


def prune(
    model: nn.Module, loader: Iterable[Any], adv_loss: Any, pruner_name: str, mode: str, sparsity: float,
    epochs: int, lr: float, dummy_input: torch.Tensor, max_batches: int | None = None,
    steps_per_epoch: int | None = None, options: Mapping[str, Any] | None = None,
    on_epoch_end: EpochHook | None = None,
) -> tuple[Masks, dict[str, Any]]:
    """Prune ``model`` in place with the registered pruner ``pruner_name``; returns the NNI-format
    masks (on the CPU) and ``{'layer_rates', 'history'}`` when the pruner has them. The model
    comes back unwrapped, with the masks *not* yet fixed (see :func:`finetune`)."""
    import nni
    from nni.compression import TorchEvaluator

    from .adversarial import training_step_for

    spec = get_pruner(pruner_name)
    if steps_per_epoch is None:
        steps_per_epoch = len(loader) if max_batches is None else min(len(loader), max_batches)  # type: ignore[arg-type]
    step_fn = training_step_for(adv_loss)
    counter = {"epoch": 0}

    def training_func(model: nn.Module, optimizers: Any, training_step: Any, lr_schedulers: Any = None,
                      max_steps: int | None = None, max_epochs: int | None = None, *args: Any, **kwargs: Any) -> None:
        opt = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        done_epochs = counter["epoch"]

        def hook(stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
            counter["epoch"] = epoch + 1
            if on_epoch_end is not None:
                on_epoch_end(stage, epoch, metrics)

        train_epochs(model, loader, opt, training_step, max_epochs, max_steps, max_batches, None, True, "prune",
                     hook, done_epochs)

    params = [p for p in model.parameters() if p.requires_grad]
    # the weights' own optimizer: HARP freezes the weights (lr irrelevant); Taylor/Movement train them
    optimizer = nni.trace(torch.optim.SGD)(params, lr=lr, momentum=0.9)
    evaluator = TorchEvaluator(training_func, optimizer, step_fn, dummy_input=dummy_input)
    cl = config_list(spec.name, mode, sparsity)
    kwargs = dict(options or {})
    pruner = spec.build(PruneRequest(model, cl, evaluator if spec.training else None, dummy_input,
                                     steps_per_epoch, epochs, kwargs))
    _, masks = spec.compress(pruner, epochs, steps_per_epoch)
    info: dict[str, Any] = {}
    if hasattr(pruner, "layer_rates"):
        info["layer_rates"] = {str(k): float(v) for k, v in pruner.layer_rates().items()}
    if hasattr(pruner, "history"):
        info["history"] = [dict(h) for h in pruner.history]
    pruner.unwrap_model()
    hd.broadcast_buffers(model)  # BatchNorm statistics were updated from each rank's own shard
    if not spec.training and on_epoch_end is not None:
        on_epoch_end("prune", 0, {})
    return masks_from_model(model, masks), info


def finetune(
    model: nn.Module, masks: Masks, loader: Iterable[Any], adv_loss: Any, epochs: int, lr: float,
    weight_decay: float = 5e-4, max_batches: int | None = None, ddp: bool | None = None,
    on_epoch_end: EpochHook | None = None,
) -> nn.Module:
    """Adversarially fine-tune the kept weights with the masks fixed; returns the model with the
    masks baked in. Under ``torch.distributed`` the model is wrapped in DDP for the epochs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .adversarial import training_step_for
    from .pruning import apply_masks, fix_masks, release_masks

    apply_masks(model, masks)
    fix_masks(model, masks)
    if epochs > 0:
        use_ddp = hd.is_distributed() if ddp is None else ddp
        net: nn.Module = model
        if use_ddp:
            dev = next(model.parameters()).device
            net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                              weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        train_epochs(net, loader, opt, training_step_for(adv_loss), epochs, None, max_batches, sched,
                     sync_grads=not use_ddp, stage="finetune", on_epoch_end=on_epoch_end)
    release_masks(model)
    apply_masks(model, masks)
    hd.broadcast_buffers(model)
    return model


def evaluate(model: nn.Module, loader: Iterable[Any], attack: Any, max_batches: int | None = None) -> dict[str, float]:
    """Clean and PGD accuracy (fractions), averaged over ranks by sample count."""
    from .adversarial import evaluate_robustness

    rep = evaluate_robustness(model, loader, attack, autoattack=False, max_batches=max_batches)
    n = hd.all_reduce_mean(rep.n) * hd.world_size()
    clean = hd.all_reduce_mean(rep.clean * rep.n) * hd.world_size() / max(n, 1)
    robust = hd.all_reduce_mean(rep.pgd * rep.n) * hd.world_size() / max(n, 1)
    return {"clean": clean, "robust": robust, "n": n}


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zero weights over all Conv2d/Linear weights."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)


@torch.no_grad()
def flops_kept(model: nn.Module, example: torch.Tensor) -> float:
    """Kept fraction of Conv2d/Linear multiply-adds, counting only non-zero weights (what a sparse
    kernel would execute; for channel pruning it equals the dense FLOPs of the pruned model)."""
    dense, kept = [0.0], [0.0]

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        w = m.weight  # every weight is used once per output position (groups included)
        positions = out.numel() / out.shape[1] if isinstance(m, nn.Conv2d) else out.numel() / out.shape[-1]
        dense[0] += positions * w.numel()
        kept[0] += positions * float((w != 0).sum())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was = model.training
        model.eval()
        model(example)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return kept[0] / max(dense[0], 1.0)
