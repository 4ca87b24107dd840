"""``finetune``: adversarial fine-tuning of the weights the masks keep, with the masks fixed; the
masks are baked into the weights at the end. In a structured run (``norm_stats='kept'``) the layer
norms whose channels are pruned first become ``graph_passes.KeptStatsNorm`` (statistics over the
kept channels), so the weights adapt to them and the speedup emits plain norms of the kept width;
a resumed run swaps them before loading the fine-tuned weights (the state dict keys are the same)."""
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
        swapped = _kept_stats_norms(ctx, model, masks) if cfg.kept_norm_stats else []
        if s.done:
            load_weights(model, s.load(FINETUNED_WEIGHTS), str(s.artefact(FINETUNED_WEIGHTS)))
            return
        result: dict[str, Any] = {"epochs": cfg.finetune_epochs}
        if swapped:
            result["kept_stats_norms"] = len(swapped)
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


def _kept_stats_norms(ctx: Context, model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The pruned layer norms of ``model`` swapped for norms over the kept channels, in place."""
    import graph_passes

    return graph_passes.kept_stats_norms(model, masks, (ctx.example.to(next(model.parameters()).device),))
