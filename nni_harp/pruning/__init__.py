"""HARP and HYDRA pruning for NNI 3.0: learned scores and per-layer rates under a hardware budget."""
from __future__ import annotations

from .budget import CostBudget, WeightedBudget, hinge, project_keep, round_to_counts
from .errors import ConfigListError, MaskError, PruningError, SettingsError, StructureError
from .harp import STATE_VERSION, HARPPruner
from .hydra import HydraPruner
from .masks import apply_masks, fix_masks, release_masks
from .schedule import GammaSchedule
from .settings import HARPSettings

__all__ = [
    "HARPPruner",
    "HydraPruner",
    "STATE_VERSION",
    "HARPSettings",
    "GammaSchedule",
    "WeightedBudget",
    "CostBudget",
    "hinge",
    "project_keep",
    "round_to_counts",
    "fix_masks",
    "release_masks",
    "apply_masks",
    "PruningError",
    "SettingsError",
    "ConfigListError",
    "StructureError",
    "MaskError",
]
