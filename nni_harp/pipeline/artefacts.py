"""The files of a prune run's output folder, by name, and reading a dense model's weights back
from a state dict file, a stage checkpoint or a run folder.

``model.pt``, ``model_meta.json`` and ``plan.json`` belong to :mod:`nni_harp.loading` (they are
what :func:`nni_harp.load_pruned` reads); the rest are named here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..loading import LoadError, read_state

__all__ = ["DENSE_MODEL_FILE", "ONNX_FILE", "PLOT_RATES", "PLOT_HISTORY", "read_source_weights"]

DENSE_MODEL_FILE = "dense_model.pt"
ONNX_FILE = "model.onnx"
PLOT_RATES = "kept_fraction.png"
PLOT_HISTORY = "pruning_history.png"


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
