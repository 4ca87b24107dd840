"""Reading an NNI ``config_list`` the way HARP needs it: targets, floors, budgets, selected modules.

HARP keeps NNI's vocabulary. Per entry: ``sparse_ratio`` (required; the entry's target is
``keep = 1 - sparse_ratio``), ``max_sparse_ratio`` (per-layer floor ``1 - max_sparse_ratio``),
``min_sparse_ratio`` (per-layer ceiling), ``global_group_id`` (entries sharing it share one
budget; an entry without one is a budget of its own, shared by the layers it selects) and
``granularity`` (``'default'``: unstructured; ``'out_channel'``: channel groups). A module selected
by several entries belongs to the first, as in NNI.
"""
from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from nni.compression.base.config import select_modules_by_config, trans_legacy_config_list
from nni.compression.base.setting import PruningSetting

from .._checks import check_real
from .errors import ConfigListError

__all__ = ["EntryTarget", "ParsedConfig", "parse_config_list", "GRANULARITIES"]

GRANULARITIES: tuple[str, ...] = ("default", "out_channel")
_SELECTORS = ("op_types", "op_names", "op_names_re")
_EXCLUDERS = ("exclude_op_names", "exclude_op_types", "exclude_op_names_re")
_SETTING_KEYS = ("sparse_ratio", "max_sparse_ratio", "min_sparse_ratio", "global_group_id", "granularity")
_ALLOWED = set(_SELECTORS) | set(_EXCLUDERS) | set(_SETTING_KEYS) | {"target_names", "target_settings"}
_UNSUPPORTED = {
    "sparse_threshold": "HARP learns rates towards a sparse_ratio target; thresholds are not supported",
    "dependency_group_id": "structured HARP finds coupled channels itself (granularity='out_channel')",
    "internal_metric_block": "HARP scores single weights or whole channels",
    "apply_method": "HARP applies its masks by multiplication",
    "align": "HARP prunes weights only",
    "fuse_names": "module fusion is a quantization feature",
}


@dataclass(frozen=True)
class EntryTarget:
    """One ``config_list`` entry as HARP reads it."""

    index: int
    keep: float  # target kept fraction, 1 - sparse_ratio
    floor: float  # 1 - max_sparse_ratio (0 when unset)
    ceiling: float  # 1 - min_sparse_ratio (1 when unset)
    budget_key: str
    modules: tuple[str, ...]  # modules this entry owns (first entry wins)


@dataclass(frozen=True)
class ParsedConfig:
    entries: tuple[EntryTarget, ...]
    structured: bool
    owner: Mapping[str, EntryTarget]  # module name -> entry that owns it
    excluded: frozenset[str]  # modules any entry excludes explicitly
    nni_config_list: list[dict[str, Any]]  # translated, ready for NNI's schema


def _ratio(index: int, key: str, value: object, low: float, high: float, *, high_open: bool, low_open: bool = False) -> float:
    return check_real(value, low, high, low_open=low_open, high_open=high_open,
                      error=lambda _: ConfigListError(index, f"{key} must be a real number, got {value!r}"),
                      out_of_range=lambda span: ConfigListError(index, f"{key} must be {span}, got {value!r}"))


