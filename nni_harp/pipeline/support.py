"""Can the pruning graph handle a timm model? Used by ``nni-harp list-models --check``.

The check builds the model with random weights, wrapped the way the pipeline wraps it, and runs
the structured path at a small input: one trace and its channel analysis
(``graph_passes.analysis_for``), then the removal of half the channels of every prunable group
with ``graph_passes.ModelSpeedup`` on that trace (in place where the model's own forward follows,
as a run's speedup stage does, else as a ``torch.fx.GraphModule``: the check says which), then a
comparison of the shrunk model's outputs with the masked model's and a FLOP count of the shrunk model. Unstructured pruning needs none of
this, so a model that fails here can still be pruned with ``--mode unstructured``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = ["ModelSupport", "check_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSupport:
    name: str
    ok: bool  # structured pruning works end to end
    prunable_groups: int
    groups: int
    reason: str | None = None  # why not (None with ok=False: no prunable group)
    in_place: bool | None = None  # ok: the model itself was pruned (else the pruned GraphModule stands in)

    def describe(self) -> str:
        if self.ok:
            form = "pruned in place" if self.in_place else "pruned as a torch.fx.GraphModule"
            return f"ok ({self.prunable_groups}/{self.groups} channel groups prunable; {form})"
        if self.reason is None:
            return "unstructured only (no prunable channel group)"
        return f"unsupported: {self.reason}"


def _short(step: str, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{step}: {type(exc).__name__}: {text}"[:240]


def check_model(name: str, image_size: int = 32, num_classes: int = 10) -> ModelSupport:
    """Run the structured pruning path on ``name``; never raises for a model it cannot handle."""
    import graph_passes

    from ..loading import create_model
    from .export import measure_flops

    step = "build"
    try:
        torch.manual_seed(0)
        model, _ = create_model(name, num_classes, 3, image_size, (0.5,) * 3, (0.5,) * 3)
        model.eval()
        x = torch.rand(2, 3, image_size, image_size)
        step = "channel groups"
        analysis = graph_passes.analysis_for(model, (x[:1],))  # traced once: the speedup below uses it too
        groups = graph_passes.channel_groups(analysis)
        prunable = [g for g in groups if g.prunable]
        if not prunable:
            return ModelSupport(name, False, 0, len(groups))
        step = "speedup"
        keep = {g.id: torch.arange(g.size) % 2 == 0 for g in prunable}
        masks = graph_passes.group_masks(model, groups, keep)
        masked = graph_passes.masked_copy(model, masks)
        speedup = graph_passes.ModelSpeedup(model, x[:1], masks, graph_module=analysis)
        small = speedup.speedup_model(fallback_to_graph=True).eval()
        step = "compare outputs"
        with torch.no_grad():
            ref, got = masked(x), small(x)
        diff = float((ref - got).abs().max())
        if not diff <= 1e-3 * max(1.0, float(ref.abs().max())):
            return ModelSupport(name, False, len(prunable), len(groups),
                                f"compare outputs: pruned model differs from the masked one by {diff:.3g}")
        step = "FLOP count"
        measure_flops(small, x[:1])
    except Exception as exc:  # noqa: BLE001 - every failure is an answer here
        reason = _short(step, exc)
        logger.info("%s: %s", name, reason)
        return ModelSupport(name, False, 0, 0, reason)
    return ModelSupport(name, True, len(prunable), len(groups), in_place=speedup.inplace_error is None)
