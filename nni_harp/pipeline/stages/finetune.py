"""``finetune``: adversarial fine-tuning of the weights the masks keep, with the masks fixed; the
masks are baked into the weights at the end."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ... import distributed as hd
from ...loading import load_weights
from ..context import Context, stage
from ..training import epoch_evaluator, make_training_step, train_weights

__all__ = ["stage_finetune", "FINETUNED_WEIGHTS"]

#: The fine-tuned weights (masks baked in), under ``checkpoints/``.
FINETUNED_WEIGHTS = "finetuned.pt"


def stage_finetune(ctx: Context, model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Adversarial fine-tuning of the kept weights with the masks fixed; bakes the masks at the end."""
    from ...pruning import fix_masks, release_masks

    cfg = ctx.config
    with stage(ctx, "finetune", reuse="the fine-tuned weights") as s:
        if s.done:
            load_weights(model, s.load(FINETUNED_WEIGHTS), str(s.artefact(FINETUNED_WEIGHTS)))
            return
        result: dict[str, Any] = {"epochs": cfg.finetune_epochs}
        fix_masks(model, masks)
        try:
            if cfg.finetune_epochs > 0:
                params = [p for p in model.parameters() if p.requires_grad]
                metrics = train_weights(s, model, params, cfg.finetune_lr, cfg.finetune_epochs,
                                        make_training_step(ctx), evaluate=epoch_evaluator(ctx, model))
                result["last"] = metrics[-1] if metrics else {}
        finally:
            release_masks(model)
        hd.broadcast_buffers(model)  # BatchNorm statistics of rank 0 (DDP syncs them only before a forward)
        if ctx.world > 1:
            weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
            ctx.checks["ranks_weights_max_abs_diff"] = hd.max_difference(weights)
        s.save(model.state_dict(), FINETUNED_WEIGHTS)
        s.result = result