def _weight_setting(index: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    setting = {k: entry[k] for k in _SETTING_KEYS if k in entry}
    target_settings = entry.get("target_settings") or {}
    if not isinstance(target_settings, Mapping):
        raise ConfigListError(index, f"target_settings must be a dict, got {type(target_settings).__name__}")
    for target, values in target_settings.items():
        if target != "weight":
            if isinstance(values, Mapping) and "sparse_ratio" in values:
                raise ConfigListError(index, f"HARP prunes weights only; target_settings[{target!r}] has a sparse_ratio")
            continue
        if not isinstance(values, Mapping):
            raise ConfigListError(index, "target_settings['weight'] must be a dict")
        for key, value in values.items():
            if key in _UNSUPPORTED:
                raise ConfigListError(index, f"target_settings['weight'][{key!r}] is not supported: {_UNSUPPORTED[key]}")
            if key in _SETTING_KEYS:
                setting[key] = value
    return setting


def _describe(entry: Mapping[str, Any]) -> str:
    keys = [k for k in (*_SELECTORS, *_EXCLUDERS) if k in entry]
    return ", ".join(f"{k}={entry[k]!r}" for k in keys)


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def ensure_nni_setting(module: nn.Module) -> None:
    """Register NNI's default pruning setting for a module type it does not know (LayerNorm, timm's
    own layers): NNI wraps only registered types."""
    name = type(module).__name__
    if name in PruningSetting.registry:
        return
    setting = {"weight": deepcopy(PruningSetting.default_setting["weight"])}
    if hasattr(module, "bias"):
        setting["bias"] = deepcopy(PruningSetting.default_setting["bias"])
    PruningSetting.register(name, setting)


def _excluded_by(model: nn.Module, entry: Mapping[str, Any]) -> set[str]:
    names = set(entry.get("exclude_op_names") or ())
    types = set(entry.get("exclude_op_types") or ())
    patterns = list(entry.get("exclude_op_names_re") or ())
    found: set[str] = set()
    if not (names or types or patterns):
        return found
    for name, module in model.named_modules():
        if name in names or type(module).__name__ in types or any(re.match(p, name) for p in patterns):
            found.add(name)
    return found


def parse_config_list(model: nn.Module, config_list: Sequence[Mapping[str, Any]]) -> ParsedConfig:
    """Validate ``config_list`` for HARP and resolve what each entry selects; errors name the entry."""
    if not isinstance(config_list, (list, tuple)) or not config_list:
        raise ConfigListError(None, "must be a non-empty list of dicts")
    for i, entry in enumerate(config_list):
        if not isinstance(entry, Mapping):
            raise ConfigListError(i, f"must be a dict, got {type(entry).__name__}")
    translated = trans_legacy_config_list(deepcopy([dict(e) for e in config_list]))

    entries: list[EntryTarget] = []
    owner: dict[str, EntryTarget] = {}
    excluded: set[str] = set()
    granularity_of: dict[int, str] = {}
    nni_list: list[dict[str, Any]] = []
    for i, entry in enumerate(translated):
        for key in entry:
            if key in _UNSUPPORTED:
                raise ConfigListError(i, f"{key!r} is not supported: {_UNSUPPORTED[key]}")
            if key not in _ALLOWED:
                raise ConfigListError(i, f"unknown key {key!r}; HARP reads {', '.join(sorted(_ALLOWED))}")
        if not any(entry.get(k) for k in _SELECTORS):
            raise ConfigListError(i, "selects no module: give op_types, op_names or op_names_re")
        for key in (*_SELECTORS, *_EXCLUDERS):
            value = entry.get(key)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ConfigListError(i, f"{key} must be a list of str, got {value!r}")
        targets = entry.get("target_names")
        if targets is not None and "weight" not in targets:
            raise ConfigListError(i, f"target_names {targets!r} lacks 'weight', the only target HARP prunes")

        setting = _weight_setting(i, entry)
        if "sparse_ratio" not in setting:
            raise ConfigListError(i, "needs a sparse_ratio (the fraction of the selected weights to remove)")
        sparse = _ratio(i, "sparse_ratio", setting["sparse_ratio"], 0.0, 1.0, high_open=True)
        max_sparse = _ratio(i, "max_sparse_ratio", setting.get("max_sparse_ratio", 1.0), 0.0, 1.0, high_open=False, low_open=True)
        min_sparse = _ratio(i, "min_sparse_ratio", setting.get("min_sparse_ratio", 0.0), 0.0, 1.0, high_open=True)
        if max_sparse < sparse:
            raise ConfigListError(i, f"max_sparse_ratio {max_sparse:g} is below sparse_ratio {sparse:g}: the target is unreachable")
        if min_sparse > sparse:
            raise ConfigListError(i, f"min_sparse_ratio {min_sparse:g} is above sparse_ratio {sparse:g}: the target is unreachable")
        granularity = setting.get("granularity", "default")
        if not isinstance(granularity, str) or granularity not in GRANULARITIES:
            raise ConfigListError(
                i, f"granularity {granularity!r} is not supported by HARP; use 'default' (unstructured, per weight) "
                "or 'out_channel' (structured, coupled channel groups)"
            )
        group_id = setting.get("global_group_id")
        if group_id is not None and (isinstance(group_id, bool) or not isinstance(group_id, (int, str))):
            raise ConfigListError(i, f"global_group_id must be an int or str, got {group_id!r}")
        granularity_of[i] = granularity

        known = {name for name, _ in model.named_modules(remove_duplicate=False)}
        missing = [name for name in entry.get("op_names") or () if name not in known]
        if missing:
            raise ConfigListError(i, f"matches no module with a weight in the model: op_names {missing} name no module of it")
        selected, _, _ = select_modules_by_config(model, entry)
        usable = sorted(name for name, module in selected.items() if _has_weight(module))
        if not usable:
            raise ConfigListError(i, f"matches no module with a weight in the model ({_describe(entry)})")
        mine = tuple(name for name in usable if name not in owner)
        target = EntryTarget(
            index=i,
            keep=1.0 - sparse,
            floor=1.0 - max_sparse,
            ceiling=1.0 - min_sparse,
            budget_key=f"group:{group_id}" if group_id is not None else f"entry:{i}",
            modules=mine,
        )
        entries.append(target)
        modules = dict(model.named_modules())
        for name in mine:
            owner[name] = target
            ensure_nni_setting(modules[name])
        excluded |= _excluded_by(model, entry)

        nni_entry = {k: v for k, v in entry.items() if k not in _SETTING_KEYS and k != "target_settings"}
        nni_entry["op_names"] = list(mine)
        nni_entry.pop("op_types", None)
        nni_entry.pop("op_names_re", None)
        for key in _EXCLUDERS:
            nni_entry.pop(key, None)
        nni_entry["sparse_ratio"] = float(sparse)
        nni_entry["granularity"] = granularity
        if mine:
            nni_list.append(nni_entry)

    kinds = sorted(set(granularity_of.values()))
    if len(kinds) > 1:
        first = {g: min(i for i, k in granularity_of.items() if k == g) for g in kinds}
        raise ConfigListError(
            None, "mixes granularities: " + ", ".join(f"entry {i} is {g!r}" for g, i in first.items())
            + "; HARP prunes either unstructured ('default') or structured ('out_channel'), not both at once"
        )
    return ParsedConfig(
        entries=tuple(entries),
        structured=kinds == ["out_channel"],
        owner=owner,
        excluded=frozenset(excluded),
        nni_config_list=nni_list,
    )
