"""Pruning plans: which channels of which group are kept, saved as JSON, re-applied to a fresh model."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import fx, nn

from ._atomic import atomic_write_text
from .dependency import analyze
from .errors import PlanError
from .groups import ChannelGroup, keep_from_masks
from ._masks import bake, normalize_masks
from .speedup import apply_keep
from .tracing import as_tuple, trace

__all__ = ["PruningPlan"]

FORMAT = "graph_passes.pruning_plan/1"


def _fingerprint(groups: list[ChannelGroup]) -> list[dict[str, Any]]:
    return [{"size": g.size, "members": sorted(f"{m.qualified_name}:{m.dim}" for m in g.members)} for g in groups]


@dataclass(frozen=True)
class PruningPlan:
    """Kept channel indices per channel group of a model, plus what is needed to check that a
    model it is applied to has the same groups (sizes and member names)."""

    kept: dict[int, list[int]]
    groups: list[dict[str, Any]]
    input_shapes: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_keep(cls, groups: list[ChannelGroup], keep: Mapping[int, torch.Tensor], example_inputs: Any = None) -> "PruningPlan":
        kept = {g.id: torch.nonzero(torch.as_tensor(keep[g.id]).bool()).flatten().tolist() for g in groups if g.id in keep}
        kept = {gid: idx for gid, idx in kept.items() if len(idx) < groups[gid].size}
        shapes = [list(t.shape) for t in as_tuple(example_inputs) if isinstance(t, torch.Tensor)] if example_inputs is not None else []
        return cls(kept, _fingerprint(groups), shapes)

    @classmethod
    def from_masks(cls, model: nn.Module, example_inputs: Any, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> "PruningPlan":
        """The plan that :class:`ModelSpeedup` would carry out for these NNI-format masks."""
        gm = trace(copy.deepcopy(model).eval(), example_inputs)
        groups = analyze(gm).groups
        return cls.from_keep(groups, keep_from_masks(groups, masks), example_inputs)

    def keep_vectors(self, groups: list[ChannelGroup]) -> dict[int, torch.Tensor]:
        self.check(groups)
        keep = {}
        for gid, idx in self.kept.items():
            vec = torch.zeros(groups[gid].size, dtype=torch.bool)
            vec[torch.tensor(idx, dtype=torch.long)] = True
            keep[gid] = vec
        return keep

    def check(self, groups: list[ChannelGroup]) -> None:
        found = _fingerprint(groups)
        if len(found) != len(self.groups):
            raise PlanError(f"the plan is for a model with {len(self.groups)} channel groups, this model has {len(found)}: "
                            "build the same architecture (same timm name and arguments) before applying it")
        for gid, (want, have) in enumerate(zip(self.groups, found)):
            if want != have:
                raise PlanError(f"channel group {gid} differs: plan has {want['size']} channels over {want['members'][:3]}..., "
                                f"model has {have['size']} over {have['members'][:3]}...")
        for gid, idx in self.kept.items():
            if not idx or min(idx) < 0 or max(idx) >= found[gid]["size"]:
                raise PlanError(f"plan keeps channels {idx[:5]}... of group {gid}, which has {found[gid]['size']}")

    def apply(self, model: nn.Module, example_inputs: Any = None, masks: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> fx.GraphModule:
        """Remove the planned channels from a copy of ``model`` (e.g. freshly built by name)."""
        if example_inputs is None:
            if not self.input_shapes:
                raise PlanError("the plan stores no input shape: pass example_inputs")
            example_inputs = tuple(torch.randn(*s) for s in self.input_shapes)
        model = copy.deepcopy(model).eval()
        if masks:
            bake(model, normalize_masks(model, masks))
        gm = trace(model, example_inputs)
        analysis = analyze(gm)
        return apply_keep(gm, analysis, self.keep_vectors(analysis.groups))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "kept": {str(k): v for k, v in sorted(self.kept.items())},
                           "groups": self.groups, "input_shapes": self.input_shapes}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"not a pruning plan (invalid JSON: {exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"not a pruning plan: expected format {FORMAT!r}")
        return cls({int(k): [int(i) for i in v] for k, v in data["kept"].items()}, data["groups"], data.get("input_shapes", []))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically (temporary file, then rename)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PruningPlan":
        target = Path(path)
        if not target.is_file():
            raise PlanError(f"pruning plan not found: {target}")
        return cls.from_json(target.read_text(encoding="utf-8"))
