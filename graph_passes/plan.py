"""Pruning plans: which channels of which group are kept, saved as JSON, re-applied to a fresh model."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import fx

from ._atomic import atomic_write_text
from .dependency import Analysis, Traceable, analysis_for
from .errors import PlanError
from .groups import ChannelGroup, group_masks, keep_from_masks
from ._masks import bake, masked_copy, normalize_masks
from .speedup import apply_keep
from .tracing import as_tuple

__all__ = ["PruningPlan"]

FORMAT = "graph_passes.pruning_plan/1"


def _given_trace(model: Traceable) -> bool:
    """A traced ``GraphModule`` or its analysis (used as they are), not a plain module (traced on an
    eval-mode copy)."""
    return isinstance(model, (Analysis, fx.GraphModule))


def _fingerprint(groups: list[ChannelGroup]) -> list[dict[str, Any]]:
    return [{"size": g.size, "members": sorted(f"{m.qualified_name}:{m.dim}" for m in g.members)} for g in groups]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_schema(data: Any, source: str) -> None:
    """The parsed JSON of a plan has the fields :meth:`PruningPlan.to_json` writes, of their types."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PlanError(f"{source} is not a pruning plan: field 'format' is {found!r}, expected {FORMAT!r}")
    unknown = sorted(set(data) - {"format", "kept", "groups", "input_shapes"})
    if unknown:
        raise PlanError(f"{source}: unknown field {unknown[0]!r}")
    groups = data.get("groups")
    if not isinstance(groups, list):
        raise PlanError(f"{source}: field 'groups' is missing or not a list")
    for gid, group in enumerate(groups):
        if not isinstance(group, dict) or not _is_int(group.get("size")) or not isinstance(group.get("members"), list) \
                or not all(isinstance(m, str) for m in group["members"]):
            raise PlanError(f"{source}: group {gid}: fields 'size' (an integer) and 'members' (a list of names) "
                            f"expected, found {str(group)[:80]}")
    kept = data.get("kept")
    if not isinstance(kept, dict):
        raise PlanError(f"{source}: field 'kept' is missing or not an object of group id -> channel indices")
    for key, idx in kept.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= len(groups):
            raise PlanError(f"{source}: field 'kept' names group {key!r}, which does not exist (group ids are "
                            f"0 to {len(groups) - 1})")
        if not isinstance(idx, list):
            raise PlanError(f"{source}: group {key}: field 'kept' must be a list of channel indices, found {idx!r}")
    shapes = data.get("input_shapes", [])
    if not isinstance(shapes, list) or not all(isinstance(s, list) and all(_is_int(d) and d > 0 for d in s)
                                               for s in shapes):
        raise PlanError(f"{source}: field 'input_shapes' must be a list of shapes (lists of positive integers)")


