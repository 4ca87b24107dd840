"""``speedup``: structured, the masked channels physically removed (``graph_passes.ModelSpeedup``)
and the plan saved; unstructured, nothing to remove (the zeros stay in the state dict). Either way
the pruned weights and ``model_meta.json`` are written, so that :func:`nni_harp.load_pruned` can
rebuild the model.

The model is pruned in place where its own forward follows the pruning (checked against the
pruned graph): it stays the timm model, with its class, methods (its width attributes follow the
pruning: :mod:`nni_harp._shrink`) and Python forward, which at small inputs also runs faster than
a ``torch.fx.GraphModule`` of the same layers (interpreted node by node). Where it cannot, the
pruned GraphModule is used (``pruned_form`` in the metadata and the stage's result say which; the
reason is logged by ``graph_passes``)."""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..._io import atomic_save
from ..._shrink import shrink
from ...loading import MODEL_FILE, PLAN_FILE, write_meta
from ..context import Context, stage

__all__ = ["stage_speedup", "model_meta"]

logger = logging.getLogger(__name__)


def model_meta(ctx: Context, plan: str | None, norm_stats: str = "exact", form: str | None = None) -> dict[str, Any]:
    """``model_meta.json``: what :func:`nni_harp.load_pruned` needs to rebuild the model
    (``norm_stats='kept'``: the plan is applied to a model whose pruned layer norms normalise over
    the kept channels, as the fine-tuned one did; ``form``: ``pruned_form``, for a plan; see
    :func:`nni_harp.loading.load_pruned`)."""
    info = ctx.info
    meta = {
        "model": ctx.config.model,
        "num_classes": info.num_classes,
        "in_chans": info.in_chans,
        "image_size": ctx.config.image_size,
        "mean": list(info.mean),
        "std": list(info.std),
        "dataset": ctx.config.dataset,
        "create_kwargs": ctx.create_kwargs,
        "mode": ctx.config.mode,
        "pruner": ctx.config.pruner,
        "state_dict": MODEL_FILE,
        "plan": plan,
        "norm_stats": norm_stats,
    }
    if form is not None:
        meta["pruned_form"] = form
    return meta


def stage_speedup(ctx: Context, model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Structured: remove the masked channels and save the plan, checking the invariant that the
    shrunk model computes what the masked one does. Returns the model to export and evaluate."""
    with stage(ctx, "speedup", one_pass=True) as s:
        import graph_passes

        plan_name = form = None
        norm_stats = "kept" if any(isinstance(m, graph_passes.KeptStatsNorm) for m in model.modules()) else "exact"
        if ctx.config.mode == "structured":
            model, diff, form = _remove_channels(ctx, model, masks)
            plan_name = PLAN_FILE
            s.result = {"max_abs_diff": diff, "form": form}
        else:
            s.result = {"skipped": "unstructured: zeros are stored in the state dict"}
        atomic_save(model.state_dict(), ctx.out / MODEL_FILE)
        write_meta(ctx.out, model_meta(ctx, plan_name, norm_stats, form))
        s.metrics = {k: v for k, v in s.result.items() if isinstance(v, float)}
    return model


def _remove_channels(ctx: Context, model: nn.Module,
                     masks: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[nn.Module, float, str]:
    """The shrunk model on the run's device (``model`` itself, pruned in place, or the pruned
    GraphModule), the largest difference of its outputs from the masked model's on the first test
    images, and its form (``'module'`` or ``'graph'``); ``plan.json`` written."""
    model = model.cpu().eval()
    masked = copy.deepcopy(model)
    small, speedup = shrink(model, ctx.example, _plain_masks(masks), fallback_to_graph=True)
    small.eval()
    form = "graph" if speedup.inplace_error else "module"
    batch = torch.stack([ctx.test_ds[i][0] for i in range(min(16, len(ctx.test_ds)))])  # type: ignore[arg-type]
    with torch.no_grad():
        ref, got = masked(batch), small(batch)
    diff = float((ref - got).abs().max())
    ctx.checks["speedup_max_abs_diff"] = diff
    scale = float(ref.abs().max()) or 1.0
    if not math.isfinite(diff) or diff > 1e-3 * max(scale, 1.0):
        logger.warning("speedup changed the outputs: max |masked - pruned| = %.3g (logits up to %.3g)", diff, scale)
    speedup.plan.save(ctx.out / PLAN_FILE)  # the plan the speedup carried out
    return small.to(ctx.device), diff, form


def _plain_masks(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {p: t.detach().cpu() for p, t in d.items()} for m, d in masks.items()}
