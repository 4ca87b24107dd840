"""``pretrain``: adversarial training of the dense model from scratch, or its weights from
``--checkpoint``; the dense weights are kept for the stages after it."""
from __future__ import annotations

from typing import Any

from torch import nn

from ... import distributed as hd
from ...loading import load_weights
from ..artefacts import read_source_weights
from ..context import Context, stage
from ..training import make_training_step, train_weights

__all__ = ["stage_pretrain", "DENSE_WEIGHTS"]

#: The dense weights, under ``checkpoints/``.
DENSE_WEIGHTS = "dense.pt"


def stage_pretrain(ctx: Context, model: nn.Module) -> None:
    """Adversarial training from scratch, or loading ``--checkpoint``; saves the dense weights."""
    cfg = ctx.config
    with stage(ctx, "pretrain", reuse="the dense weights") as s:
        if s.done:
            load_weights(model, s.load(DENSE_WEIGHTS), str(s.artefact(DENSE_WEIGHTS)))
            return
        if cfg.checkpoint is not None:
            load_weights(model, read_source_weights(cfg.checkpoint), str(cfg.checkpoint))
            ctx.cb.on_message(f"pretrain: skipped, weights from {cfg.checkpoint}")
            result: dict[str, Any] = {"source": str(cfg.checkpoint)}
        else:
            metrics = train_weights(s, model, model.parameters(), cfg.pretrain_lr, cfg.pretrain_epochs,
                                    make_training_step(ctx))
            hd.broadcast_buffers(model)  # BatchNorm statistics of rank 0 (DDP syncs them only before a forward)
            result = {"epochs": cfg.pretrain_epochs, "last": metrics[-1] if metrics else {}}
        s.save(model.state_dict(), DENSE_WEIGHTS)
        s.result = result
