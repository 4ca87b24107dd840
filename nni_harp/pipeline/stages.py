"""The stages of a prune run, as functions over a shared :class:`Context`.

Order: ``pretrain`` (or load ``--checkpoint``) -> ``evaluate-dense`` -> ``prune`` (HARP, see
:mod:`._harp`) -> ``finetune`` (fixed masks) -> ``speedup`` (structured only) -> ``export``
(ONNX) -> ``evaluate-pruned``. Training stages checkpoint every epoch through the
:class:`~.checkpoint.RunStore`; a stage marked finished there is skipped on ``--resume`` and its
saved result reused.

Under ``torchrun`` every rank runs the training stages (pretraining and fine-tuning wrapped in
``DistributedDataParallel``, pruning as :mod:`._prune` describes) on its share of each batch;
rank 0 alone evaluates, writes files, exports and reports (:attr:`Context.is_main`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed as hd
from .._io import atomic_save
from ..loading import MODEL_FILE, PLAN_FILE, LoadError, create_model, load_weights, read_state, write_meta
from ._loop import EpochLoop
from .callbacks import CallbackList
from .checkpoint import ResumeError, RunStore, first_line, restore_rank_rng
from .config import PipelineConfig
from .export import (
    count_params,
    export_onnx,
    measure_flops,
    onnx_latency_ms,
    state_dict_sizes,
    torch_latency_ms,
)
from .report import ModelMetrics

__all__ = [
    "STAGES",
    "Context",
    "make_context",
    "new_model",
    "adversarial_loss",
    "eval_attack",
    "stage_pretrain",
    "epoch_evaluator",
    "stage_evaluate",
    "stage_finetune",
    "stage_speedup",
    "stage_export",
    "measure_model",
    "read_source_weights",
]

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "evaluate-dense", "prune", "finetune", "speedup", "export", "evaluate-pruned")
DENSE_MODEL_FILE = "dense_model.pt"
ONNX_FILE = "model.onnx"


@dataclass
class Context:
    """What every stage needs: settings, data, the checkpoint store, callbacks, timings."""

    config: PipelineConfig
    store: RunStore
    cb: CallbackList
    device: torch.device
    train_ds: Dataset
    test_ds: Dataset
    info: Any  # nni_harp.data.DatasetInfo
    example: torch.Tensor  # one test image [1, C, S, S] on the CPU
    create_kwargs: dict[str, Any] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    latency: Any = None  # graph_passes.LatencyModel of a --budget latency run, fitted before training

    @property
    def out(self) -> Path:
        return self.config.out_path

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that evaluates, writes files and reports."""
        return self.rank == 0

    def loop(self, stage: str) -> EpochLoop:
        cfg = self.config
        return EpochLoop(stage, self.train_ds, cfg.batch_size, cfg.seed, self.store, self.cb,
                         cfg.max_train_batches, cfg.num_workers, self.rank, self.world)

    def save(self, obj: Any, path: Path) -> None:
        """``atomic_save`` on rank 0; nothing on the other ranks."""
        if self.is_main:
            atomic_save(obj, path)

    def parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel under torchrun, else itself."""
        if self.world <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def make_context(
    config: PipelineConfig, store: RunStore, cb: CallbackList, dist_info: hd.DistInfo | None = None
) -> Context:
    from ..data import build_datasets

    train_ds, test_ds, info = build_datasets(config.dataset, config.data_dir, config.image_size, config.seed)
    example = test_ds[0][0].unsqueeze(0).float()
    if dist_info is not None:
        device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    else:
        device, rank, world = torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0, 1
    return Context(config, store, cb, device, train_ds, test_ds, info, example, rank=rank, world=world)


def new_model(ctx: Context) -> nn.Module:
    """A fresh randomly initialised, normalisation-wrapped model (the same one every time).

    The first one is checked to take ``image_size`` inputs (a ViT's patch size must divide it, a
    deep CNN needs a minimum size): a :class:`ConfigError` names the sizes that work."""
    from ._input_size import check_input_size, input_size_error

    info, cfg = ctx.info, ctx.config
    first = ctx.create_kwargs is None

    def build(size: int) -> nn.Module:
        return create_model(cfg.model, info.num_classes, info.in_chans, size, info.mean, info.std)[0]

    try:
        model, kwargs = create_model(
            cfg.model, info.num_classes, info.in_chans, cfg.image_size, info.mean, info.std,
            create_kwargs=ctx.create_kwargs,
        )
    except (AssertionError, ValueError, RuntimeError) as exc:  # timm's checks of the image size, among others
        if not first:
            raise
        raise input_size_error(cfg.model, cfg.image_size, f"{type(exc).__name__}: {exc}", build, info.in_chans) from exc
    ctx.create_kwargs = kwargs
    model = model.to(ctx.device)
    if first:
        check_input_size(cfg.model, model, cfg.image_size, info.in_chans, build)
    return model


def model_meta(ctx: Context, plan: str | None) -> dict[str, Any]:
    info = ctx.info
    return {
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
    }


def adversarial_loss(ctx: Context) -> Any:
    from ..adversarial import AttackConfig, make_adversarial_loss

    cfg = ctx.config
    attack = AttackConfig(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps)
    return make_adversarial_loss(cfg.adv_loss, attack, beta=cfg.trades_beta)


def eval_attack(eps: float, steps: int) -> Any:
    from ..adversarial import AttackConfig

    return AttackConfig(eps=eps, step_size=2.5 * eps / steps, steps=steps)


def sgd(params: Any, lr: float, weight_decay: float, traced: bool = False) -> torch.optim.Optimizer:
    cls = torch.optim.SGD
    if traced:
        import nni

        cls = nni.trace(torch.optim.SGD)
    return cls(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def cosine(optimizer: torch.optim.Optimizer, epochs: int, traced: bool = False) -> Any:
    cls = torch.optim.lr_scheduler.CosineAnnealingLR
    if traced:
        import nni

        cls = nni.trace(cls)
    return cls(optimizer, T_max=max(epochs, 1))


def _timed(ctx: Context, stage: str, start: float) -> float:
    ctx.stage_seconds[stage] = ctx.stage_seconds.get(stage, 0.0) + time.perf_counter() - start
    return ctx.stage_seconds[stage]


def finish_stage(ctx: Context, stage: str, result: dict[str, Any], start: float) -> None:
    """Record a finished stage (with its wall time) in the progress record; tell the callbacks."""
    result["seconds"] = _timed(ctx, stage, start)
    ctx.store.mark_done(stage, result)
    ctx.cb.on_stage_end(stage, result)


def reuse_stage(ctx: Context, stage: str, what: str) -> dict[str, Any]:
    """A stage finished by an earlier (interrupted) invocation: reuse its result."""
    result = ctx.store.result(stage)
    if "seconds" in result:
        ctx.stage_seconds[stage] = float(result["seconds"])
    ctx.cb.on_message(f"{stage}: finished earlier, reusing {what}")
    ctx.cb.on_stage_end(stage, {"skipped": "finished earlier"})
    return result


# --------------------------------------------------------------------------------------------
def read_source_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a dense model from a state dict file, a stage checkpoint or a run folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (DENSE_MODEL_FILE, "checkpoints/dense.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise LoadError(f"{path} is a folder without {DENSE_MODEL_FILE}: not an nni-harp run folder")
    state = read_state(p)
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    return dict(state)


def stage_pretrain(ctx: Context, model: nn.Module) -> None:
    """Adversarial training from scratch, or loading ``--checkpoint``; saves the dense weights."""
    cfg, store, cb = ctx.config, ctx.store, ctx.cb
    dense_path = store.artefact("dense.pt")
    start_time = time.perf_counter()
    if store.is_done("pretrain"):
        load_weights(model, store.load_artefact(dense_path.name, ctx.device), str(dense_path))
        reuse_stage(ctx, "pretrain", "the dense weights")
        return
    if cfg.checkpoint is not None:
        load_weights(model, read_source_weights(cfg.checkpoint), str(cfg.checkpoint))
        cb.on_message(f"pretrain: skipped, weights from {cfg.checkpoint}")
        result: dict[str, Any] = {"source": str(cfg.checkpoint)}
    else:
        loop = ctx.loop("pretrain")
        optimizer = sgd(model.parameters(), cfg.pretrain_lr, cfg.weight_decay)
        scheduler = cosine(optimizer, cfg.pretrain_epochs)
        start = _resume_training(store, cb, "pretrain", model, optimizer, scheduler)
        step = _training_step(ctx)
        metrics = loop.run(
            ctx.parallel(model), [optimizer], [scheduler], step, cfg.pretrain_epochs, start,
            lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()},
        )
        hd.broadcast_buffers(model)  # BatchNorm statistics of rank 0 (DDP syncs them only before a forward)
        result = {"epochs": cfg.pretrain_epochs, "last": metrics[-1] if metrics else {}}
    ctx.save(model.state_dict(), dense_path)
    finish_stage(ctx, "pretrain", result, start_time)


def _resume_training(store: RunStore, cb: CallbackList, stage: str, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Load the last finished epoch of a weight-training ``stage`` (model, optimizer, scheduler,
    random state) when there is one; the epoch to start from."""
    ck = store.load_epoch(stage, required=("model", "optimizer", "scheduler"))
    if ck is None:
        return 0
    try:
        model.load_state_dict(ck.state["model"])
        optimizer.load_state_dict(ck.state["optimizer"])
        scheduler.load_state_dict(ck.state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        path = store.stage_path(stage)
        raise ResumeError(f"checkpoint {path} does not fit this run ({first_line(exc)}); "
                          f"delete it to redo the {stage} stage, or start this run again with --overwrite") from exc
    restore_rank_rng(ck.state)
    cb.on_message(f"{stage}: resuming after epoch {ck.epoch + 1}")
    return ck.next_epoch


def _training_step(ctx: Context) -> Any:
    from ..adversarial import training_step_for

    return training_step_for(adversarial_loss(ctx))


def epoch_evaluator(ctx: Context, model: nn.Module) -> Any:
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


# --------------------------------------------------------------------------------------------
class _ProgressLoader:
    """A loader that reports each batch to the callbacks (for evaluation progress bars)."""

    def __init__(self, loader: DataLoader, cb: CallbackList, stage: str) -> None:
        self.loader, self.cb, self.stage = loader, cb, stage

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for step, batch in enumerate(self.loader):
            yield batch
            self.cb.on_step(self.stage, 0, step, {})


def eval_loader(ctx_or_ds: Dataset, samples: int, batch_size: int) -> DataLoader:
    n = min(samples, len(ctx_or_ds))  # type: ignore[arg-type]
    return DataLoader(Subset(ctx_or_ds, range(n)), batch_size=batch_size, shuffle=False)


def measure_model(
    model: nn.Module,
    stage: str,
    cb: CallbackList,
    test_ds: Dataset,
    example: torch.Tensor,
    *,
    eps: float,
    attack_steps: int,
    samples: int,
    batch_size: int,
    autoattack: str,
    seed: int,
    latency_runs: int,
    state_file: Path,
    onnx_file: Path | None,
    device: torch.device,
) -> tuple[ModelMetrics, dict[str, float]]:
    """Accuracies (clean / PGD / AutoAttack), counts, sizes and latencies of ``model``."""
    from ..adversarial import evaluate_robustness

    loader = eval_loader(test_ds, samples, batch_size)
    cb.on_stage_start(stage, 1, 0, len(loader))
    cb.on_epoch_start(stage, 0, len(loader))
    model.eval()
    rob = evaluate_robustness(
        model, _ProgressLoader(loader, cb, stage), eval_attack(eps, attack_steps),
        autoattack=autoattack != "off", device=device,
        autoattack_version=autoattack if autoattack != "off" else "standard", seed=seed,
    )
    model.cpu()
    params, nonzero = count_params(model)
    flops, effective = measure_flops(model, example)
    file_bytes, compressed = state_dict_sizes(model, state_file)
    lat_torch = torch_latency_ms(model, example, runs=latency_runs)
    lat_onnx = None
    checks: dict[str, float] = {}
    if onnx_file is not None and onnx_file.is_file():
        lat_onnx, out = onnx_latency_ms(onnx_file, example, runs=latency_runs)
        with torch.no_grad():
            ref = model(example[:1])
        checks["onnx_max_abs_diff"] = float((torch.as_tensor(out) - ref).abs().max())
    model.to(device)
    metrics = ModelMetrics(
        clean_acc=rob.clean, pgd_acc=rob.pgd, autoattack_acc=rob.autoattack, eval_samples=rob.n,
        params=params, nonzero_params=nonzero, flops=flops, effective_flops=effective,
        file_bytes=file_bytes, compressed_bytes=compressed,
        latency_ms_torch=lat_torch, latency_ms_onnx=lat_onnx,
    )
    summary = {"clean": rob.clean, "pgd": rob.pgd}
    if rob.autoattack is not None:
        summary["autoattack"] = rob.autoattack
    cb.on_epoch_end(stage, 0, summary)
    return metrics, checks


def stage_evaluate(ctx: Context, model: nn.Module, stage: str, state_file: Path, onnx_file: Path | None) -> ModelMetrics:
    """Measure ``model``; the result is stored in the progress record (reused on resume)."""
    cfg, store = ctx.config, ctx.store
    if store.is_done(stage):
        res = reuse_stage(ctx, stage, "its numbers")
        ctx.checks.update(res.get("checks", {}))
        return ModelMetrics.from_dict(res["metrics"])
    start = time.perf_counter()
    metrics, checks = measure_model(
        model, stage, ctx.cb, ctx.test_ds, ctx.example,
        eps=cfg.eps, attack_steps=cfg.eval_attack_steps, samples=cfg.eval_samples,
        batch_size=max(cfg.batch_size, 100), autoattack=cfg.autoattack, seed=cfg.seed,
        latency_runs=cfg.latency_runs, state_file=state_file, onnx_file=onnx_file, device=ctx.device,
    )
    prefix = "dense" if stage == "evaluate-dense" else "pruned"
    checks = {f"{prefix}_{k}": v for k, v in checks.items()}
    ctx.checks.update(checks)
    finish_stage(ctx, stage, {"metrics": metrics.__dict__, "checks": checks}, start)
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


# --------------------------------------------------------------------------------------------
def stage_finetune(ctx: Context, model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Adversarial fine-tuning of the kept weights with the masks fixed; bakes the masks at the end."""
    from ..pruning import fix_masks, release_masks

    cfg, store, cb = ctx.config, ctx.store, ctx.cb
    done_path = store.artefact("finetuned.pt")
    start_time = time.perf_counter()
    if store.is_done("finetune"):
        load_weights(model, store.load_artefact(done_path.name, ctx.device), str(done_path))
        reuse_stage(ctx, "finetune", "the fine-tuned weights")
        return
    result: dict[str, Any] = {"epochs": cfg.finetune_epochs}
    fix_masks(model, masks)
    try:
        if cfg.finetune_epochs > 0:
            optimizer = sgd([p for p in model.parameters() if p.requires_grad], cfg.finetune_lr, cfg.weight_decay)
            scheduler = cosine(optimizer, cfg.finetune_epochs)
            start = _resume_training(store, cb, "finetune", model, optimizer, scheduler)
            metrics = ctx.loop("finetune").run(
                ctx.parallel(model), [optimizer], [scheduler], _training_step(ctx), cfg.finetune_epochs, start,
                lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict()},
                evaluate=epoch_evaluator(ctx, model),
            )
            result["last"] = metrics[-1] if metrics else {}
    finally:
        release_masks(model)
    hd.broadcast_buffers(model)  # BatchNorm statistics of rank 0 (DDP syncs them only before a forward)
    if ctx.world > 1:
        weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        ctx.checks["ranks_weights_max_abs_diff"] = hd.max_difference(weights)
    ctx.save(model.state_dict(), done_path)
    finish_stage(ctx, "finetune", result, start_time)


def stage_speedup(ctx: Context, model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Structured: remove the masked channels (graph_passes.ModelSpeedup) and save the plan.

    Checks the invariant that the shrunk model computes what the masked one does. Unstructured:
    nothing to remove; the zeros stay in the state dict. Either way the pruned weights and
    ``model_meta.json`` are written so that :func:`nni_harp.load_pruned` can rebuild the model.
    """
    cfg, cb = ctx.config, ctx.cb
    start = time.perf_counter()
    out = ctx.out
    plan_name: str | None = None
    cb.on_stage_start("speedup", 1, 0, 1)
    cb.on_epoch_start("speedup", 0, 1)
    if cfg.mode == "structured":
        import graph_passes

        model = model.cpu().eval()
        masked = copy.deepcopy(model)
        example = (ctx.example,)
        plan = graph_passes.PruningPlan.from_masks(masked, example, _plain_masks(masks))
        small = graph_passes.ModelSpeedup(model, ctx.example, _plain_masks(masks)).speedup_model(inplace=False)
        small = small.eval()
        batch = torch.stack([ctx.test_ds[i][0] for i in range(min(16, len(ctx.test_ds)))])  # type: ignore[arg-type]
        with torch.no_grad():
            ref, got = masked(batch), small(batch)
        diff = float((ref - got).abs().max())
        ctx.checks["speedup_max_abs_diff"] = diff
        scale = float(ref.abs().max()) or 1.0
        if not math.isfinite(diff) or diff > 1e-3 * max(scale, 1.0):
            logger.warning("speedup changed the outputs: max |masked - pruned| = %.3g (logits up to %.3g)", diff, scale)
        plan.save(out / PLAN_FILE)
        plan_name = PLAN_FILE
        model = small.to(ctx.device)
        result: dict[str, Any] = {"max_abs_diff": diff}
    else:
        result = {"skipped": "unstructured: zeros are stored in the state dict"}
    atomic_save(model.state_dict(), out / MODEL_FILE)
    write_meta(out, model_meta(ctx, plan_name))
    cb.on_step("speedup", 0, 0, {})
    cb.on_epoch_end("speedup", 0, {k: v for k, v in result.items() if isinstance(v, float)})
    _timed(ctx, "speedup", start)
    cb.on_stage_end("speedup", result)
    return model


def _plain_masks(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {p: t.detach().cpu() for p, t in d.items()} for m, d in masks.items()}


def stage_export(ctx: Context, model: nn.Module) -> Path | None:
    """Export the pruned model to ``model.onnx`` (skipped with ``export_onnx=False``)."""
    cb = ctx.cb
    start = time.perf_counter()
    cb.on_stage_start("export", 1, 0, 1)
    cb.on_epoch_start("export", 0, 1)
    path: Path | None = None
    if ctx.config.export_onnx:
        try:
            path = export_onnx(model, ctx.example, ctx.out / ONNX_FILE)
        finally:
            model.to(ctx.device)
    cb.on_step("export", 0, 0, {})
    cb.on_epoch_end("export", 0, {})
    _timed(ctx, "export", start)
    cb.on_stage_end("export", {"path": str(path) if path else None})
    return path
