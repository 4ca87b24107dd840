"""Can the pruning graph handle a timm model? Used by ``nni-harp list-models --check``.

A model is built with random weights, wrapped like the pipeline wraps it, and analysed by
``graph_passes.channel_groups`` at a small input. Unstructured pruning needs no graph analysis
(FLOPs then fall back to ``torch.utils.flop_counter``), so a model whose graph fails is still
usable with ``--mode unstructured``.
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
    ok: bool  # structured pruning possible
    prunable_groups: int
    groups: int
    reason: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"ok ({self.prunable_groups}/{self.groups} channel groups prunable)"
        if self.reason is None:
            return "unstructured only (no prunable channel group)"
        return f"unsupported: {self.reason}"


def check_model(name: str, image_size: int = 32, num_classes: int = 10) -> ModelSupport:
    """Analyse ``name`` at ``image_size``; never raises for a model the graph cannot handle."""
    import graph_passes

    from ..loading import create_model

    try:
        model, _ = create_model(name, num_classes, 3, image_size, (0.5,) * 3, (0.5,) * 3)
        model.eval()
        example = torch.rand(1, 3, image_size, image_size)
        groups = graph_passes.channel_groups(model, (example,))
    except Exception as exc:  # noqa: BLE001 - every failure is an answer here
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {text}"[:200]
        logger.info("%s: %s", name, reason)
        return ModelSupport(name, False, 0, 0, reason)
    prunable = sum(1 for g in groups if g.prunable)
    return ModelSupport(name, prunable > 0, prunable, len(groups))
