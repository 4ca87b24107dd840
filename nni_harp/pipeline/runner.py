"""The pipeline run top to bottom: :func:`run` (a prune run: every stage of :mod:`.stages` in
order, then the report) and :func:`evaluate` (one saved model measured like a prune run does).
See :mod:`nni_harp.pipeline` for what they write."""
from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .. import distributed as hd
from .artefacts import DENSE_MODEL_FILE, ONNX_FILE, PLOT_HISTORY, PLOT_RATES, read_source_weights
from .callbacks import CallbackList, PipelineCallback
from .checkpoint import RunInterrupted, RunStore
from ._settings import declared_default
from .config import ConfigError, EvaluateConfig, PipelineConfig, resume_defaults
from .report import Report

__all__ = ["run", "evaluate"]

logger = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(config: PipelineConfig, callbacks: Iterable[PipelineCallback] | PipelineCallback | None = None) -> Report:
    """Run (or, with ``config.resume``, continue) the whole pipeline and return its report.

    The output folder follows :mod:`.outdir`'s rules and is locked for the run. Ctrl-C (or a
    SIGTERM the caller turns into ``KeyboardInterrupt``, as the command line does) ends it with
    :class:`RunInterrupted`, which says what was saved: every finished epoch is on disk."""
    if not isinstance(config, PipelineConfig):
        raise TypeError(f"run() takes a PipelineConfig, got {type(config).__name__}")
    owns_group = hd.env_world_size() > 1 and not hd.is_distributed()
    info = hd.init_from_env()
    store = RunStore(config.out_path, writer=info.rank == 0)
    try:
        with contextlib.ExitStack() as cleanup:
            return _run(config, callbacks, info, store, cleanup)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(*store.saved_summary()) from None
    finally:
        if owns_group:
            hd.shutdown()


def _run(
    config: PipelineConfig, callbacks: Iterable[PipelineCallback] | PipelineCallback | None, info: hd.DistInfo,
    store: RunStore, cleanup: contextlib.ExitStack,
) -> Report:
    from ..loading import load_weights
    from . import outdir
    from .context import make_context, new_model
    from .stages import dense_onnx, stage_evaluate, stage_finetune, stage_pretrain, stage_prune

    world = info.world_size
    if config.batch_size % world:
        raise ConfigError(
            "batch_size", f"the global batch {config.batch_size} must be divisible by the {world} processes"
        )
    # progress goes through rank 0 only; the other ranks train silently
    cb = CallbackList(callbacks if info.rank == 0 else None)
    out = config.out_path
    # the output folder, data, model, input size and --checkpoint are checked before anything is written
    hd.on_main(lambda: (outdir.check_output_dir(out), outdir.check_contents(out, config.resume, config.overwrite)))
    _seed_everything(config.seed)
    ctx = make_context(config, store, cb, info)
    model = new_model(ctx)
    hd.broadcast_module(model)  # the same start on every rank (the seeds make it so already)
    if config.checkpoint is not None:
        load_weights(model, read_source_weights(config.checkpoint), str(config.checkpoint))
    if config.budget_kind == "latency":
        from ._latency import prepare_latency

        # before the folder is taken and anything trains: an unreachable target is a ConfigError
        ctx.latency = prepare_latency(ctx, model)
    lock = hd.on_main(lambda: outdir.open_output_dir(out, config.resume, config.overwrite))
    if lock is not None:
        cleanup.callback(lock.release)
    hd.on_main(lambda: store.start(config.to_dict(), config.resume, config.overwrite, PipelineConfig.RESUME_KEYS,
                                   resume_defaults()))  # settings absent from older runs' records
    store.adopt(hd.broadcast_object(store.progress))
    if world > 1:
        ctx.checks["world_size"] = float(world)

    stage_pretrain(ctx, model)
    dense = None
    if ctx.is_main:
        onnx_dense = None if store.is_done("evaluate-dense") else dense_onnx(ctx, model)
        dense = stage_evaluate(ctx, model, "evaluate-dense", out / DENSE_MODEL_FILE, onnx_dense)
    model, masks, pruned_result = stage_prune(ctx, model)
    stage_finetune(ctx, model, masks)
    # the rest (speedup, export, evaluation, report) runs on rank 0; the others wait for its report
    report = hd.on_main(lambda: _finish(ctx, model, masks, pruned_result, dense))
    return hd.broadcast_object(report)


