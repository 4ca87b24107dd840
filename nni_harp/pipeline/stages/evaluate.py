"""``evaluate-dense`` and ``evaluate-pruned``: the model measured as the report shows it
(:func:`~nni_harp.pipeline.measure.measure_model`); the numbers are kept in the progress record
and reused on ``--resume``."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..context import Context, stage
from ..export import export_onnx
from ..measure import measure_model
from ..report import ModelMetrics

__all__ = ["stage_evaluate", "dense_onnx"]

logger = logging.getLogger(__name__)


def stage_evaluate(ctx: Context, model: nn.Module, name: str, state_file: Path, onnx_file: Path | None) -> ModelMetrics:
    """Measure ``model`` as stage ``name``; the result is stored in the progress record (reused on resume)."""
    cfg = ctx.config
    with stage(ctx, name, reuse="its numbers") as s:
        if s.done:
            ctx.checks.update(s.result.get("checks", {}))
            return ModelMetrics.from_dict(s.result["metrics"])
        metrics, checks = measure_model(
            model, name, ctx.cb, ctx.test_ds, ctx.example,
            eps=cfg.eps, attack_steps=cfg.eval_attack_steps, samples=cfg.eval_samples,
            batch_size=max(cfg.batch_size, 100), autoattack=cfg.autoattack, seed=cfg.seed,
            latency_runs=cfg.latency_runs, latency_threads=cfg.latency_threads, state_file=state_file, onnx_file=onnx_file, device=ctx.device,
        )
        prefix = "dense" if name == "evaluate-dense" else "pruned"
        checks = {f"{prefix}_{k}": v for k, v in checks.items()}
        ctx.checks.update(checks)
        s.result = {"metrics": metrics.__dict__, "checks": checks}
    return metrics


def dense_onnx(ctx: Context, model: nn.Module) -> Path | None:
    """Export the dense model (for its onnxruntime latency) next to the checkpoints."""
    if not ctx.config.export_onnx:
        return None
    path = ctx.store.artefact("dense.onnx")
    try:
        return export_onnx(model, ctx.example, path)
    except Exception as exc:  # noqa: BLE001 - latency of the dense model is optional
        logger.warning("could not export the dense model to ONNX: %s", exc)
        return None
    finally:
        model.to(ctx.device)
