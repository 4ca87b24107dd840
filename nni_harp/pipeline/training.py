"""What the training stages share: the optimizer and schedule, the adversarial loss and the
training step built from it, adversarial training of a model's weights (pretraining,
fine-tuning) and the per-epoch validation.

Every stage looks :func:`make_training_step` up in its own module (``from ..training import
make_training_step``), so a test can change the step of one stage alone.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ._loop import StepFn
from .context import Context, StageRun
from .measure import eval_attack, eval_loader

__all__ = ["sgd", "cosine", "adversarial_loss", "make_training_step", "train_weights", "epoch_evaluator"]


def sgd(params: Any, lr: float, weight_decay: float, traced: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (``traced``: built through ``nni.trace``, for a TorchEvaluator)."""
    cls = torch.optim.SGD
    if traced:
        import nni

        cls = nni.trace(torch.optim.SGD)
    return cls(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def cosine(optimizer: torch.optim.Optimizer, epochs: int, traced: bool = False) -> Any:
    """Cosine annealing over ``epochs`` (``traced``: built through ``nni.trace``)."""
    cls = torch.optim.lr_scheduler.CosineAnnealingLR
    if traced:
        import nni

        cls = nni.trace(cls)
    return cls(optimizer, T_max=max(epochs, 1))


def adversarial_loss(ctx: Context) -> Any:
    """The run's adversarial training loss (``adv_loss``: PGD-AT, TRADES, MART, ...)."""
    from ..adversarial import AttackConfig, make_adversarial_loss

    cfg = ctx.config
    attack = AttackConfig(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps)
    return make_adversarial_loss(cfg.adv_loss, attack, beta=cfg.trades_beta)


def make_training_step(ctx: Context) -> StepFn:
    """``training_step(batch, model) -> loss`` with the run's adversarial loss."""
    from ..adversarial import training_step_for

    return training_step_for(adversarial_loss(ctx))


def train_weights(
    s: StageRun, model: nn.Module, params: Iterable[nn.Parameter], lr: float, epochs: int, step: StepFn,
    evaluate: Callable[[], Mapping[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Train ``params`` of ``model`` for ``epochs`` epochs of stage ``s`` (SGD, cosine schedule,
    the run's weight decay), continuing from the stage's last finished epoch when there is one and
    checkpointing every epoch; each epoch's metrics."""
    ctx = s.ctx
    optimizer = sgd(params, lr, ctx.config.weight_decay)
    scheduler = cosine(optimizer, epochs)
    start = s.resume(model, optimizer, scheduler)
    return s.loop().run(
        ctx.parallel(model), [optimizer], [scheduler], step, epochs, start,
        lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        evaluate=evaluate,
    )


def epoch_evaluator(ctx: Context, model: nn.Module) -> Callable[[], dict[str, float]] | None:
    """With ``epoch_eval_samples > 0``: a function giving ``val_clean`` / ``val_pgd`` of ``model``
    on the first test images (rank 0 measures; the others return nothing). Else None."""
    cfg = ctx.config
    if cfg.epoch_eval_samples <= 0:
        return None

    def evaluate() -> dict[str, float]:
        if not ctx.is_main:
            return {}
        from ..adversarial import evaluate_robustness

        loader = eval_loader(ctx.test_ds, cfg.epoch_eval_samples, max(cfg.batch_size, 100))
        rob = evaluate_robustness(model, loader, eval_attack(cfg.eps, cfg.eval_attack_steps), autoattack=False,
                                  device=ctx.device, seed=cfg.seed)
        return {"val_clean": rob.clean, "val_pgd": rob.pgd}

    return evaluate