def _finish(ctx: Any, model: torch.nn.Module, masks: Any, pruned_result: dict[str, Any], dense: Any) -> Report:
    from ..loading import META_FILE, MODEL_FILE, PLAN_FILE
    from .plots import plot_history, plot_layer_rates
    from .stages import stage_evaluate, stage_export, stage_speedup

    config, store, out = ctx.config, ctx.store, ctx.out
    model = stage_speedup(ctx, model, masks)
    onnx_path = stage_export(ctx, model)
    pruned = stage_evaluate(ctx, model, "evaluate-pruned", out / MODEL_FILE, onnx_path)

    rates = pruned_result.get("layer_rates", {})
    history = pruned_result.get("history", [])
    target = config.target
    pruner = pruned_result.get("pruner", config.pruner)
    title = f"{config.model} ({config.mode}, {pruner}, {next(iter(target))} {next(iter(target.values())):g})"
    latency_budget = _latency_budget(ctx, model, pruned_result.get("latency"))
    plot_layer_rates(rates, pruned_result.get("uniform"), out / PLOT_RATES, title=f"kept fraction per layer: {title}",
                     start=pruned_result.get("start_rates"), latency=latency_budget,
                     groups=(pruned_result.get("latency") or {}).get("groups"))
    plot_history(history, config.target_keep, out / PLOT_HISTORY, title=f"pruning schedule: {title}")
    files = {
        "model": MODEL_FILE,
        "meta": META_FILE,
        "dense_model": DENSE_MODEL_FILE,
        "plot_rates": PLOT_RATES,
        "plot_history": PLOT_HISTORY,
    }
    if (out / PLAN_FILE).is_file() and config.mode == "structured":
        files["plan"] = PLAN_FILE
    if onnx_path is not None:
        files["onnx"] = onnx_path.name
    achieved: dict[str, float] = {}
    if "sparsity" in pruned_result:
        achieved["sparsity"] = float(pruned_result["sparsity"])
    if dense is not None and dense.effective_flops:
        achieved["flops_kept"] = pruned.effective_flops / dense.effective_flops
    report = Report(
        model=config.model, mode=config.mode, dataset=config.dataset, target=target,
        dense=dense, pruned=pruned, layer_rates=rates, history=history,
        stage_seconds=dict(ctx.stage_seconds), files=files, config=config.to_dict(),
        checks=dict(ctx.checks), pruner=pruner, achieved=achieved, latency_budget=latency_budget,
    )
    report.save(out)
    store.mark_done("report", {"report": "report.json"})
    return report


def _latency_budget(ctx: Any, model: torch.nn.Module, planned: dict[str, Any] | None) -> dict[str, Any] | None:
    """report.json's ``latency_budget`` of a latency-budget run: what the prune stage's latency
    model predicted for the final masks (``planned``) and the pruned model's latency fraction
    measured now against the dense model's, on the same backend, threads and input."""
    if ctx.config.budget_kind != "latency" or not planned:
        return None
    from ..loading import load_weights
    from ._latency import measure_budget
    from .context import new_model
    from .stages.pretrain import DENSE_WEIGHTS

    dense = new_model(ctx)
    path = ctx.store.artefact(DENSE_WEIGHTS)
    load_weights(dense, ctx.store.load_artefact(DENSE_WEIGHTS, ctx.device), str(path))
    ctx.cb.on_message(f"latency budget: timing the dense and the pruned model on {planned['backend']}")
    measured = measure_budget(dense, model, ctx.example, planned["backend"], int(planned["threads"]),
                              reps=max(ctx.config.latency_runs, 5))
    return {
        "target": planned["target"], "predicted": planned["predicted"], "measured": measured["measured"],
        "backend": planned["backend"], "threads": planned["threads"], "dense_ms": measured["dense_ms"],
        "pruned_ms": measured["pruned_ms"], "flops_kept": planned["flops_kept"], "uniform": planned["uniform"],
        "fit_error": planned["fit_error"], "checks": list(planned.get("checks", [])),
    }


