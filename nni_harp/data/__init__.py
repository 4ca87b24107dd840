"""Datasets for nni-harp: ``digits`` (bundled), ``cifar10``, ``svhn``, ``imagefolder`` (from disk).

Samples are ``(float32 [3, S, S] in [0, 1], int label)`` and are not normalised; ``DatasetInfo``
carries the mean/std for the model's normalisation wrapper. Nothing is ever downloaded.
"""
from __future__ import annotations

from ._info import DatasetInfo
from .build import DATASETS, build_datasets
from .errors import DatasetError
from .loaders import build_loaders, drops_last_batch

__all__ = ["DATASETS", "DatasetInfo", "DatasetError", "build_datasets", "build_loaders", "drops_last_batch"]
