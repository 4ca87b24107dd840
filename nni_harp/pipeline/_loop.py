"""The epoch loop shared by pretraining, HARP pruning (inside NNI's training_func) and fine-tuning.

One epoch: shuffle with a generator seeded from (seed, stage, epoch) so that a resumed run sees the
same batches, take a step per batch, stop at the first non-finite loss (before the optimizer
step, so the weights stay good), then write the stage checkpoint.

Under ``torchrun`` (``world > 1``) a ``DistributedSampler`` with the same seed gives each rank
its share of every batch: the ranks' batches at step s together are exactly the batch a single
process with the same ``batch_size`` (the *global* batch) takes at step s. Epoch metrics are
summed over the ranks before they are reported.
"""
from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import distributed as hd
from ..data import drops_last_batch
from .callbacks import PipelineCallback
from .checkpoint import RunStore

__all__ = ["NonFiniteLossError", "EpochLoop", "epoch_loader", "OutputTap"]

logger = logging.getLogger(__name__)

StepFn = Callable[[Any, nn.Module], Any]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the stage stopped before the bad update."""

    def __init__(self, stage: str, epoch: int, step: int, value: float, checkpoint: str | None) -> None:
        kept = (
            f"the last good checkpoint ({checkpoint}) is kept; --resume continues from it"
            if checkpoint
            else "no epoch of this stage had finished, so there is no checkpoint of it to keep"
        )
        super().__init__(
            f"stage {stage!r}, epoch {epoch + 1}, step {step + 1}: loss is {value}; stopped. {kept}. "
            "Lower the learning rate or --eps and try again."
        )
        self.stage, self.epoch, self.step = stage, epoch, step


def _stage_seed(seed: int, stage: str, epoch: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) + epoch * 7919) % (2**63 - 1)


def _shard(size: int, batch_size: int, world: int) -> tuple[int, int]:
    """(samples, batch size) of one rank: the sampler pads ``size`` to a multiple of ``world``."""
    return -(-size // world), batch_size // world


def epoch_loader(
    dataset: Dataset, batch_size: int, seed: int, stage: str, epoch: int, num_workers: int = 0,
    rank: int = 0, world: int = 1,
) -> DataLoader:
    """A shuffled loader whose order depends only on (seed, stage, epoch).

    ``batch_size`` is the global batch; with ``world > 1`` this rank gets ``batch_size // world``
    of each (see the module docstring). The last, partial batch is left out
    (:func:`nni_harp.data.drops_last_batch`).
    """
    stage_seed = _stage_seed(seed, stage, epoch)
    size, per_rank = _shard(len(dataset), batch_size, world)  # type: ignore[arg-type]
    drop_last = drops_last_batch(size, per_rank)
    # one permutation per (seed, stage, epoch), dealt out over the ranks (world 1: all of it).
    # The loader's own generator only seeds its workers, so it draws nothing from the global RNG
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=stage_seed)
    gen = torch.Generator()
    gen.manual_seed(stage_seed)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      generator=gen)


class OutputTap:
    """Remembers the last training-mode output of a model whose batch matches the labels.

    Attacks run in eval mode and are ignored, so for PGD-AT this is the adversarial batch the loss
    was computed on; it gives the running (training) accuracy without an extra forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and isinstance(output, torch.Tensor):
            self.output = output.detach()

    def correct(self, y: torch.Tensor) -> int | None:
        out, self.output = self.output, None
        if out is None or out.dim() != 2 or out.shape[0] != y.shape[0]:
            return None
        return int((out.argmax(dim=1).cpu() == y.cpu()).sum())

    def close(self) -> None:
        self._handle.remove()


