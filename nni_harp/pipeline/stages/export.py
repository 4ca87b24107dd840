"""``export``: the pruned model written to ``model.onnx`` (skipped with ``export_onnx=False``),
through :func:`graph_passes.export_onnx`."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..artefacts import ONNX_FILE
from ..context import Context, stage
from ..export import export_onnx

__all__ = ["stage_export"]


def stage_export(ctx: Context, model: nn.Module) -> Path | None:
    """Export the pruned model to ``model.onnx`` (skipped with ``export_onnx=False``)."""
    path: Path | None = None
    with stage(ctx, "export", one_pass=True) as s:
        if ctx.config.export_onnx:
            try:
                path = export_onnx(model, ctx.example, ctx.out / ONNX_FILE)
            finally:
                model.to(ctx.device)
        s.result = {"path": str(path) if path else None}
    return path
