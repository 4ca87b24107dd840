"""Moved: the ``prune`` stage is :mod:`nni_harp.pipeline.stages.prune`. The names below stay
importable from here for code written against the old layout."""
from __future__ import annotations

from .stages._pruning import masks_sparsity, pruner_config_list, uniform_target
from .stages.prune import stage_prune

__all__ = ["stage_prune", "pruner_config_list", "uniform_target", "masks_sparsity"]
