"""``build_loaders``: ``build_datasets`` plus ``DataLoader``s (seeded, optionally distributed)."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from .._checks import check_flag, check_int
from ._info import DatasetInfo
from .build import build_datasets, check_seed
from .errors import DatasetError

__all__ = ["build_loaders", "drops_last_batch"]

logger = logging.getLogger(__name__)


def build_loaders(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: int = 32,
    batch_size: int = 128,
    seed: int = 0,
    num_workers: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Train and test loaders for :func:`~nni_harp.data.build.build_datasets` ``(name, ...)``.

    The train loader shuffles, the test loader does not. The train sampler owns a generator seeded
    with ``seed``: the k-th epoch of a fresh loader has the same order on every run. Worker RNG
    seeds (hence augmentation with ``num_workers > 0``) come from the loader's generator, seeded
    with ``seed + rank``; with ``num_workers=0`` augmentation draws from the process's global torch
    RNG (seed it with ``torch.manual_seed`` for reproducible augmentation). ``drop_last`` applies to
    the train loader only; evaluation always sees every sample.

    With ``distributed=True`` and ``torch.distributed`` initialised, both loaders use a
    ``DistributedSampler`` (train shuffled with ``seed``; test in order, padded by the sampler to
    equal length per rank); call ``train_loader.sampler.set_epoch(epoch)`` each epoch. With
    ``distributed=True`` but no process group, a warning is logged and plain loaders are built.
    """
    for field_name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        check_int(value, low, error=lambda span: DatasetError(f"{field_name} must be an int {span}, got {value!r}"))
    check_seed(seed)
    for field_name, flag in (("distributed", distributed), ("drop_last", drop_last)):
        check_flag(flag, lambda: DatasetError(f"{field_name} must be a bool, got {flag!r}"))
    train_ds, test_ds, info = build_datasets(name, data_dir, image_size, seed)

    rank = 0
    train_sampler: Sampler[int]
    test_sampler: Sampler[int]
    if distributed and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        train_sampler = DistributedSampler(train_ds, shuffle=True, seed=seed, drop_last=drop_last)
        test_sampler = DistributedSampler(test_ds, shuffle=False, drop_last=False)
    else:
        # The sampler owns its generator, so the shuffle order depends only on ``seed`` and the
        # epoch, not on what else draws from the loader's generator (worker seeds).
        generator = torch.Generator().manual_seed(seed)
        train_sampler = RandomSampler(train_ds, generator=generator)  # type: ignore[arg-type]
        test_sampler = SequentialSampler(test_ds)  # type: ignore[arg-type]
    if distributed and not isinstance(train_sampler, DistributedSampler):
        logger.warning("distributed=True but torch.distributed is not initialised; building plain loaders")
    if drop_last and len(train_ds) < batch_size:  # type: ignore[arg-type]
        logger.warning(
            "drop_last=True with %d training samples < batch_size=%d: the train loader is empty",
            len(train_ds), batch_size,  # type: ignore[arg-type]
        )

    common = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
    }
    train_loader = _loader(train_ds, train_sampler, seed + rank, drop_last=drop_last, **common)
    test_loader = _loader(test_ds, test_sampler, seed + rank, drop_last=False, **common)
    return train_loader, test_loader, info


def _loader(
    dataset: Dataset, sampler: Sampler[int], seed: int, drop_last: bool, **kwargs: object
) -> DataLoader:
    """``seed`` seeds the loader's generator, from which the worker RNG seeds are drawn."""
    return DataLoader(
        dataset,
        sampler=sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,  # type: ignore[arg-type]
    )


def drops_last_batch(size: int, batch: int) -> bool:
    """Whether a training epoch over ``size`` samples in batches of ``batch`` leaves out its last,
    partial batch: whenever there is a full one, as timm's training loader does (the pipeline's
    epochs and the robust-pruning benchmark follow this rule).

    A batch of a few samples trains BatchNorm on the statistics of a few values where a ResNet's
    spatial size has shrunk to 1x1 (at 16-32 px), and the running statistics every epoch ends with
    carry a tenth of them. On the benchmark's digits split (898 training images in batches of 32: a
    last batch of 2), the held-out PGD-20 accuracy of a pruned test_resnet fell 55.6 -> 37.3 -> 7.7
    -> 2.2 % over the last three of 20 PGD-AT fine-tuning epochs, as the cosine schedule's learning
    rate went to zero; without that batch no epoch lost more than 2.5 points
    (``python benchmarks/finetune_stability.py [--keep-last-batch yes]``)."""
    return size > batch and size % batch != 0
