"""Small ``torch.distributed`` helpers for running the pipeline under ``torchrun`` (DDP).

``init_from_env()`` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and starts a process group: ``nccl`` when CUDA is available,
``gloo`` otherwise. Without those variables it does nothing and every helper degrades to the
single-process behaviour, so the same code runs with and without torchrun.

HARP's scores and rates are parameters the pruner adds *after* a model would be wrapped in
``DistributedDataParallel``, so DDP never sees them: while pruning, their gradients are averaged
explicitly with :func:`all_reduce_grads` before the optimizer step (identical updates, hence
identical scores, rates and masks on every rank); pretraining and fine-tuning use plain DDP.
:func:`on_main` runs a step (a file write, a check of the output folder) on rank 0 only and
tells the other ranks whether it failed, so that an error there stops every rank instead of
leaving the others waiting in a collective.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "DistributedError",
    "init_from_env",
    "env_world_size",
    "env_rank",
    "on_main",
    "broadcast_object",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_grads",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_module",
    "broadcast_masks",
    "broadcast_buffers",
    "max_difference",
    "main_process_first",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# how long a rank waits in a collective for the others (rank 0 alone evaluates the models, which
# can take a while on a CPU); NNI_HARP_DIST_TIMEOUT_MIN overrides it
DEFAULT_TIMEOUT_MIN = 180


class DistributedError(RuntimeError):
    """A step that ran on another rank failed; the message carries that rank's error."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): log, checkpoint and report only there."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as torchrun set it (0 outside torchrun); readable before the group exists."""
    return int(os.environ.get("RANK", "0"))


def _timeout() -> datetime.timedelta:
    text = os.environ.get("NNI_HARP_DIST_TIMEOUT_MIN", str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(text)
    except ValueError as exc:
        raise ValueError(f"NNI_HARP_DIST_TIMEOUT_MIN must be a number of minutes, got {text!r}") from exc
    return datetime.timedelta(minutes=minutes)


def init_from_env(backend: str | None = None) -> DistInfo:
    """Start the process group described by torchrun's environment (no-op without it)."""
    env_world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if env_world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        if backend == "nccl":
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible, one per process is "
                    "needed with nccl; start at most that many processes per machine (torchrun --nproc_per_node)"
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=_timeout())
        logger.info("process group %s: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    elif dist.is_initialized():
        backend = dist.get_backend()
    else:
        backend = None
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank(), world_size(), local_rank, backend, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; every rank returns when it is done (``fn``'s result on rank 0,
    None elsewhere). An exception on rank 0 is re-raised there and, as a
    :class:`DistributedError` with its message, on the other ranks."""
    if not is_distributed():
        return fn()
    failure: BaseException | None = None
    result: T | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
            failure = exc
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise DistributedError(f"rank 0 failed: {message}")
    return result


def all_reduce_grads(module: nn.Module) -> None:
    """Average the gradients of every parameter of ``module`` that has one, over all ranks.

    Parameters are visited in registration order, which is the same on every rank; a parameter
    whose gradient is ``None`` on one rank must be ``None`` on all (true for the same model and
    the same loss).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself in a single process)."""
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1).clone()
    if is_distributed():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return float(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (the values themselves in a single process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_distributed():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (same start everywhere)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics: each rank updates them from its
    own shard) to every rank, as DDP does before each forward."""
    if not is_distributed():
        return
    for t in module.buffers():
        dist.broadcast(t.data, src=src)


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU with nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_masks(masks: Mapping[str, Mapping[str, torch.Tensor]], src: int = 0) -> None:
    """Overwrite every rank's masks (NNI format, same keys on all ranks) with rank ``src``'s, in place."""
    if not is_distributed():
        return
    device = _comm_device()
    for name in sorted(masks):
        for target in sorted(masks[name]):
            tensor = masks[name][target]
            moved = tensor.to(device)
            dist.broadcast(moved, src=src)
            if moved is not tensor:
                tensor.copy_(moved)


def max_difference(tensors: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference of any tensor between this rank and rank 0 (all ranks
    get the same answer; 0.0 in a single process)."""
    if not is_distributed():
        return 0.0
    device = _comm_device()
    worst = torch.zeros(1, dtype=torch.float64, device=device)
    for key in sorted(tensors):
        mine = tensors[key].detach().to(device=device, dtype=torch.float64)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        if mine.numel():
            worst = torch.maximum(worst, (mine - ref).abs().max().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())