@dataclass
class EpochLoop:
    """Run epochs ``start_epoch .. epochs-1`` of one stage; see the module docstring."""

    stage: str
    dataset: Dataset
    batch_size: int
    seed: int
    store: RunStore
    callbacks: PipelineCallback
    max_batches: int | None = None
    num_workers: int = 0
    rank: int = 0
    world: int = 1

    def steps_per_epoch(self) -> int:
        size, batch = _shard(len(self.dataset), self.batch_size, self.world)  # type: ignore[arg-type]
        n = size // batch if drops_last_batch(size, batch) else -(-size // batch)  # the partial batch left out, or not
        return min(n, self.max_batches) if self.max_batches else n

    def run(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        step_fn: StepFn,
        epochs: int,
        start_epoch: int,
        state_fn: Callable[[], Mapping[str, Any]] | None,
        max_steps: int | None = None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        stop_epoch: int | None = None,
        announce: bool = True,
        grad_sync: Callable[[], None] | None = None,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
    ) -> list[dict[str, float]]:
        """Train epochs ``start_epoch .. min(stop_epoch, epochs) - 1`` of ``epochs``.

        After each epoch ``state_fn()`` gives the checkpoint payload, which is saved (``None``:
        the caller checkpoints itself, as the prune stage does once NNI's pruner has finished its
        own end-of-epoch bookkeeping). ``announce`` sends ``on_stage_start`` first.
        ``grad_sync`` runs between backward and the optimizer steps (averaging gradients over
        ranks for a model DDP does not wrap); ``evaluate()`` adds its values to each epoch's
        metrics.
        """
        total = self.steps_per_epoch()
        cb = self.callbacks
        if announce:
            cb.on_stage_start(self.stage, epochs, start_epoch, total)
        ckpt = self.store.stage_path(self.stage)
        results: list[dict[str, float]] = []
        tap = OutputTap(model)
        steps_done = 0
        end = epochs if stop_epoch is None else min(stop_epoch, epochs)
        try:
            for epoch in range(start_epoch, end):
                if max_steps is not None and steps_done >= max_steps:
                    break
                model.train()
                cb.on_epoch_start(self.stage, epoch, total)
                loss_sum, seen, correct, counted = 0.0, 0, 0, 0
                loader = epoch_loader(self.dataset, self.batch_size, self.seed, self.stage, epoch, self.num_workers,
                                      self.rank, self.world)
                for step, batch in enumerate(loader):
                    if step >= total or (max_steps is not None and steps_done >= max_steps):
                        break
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    out = step_fn(batch, model)
                    loss = _loss_of(out)
                    value = float(loss.detach())
                    bad = not bool(torch.isfinite(loss.detach()).all())
                    if self.world > 1:  # every rank stops together, none waits in a collective
                        bad = hd.all_reduce_sum([float(bad)])[0] > 0
                    if bad:
                        raise NonFiniteLossError(self.stage, epoch, step, value, str(ckpt) if ckpt.is_file() else None)
                    loss.backward()
                    if grad_sync is not None:
                        grad_sync()
                    for opt in optimizers:
                        opt.step()
                    steps_done += 1
                    y = batch[1]
                    n = int(y.shape[0])
                    loss_sum += value * n
                    seen += n
                    c = tap.correct(y)
                    if c is not None:
                        correct += c
                        counted += n
                    running = {"loss": loss_sum / seen}
                    if counted:
                        running["acc"] = correct / counted
                    cb.on_step(self.stage, epoch, step, running)
                if self.world > 1:
                    loss_sum, seen, correct, counted = hd.all_reduce_sum([loss_sum, seen, correct, counted])
                metrics = {"loss": loss_sum / max(seen, 1)}
                if counted:
                    metrics["acc"] = correct / counted
                if optimizers:
                    metrics["lr"] = float(optimizers[0].param_groups[0]["lr"])
                with warnings.catch_warnings():
                    # NNI patches optimizer.step after the scheduler was built, which torch flags
                    warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden.*")
                    for sched in schedulers:
                        sched.step()
                if evaluate is not None:
                    metrics.update(evaluate())
                if on_epoch_end is not None:
                    on_epoch_end(epoch, metrics)
                if state_fn is not None:
                    self.store.save_epoch(self.stage, epoch, dict(state_fn()))
                logger.info("%s epoch %d/%d: %s", self.stage, epoch + 1, epochs, _fmt(metrics))
                cb.on_epoch_end(self.stage, epoch, metrics)
                results.append(metrics)
        finally:
            tap.close()
        return results


def _loss_of(out: Any) -> torch.Tensor:
    """NNI's training_step may return a loss, a tuple starting with it, or a dict with 'loss'."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    raise TypeError(f"training step returned {type(out).__name__}; expected a loss tensor")


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