@dataclass(frozen=True)
class PruningPlan:
    """Kept channel indices per channel group of a model, plus what is needed to check that a
    model it is applied to has the same groups (sizes and member names).

    Every plan is checked when made: group ids that exist (no negative ones), integer channel
    indices in range, none twice, at least one per group; a :class:`PlanError` names ``source``
    (the file, for a loaded plan), the group and the field."""

    kept: dict[int, list[int]]
    groups: list[dict[str, Any]]
    input_shapes: list[list[int]] = field(default_factory=list)
    source: str = field(default="the pruning plan", compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        for gid, idx in self.kept.items():
            if not _is_int(gid) or not 0 <= gid < len(self.groups):
                raise PlanError(f"{src}: field 'kept' names group {gid!r}, which does not exist (group ids are "
                                f"0 to {len(self.groups) - 1})")
            size = self.groups[gid]["size"]
            bad = next((i for i in idx if not _is_int(i)), None)
            if bad is not None:
                raise PlanError(f"{src}: group {gid}: field 'kept' holds {bad!r}, not a channel index (an integer)")
            if not idx:
                raise PlanError(f"{src}: group {gid}: field 'kept' is empty (a group keeps at least one channel)")
            outside = [i for i in idx if not 0 <= i < size]
            if outside:
                raise PlanError(f"{src}: group {gid}: field 'kept' holds channel {outside[0]}, outside the group's "
                                f"{size} channels (0 to {size - 1})")
            if len(set(idx)) != len(idx):
                raise PlanError(f"{src}: group {gid}: field 'kept' names a channel twice")

    @classmethod
    def from_keep(cls, groups: list[ChannelGroup], keep: Mapping[int, torch.Tensor], example_inputs: Any = None) -> "PruningPlan":
        kept = {g.id: torch.nonzero(torch.as_tensor(keep[g.id]).bool()).flatten().tolist() for g in groups if g.id in keep}
        kept = {gid: idx for gid, idx in kept.items() if len(idx) < groups[gid].size}
        shapes = [list(t.shape) for t in as_tuple(example_inputs) if isinstance(t, torch.Tensor)] if example_inputs is not None else []
        return cls(kept, _fingerprint(groups), shapes)

    @classmethod
    def from_masks(cls, model: Traceable, example_inputs: Any, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> "PruningPlan":
        """The plan that :class:`ModelSpeedup` would carry out for these NNI-format masks.

        ``model``: a module (traced on a copy, in eval mode), or a traced ``GraphModule`` or its
        :class:`~graph_passes.Analysis` (see :func:`graph_passes.analysis_for`), used as they are."""
        analysis = analysis_for(model if _given_trace(model) else copy.deepcopy(model).eval(), example_inputs)
        return cls.from_keep(analysis.groups, keep_from_masks(analysis.groups, masks), example_inputs)

    def keep_vectors(self, groups: list[ChannelGroup]) -> dict[int, torch.Tensor]:
        self.check(groups)
        keep = {}
        for gid, idx in self.kept.items():
            vec = torch.zeros(groups[gid].size, dtype=torch.bool)
            vec[torch.tensor(idx, dtype=torch.long)] = True
            keep[gid] = vec
        return keep

    def check(self, groups: list[ChannelGroup]) -> None:
        """Refuse a model whose channel groups are not the ones the plan was made for."""
        found = _fingerprint(groups)
        if len(found) != len(self.groups):
            raise PlanError(f"{self.source} is for a model with {len(self.groups)} channel groups, this model has "
                            f"{len(found)}: build the same architecture (same timm name and arguments) before applying it")
        for gid, (want, have) in enumerate(zip(self.groups, found)):
            if want != have:
                raise PlanError(f"{self.source}: group {gid} differs from the model's: the plan has {want['size']} "
                                f"channels over {want['members'][:3]}..., the model {have['size']} over "
                                f"{have['members'][:3]}...")

    def apply(self, model: Traceable, example_inputs: Any = None, masks: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> fx.GraphModule:
        """Remove the planned channels from a copy of ``model`` (e.g. freshly built by name), or of a
        traced ``GraphModule`` or its :class:`~graph_passes.Analysis` (not traced again); ``masks``
        are baked into the copy first."""
        if _given_trace(model):  # a copy of the trace, analysed anew, the masks baked into it
            analysis = analysis_for(model, example_inputs).copy()
            if masks:
                bake(analysis.gm, normalize_masks(analysis.gm, masks))
        else:  # a copy of the module with the masks baked in, traced
            analysis = analysis_for((masked_copy(model, masks) if masks else copy.deepcopy(model)).eval(),
                                    self._inputs(example_inputs))
        return apply_keep(analysis.gm, analysis, self.keep_vectors(analysis.groups))

    def masks(self, model: Traceable, example_inputs: Any = None) -> dict[str, dict[str, torch.Tensor]]:
        """NNI-format masks (module path -> tensor name -> 0/1 mask) of the planned channels on every
        member of their groups in ``model`` (a module, traced on an eval-mode copy, or a traced
        ``GraphModule`` or its :class:`~graph_passes.Analysis`, used as they are). With them
        ``ModelSpeedup(model, x, plan.masks(model, x)).speedup_model()`` prunes ``model`` itself, in
        place, where :meth:`apply` returns a new ``GraphModule``."""
        analysis = analysis_for(model) if _given_trace(model) else \
            analysis_for(copy.deepcopy(model).eval(), self._inputs(example_inputs))
        return group_masks(analysis.gm, analysis.groups, self.keep_vectors(analysis.groups))

    def _inputs(self, example_inputs: Any) -> Any:
        """``example_inputs``, or random inputs of the shapes the plan stores."""
        if example_inputs is not None:
            return example_inputs
        if not self.input_shapes:
            raise PlanError("the plan stores no input shape: pass example_inputs")
        return tuple(torch.randn(*s) for s in self.input_shapes)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "kept": {str(k): v for k, v in sorted(self.kept.items())},
                           "groups": self.groups, "input_shapes": self.input_shapes}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "the pruning plan") -> "PruningPlan":
        """Parse and check a plan written by :meth:`to_json`; errors name ``source``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source} is not a pruning plan (invalid JSON: {exc})") from exc
        _check_schema(data, source)
        kept = {int(k): v for k, v in data["kept"].items()}
        return cls(kept, data["groups"], data.get("input_shapes", []), source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically (temporary file, then rename)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PruningPlan":
        target = Path(path)
        if not target.is_file():
            raise PlanError(f"pruning plan not found: {target}")
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"{target} cannot be read: {exc}") from exc
        return cls.from_json(text, source=str(target))