def evaluate(config: EvaluateConfig, callbacks: Iterable[PipelineCallback] | PipelineCallback | None = None) -> Report:
    """Measure one saved model (dense state dict or a pruned output folder) like a prune run does."""
    from ..data import build_datasets
    from ..loading import META_FILE, create_model, load_pruned, load_weights, read_meta
    from ._input_size import check_input_size
    from .export import export_onnx
    from .measure import measure_model
    from .outdir import check_output_dir

    cb = CallbackList(callbacks)
    ckpt = Path(config.checkpoint).expanduser()
    if config.output_dir:
        check_output_dir(Path(config.output_dir).expanduser())
    pruned_dir = ckpt.is_dir() and (ckpt / META_FILE).is_file()
    meta = read_meta(ckpt) if pruned_dir else {}
    # a dense state dict: what a prune run would use
    dataset = config.dataset or meta.get("dataset") or declared_default(PipelineConfig, "dataset")
    image_size = config.image_size or meta.get("image_size") or declared_default(PipelineConfig, "image_size")
    _seed_everything(config.seed)
    _, test_ds, info = build_datasets(dataset, config.data_dir, image_size, config.seed)
    if pruned_dir:
        if meta.get("num_classes") != info.num_classes:
            raise ConfigError("dataset", f"{dataset} has {info.num_classes} classes, the model {meta.get('num_classes')}")
        model = load_pruned(config.model, ckpt)
    else:
        model, _ = create_model(config.model, info.num_classes, info.in_chans, image_size, info.mean, info.std)
        load_weights(model, read_source_weights(ckpt), str(ckpt))
    check_input_size(config.model, model, image_size, info.in_chans, lambda size: create_model(
        config.model, info.num_classes, info.in_chans, size, info.mean, info.std)[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    example = test_ds[0][0].unsqueeze(0).float()
    out = Path(config.output_dir).expanduser() if config.output_dir else None
    with tempfile.TemporaryDirectory(prefix="nni-harp-eval-") as tmp:
        work = out or Path(tmp)
        onnx = None
        if config.export_onnx:
            try:
                onnx = export_onnx(model, example, work / ONNX_FILE)
            except Exception as exc:  # noqa: BLE001 - onnx latency is optional here
                logger.warning("ONNX export failed, no onnxruntime latency: %s", exc)
            model.to(device)
        metrics, checks = measure_model(
            model, "evaluate", cb, test_ds, example, eps=config.eps, attack_steps=config.eval_attack_steps,
            samples=config.eval_samples, batch_size=config.batch_size, autoattack=config.autoattack,
            seed=config.seed, latency_runs=config.latency_runs,
            latency_threads=config.latency_threads, state_file=work / "evaluated_model.pt",
            onnx_file=onnx, device=device,
        )
    report = Report(
        model=config.model, mode=meta.get("mode", "dense") if pruned_dir else "dense", dataset=dataset, target={},
        dense=None if pruned_dir else metrics, pruned=metrics if pruned_dir else None,
        files={"checkpoint": str(ckpt)}, config=dict(config.__dict__), checks=checks,
        pruner=str(meta.get("pruner", "harp")) if pruned_dir else "none",
    )
    if out is not None:
        report.save(out, stem="evaluate_report")
    cb.on_stage_end("evaluate", {"metrics": metrics.__dict__})
    return report
