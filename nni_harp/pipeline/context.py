"""What every stage shares: the run's :class:`Context`, and :func:`stage`, the one wrapper of a
stage's body.

    with stage(ctx, "pretrain", reuse="the dense weights") as s:
        if s.done:                       # finished by an earlier invocation (--resume)
            load_weights(model, s.load("dense.pt"), ...)
            return
        ...
        s.save(model.state_dict(), "dense.pt")
        s.result = {"epochs": ...}

:func:`stage` times the stage, tells the callbacks (the stage's end; for a stage without epochs
also its one pass), records it in the progress record (``mark_done``, with its wall time) and,
on ``--resume``, reuses what a finished stage saved. Under ``torchrun`` every rank runs the
training stages; rank 0 alone evaluates, writes files and reports (:attr:`Context.is_main`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as hd
from .._io import atomic_save
from ..loading import create_model
from ._loop import EpochLoop
from .callbacks import CallbackList
from .checkpoint import ResumeError, RunStore, first_line, restore_rank_rng
from .config import PipelineConfig

__all__ = ["Context", "make_context", "new_model", "StageRun", "stage"]


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


@dataclass
class StageRun:
    """One stage of one invocation, as the body of ``with stage(ctx, name) as s`` sees it."""

    ctx: Context
    name: str
    done: bool  # finished by an earlier invocation: reuse what it saved, do not redo it
    result: dict[str, Any] = field(default_factory=dict)  # done: the saved result; else what to record
    metrics: dict[str, float] = field(default_factory=dict)  # a one-pass stage: the values of its pass

    def artefact(self, filename: str) -> Path:
        """Where the stage keeps ``filename`` for the stages after it (under ``checkpoints/``)."""
        return self.ctx.store.artefact(filename)

    def save(self, obj: Any, filename: str) -> None:
        """Keep ``obj`` as ``filename`` (rank 0 writes, atomically)."""
        self.ctx.save(obj, self.artefact(filename))

    def load(self, filename: str, nested: bool = False) -> dict[str, Any]:
        """What a finished stage saved as ``filename``, on the run's device (``nested``: masks)."""
        return self.ctx.store.load_artefact(filename, self.ctx.device, nested=nested)

    def loop(self) -> EpochLoop:
        """The epoch loop of this stage (its per-epoch checkpoints are ``checkpoints/<name>.pt``)."""
        return self.ctx.loop(self.name)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
        """Load the last finished epoch of a weight-training stage (model, optimizer, scheduler,
        random state) when there is one; the epoch to start from."""
        store, stage = self.ctx.store, self.name
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
        self.ctx.cb.on_message(f"{stage}: resuming after epoch {ck.epoch + 1}")
        return ck.next_epoch


@contextlib.contextmanager
def stage(ctx: Context, name: str, *, reuse: str | None = None, one_pass: bool = False) -> Iterator[StageRun]:
    """Run the body as stage ``name``: time it, tell the callbacks, record it.

    ``reuse`` (what a finished stage gives back, in words): the stage is recorded in the progress
    record when it finishes (``mark_done`` with ``s.result`` and its wall time), and in a later
    invocation that finds it there ``s.done`` is set, ``s.result`` is the saved result, and the
    body reuses what the stage saved instead of redoing it. Without ``reuse`` the stage is run
    every time and not recorded (speedup, export: they rewrite their files).

    ``one_pass``: a stage without epochs shows as one epoch of one step, begun on entry and ended
    (with ``s.metrics``) when the body finishes. An exception from the body passes through with
    nothing recorded.
    """
    store, cb = ctx.store, ctx.cb
    done = reuse is not None and store.is_done(name)
    run = StageRun(ctx, name, done, store.result(name) if done else {})
    start = time.perf_counter()
    if one_pass and not done:
        cb.on_stage_start(name, 1, 0, 1)
        cb.on_epoch_start(name, 0, 1)
    yield run
    if done:
        if "seconds" in run.result:
            ctx.stage_seconds[name] = float(run.result["seconds"])
        cb.on_message(f"{name}: finished earlier, reusing {reuse}")
        cb.on_stage_end(name, {"skipped": "finished earlier"})
        return
    if one_pass:
        cb.on_step(name, 0, 0, run.metrics)
        cb.on_epoch_end(name, 0, run.metrics)
    ctx.stage_seconds[name] = ctx.stage_seconds.get(name, 0.0) + time.perf_counter() - start
    if reuse is not None:
        run.result["seconds"] = ctx.stage_seconds[name]
        store.mark_done(name, run.result)
    cb.on_stage_end(name, run.result)
