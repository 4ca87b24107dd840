"""nni-harp: HARP (Holistic Adversarially Robust Pruning) as an NNI 3.0 pruner for timm models."""
from __future__ import annotations

__version__ = "0.1.0"
from .loading import load_pruned
from .pruning import HARPPruner, HARPSettings, HydraPruner

__all__ = ["__version__", "load_pruned", "HARPPruner", "HydraPruner", "HARPSettings"]
