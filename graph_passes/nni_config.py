"""NNI config lists whose coupled layers prune the same channels: ``auto_set_dependency_group_ids``.

NNI's pruners choose each layer's output channels on their own unless layers share a
``dependency_group_id``; then NNI averages their importance and gives all of them one mask.
NNI's own ``auto_set_denpendency_group_ids`` finds such layers with its ``concrete_trace``, which
fails on current torch releases. This one reads them off graph_passes' channel groups. The
config handling follows NNI 3.0 (``nni.compression.base.config``) without importing NNI.
"""
from __future__ import annotations

import copy
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import fx, nn

from .dependency import analysis_of, analyze
from .errors import GraphPassError, MissingAnalysisError
from .groups import ChannelGroup
from .tracing import trace

__all__ = ["auto_set_dependency_group_ids", "auto_set_denpendency_group_ids", "select_modules", "translate_legacy"]

logger = logging.getLogger(__name__)

_SELECTORS = ("op_names", "op_types", "op_names_re", "exclude_op_names", "exclude_op_types", "exclude_op_names_re", "fuse_names")
_LEGACY = ("exclude", "sparsity", "sparsity_per_layer", "total_sparsity", "quant_types")


def translate_legacy(config_list: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """NNI's legacy keys (``sparsity``, ``total_sparsity``, ``exclude``, ...) in NNI 3.0's form,
    translated as ``nni.compression.base.config.trans_legacy_config_list`` does: only when the
    first entry holds one of them."""
    configs = [dict(c) for c in copy.deepcopy(list(config_list))]
    if not configs or not any(key in configs[0] for key in _LEGACY):
        return configs
    excluded: dict[str, set[str]] = {"op_types": set(), "op_names": set(), "op_names_re": set()}
    for config in configs:
        if "op_partial_names" in config:
            config["op_names_re"] = [f".*{p}.*" for p in config.pop("op_partial_names")]
        if config.pop("exclude", False):
            for key, names in excluded.items():
                names.update(config.get(key, ()))
    if any(excluded.values()):
        for config in configs:
            for key, names in excluded.items():
                config[f"exclude_{key}"] = list(names)
    group_candidate = 0
    for config in configs:
        max_ratio = config.pop("max_sparsity_per_layer", None)
        ratio = config.pop("sparsity_per_layer", config.pop("sparsity", None))
        group = None
        if "total_sparsity" in config:
            ratio, group = config.pop("total_sparsity"), group_candidate
            group_candidate += 1
        if ratio is not None:
            weight: dict[str, Any] = {"sparse_ratio": ratio, "granularity": "default"}
            if max_ratio is not None:
                weight["max_sparse_ratio"] = max_ratio
            if group is not None:
                weight["group_id"] = group
            config["target_names"] = ["weight", "bias"]
            config["target_settings"] = {"weight": weight}
    return configs


def select_modules(model: nn.Module, config: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The names of the modules ``config`` selects (NNI's rules: ``op_names`` or ``op_names_re``,
    intersected with ``op_types`` by class name, minus the ``exclude_*`` keys) and the config
    without its selector keys."""
    named = dict(model.named_modules(remove_duplicate=False))
    by_type: dict[str, set[str]] = defaultdict(set)
    for name, module in named.items():
        by_type[type(module).__name__].add(name)
    names, types, names_re = config.get("op_names"), config.get("op_types"), config.get("op_names_re")
    chosen = set(names or ())
    chosen.update(n for pattern in names_re or () for n in named if re.match(pattern, n))
    if types:
        of_types = set().union(*(by_type.get(t, set()) for t in types))
        chosen = chosen & of_types if (names or names_re) else chosen | of_types
    chosen -= set(config.get("exclude_op_names", ()))
    chosen = {n for n in chosen if not any(re.match(p, n) for p in config.get("exclude_op_names_re", ()))}
    for t in config.get("exclude_op_types", ()):
        chosen -= by_type.get(t, set())
    order = {n: i for i, n in enumerate(named)}
    public = {k: v for k, v in config.items() if k not in _SELECTORS}
    return sorted((n for n in chosen if n in named), key=order.__getitem__), public


@dataclass(frozen=True)
class _Rows:
    """How a layer's output rows (``weight`` dim 0) map onto one prunable channel group: row ``r``
    is channel ``order[r // block]``."""

    group: int
    block: int
    order: tuple[int, ...]
    ndim: int


def _output_rows(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, _Rows | str]:
    """For each module whose ``weight`` rows are a group member: its :class:`_Rows`, or why NNI
    cannot prune them so that the speedup removes what it masked."""
    found: dict[str, list[tuple[ChannelGroup, Any]]] = defaultdict(list)
    for group in groups:
        for m in group.members:
            if m.param == "weight" and m.dim == 0:
                found[m.module].append((group, m))
    out: dict[str, _Rows | str] = {}
    for module, members in found.items():
        group, member = members[0]
        if len(members) > 1:
            out[module] = f"its output channels fall into {len(members)} channel groups"
            continue
        if not group.prunable:
            out[module] = f"its output channels cannot be removed ({group.reason})"
            continue
        rows = dict(zip(member.index, member.channel))
        n = len(rows)
        block = n // group.size if group.size and n % group.size == 0 else 0
        weight = model.get_submodule(module).weight
        order = tuple(rows.get(r * block, -1) for r in range(group.size)) if block else ()
        if not block or sorted(rows) != list(range(weight.shape[0])) or \
                any(rows[r] != order[r // block] for r in range(n)) or sorted(order) != list(range(group.size)):
            out[module] = "its output rows are not whole, consecutive blocks of one channel group (attention heads, ...)"
            continue
        out[module] = _Rows(group.id, block, order, weight.dim())
    return out


def _groups_of(model: nn.Module, dummy_input: Any) -> list[ChannelGroup]:
    if dummy_input is None:
        if not isinstance(model, fx.GraphModule):
            raise GraphPassError("auto_set_dependency_group_ids needs the example inputs (dummy_input) to trace the model")
        if not any("tensor_meta" in n.meta for n in model.graph.nodes):
            raise GraphPassError("this GraphModule carries no shapes: pass the example inputs (dummy_input), or a "
                                 "GraphModule from graph_passes.trace(model, dummy_input)")
    gm = trace(model, dummy_input)
    try:
        return analysis_of(gm).groups
    except MissingAnalysisError:
        return analyze(gm).groups


def _call_shape(model: nn.Module, dummy_input: Any, config_list: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Ours: ``(model, dummy_input, config_list)``; NNI's: ``(graph_module, config_list)`` and
    ``(model, config_list, dummy_input)``."""
    def is_config(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(c, Mapping) for c in value)

    if is_config(dummy_input) and not is_config(config_list):
        dummy_input, config_list = config_list, dummy_input
    if not is_config(config_list):
        raise GraphPassError(f"config_list must be a non-empty list of dicts (NNI's config list), got {config_list!r}")
    return dummy_input, list(config_list)


def auto_set_dependency_group_ids(model: nn.Module, dummy_input: Any = None, config_list: Any = None) -> list[dict[str, Any]]:
    """NNI's ``config_list`` with ``dependency_group_id`` set so that coupled layers (a residual
    stream's producers, a depthwise conv and the conv before it) get one mask from NNI's pruners.

    Like NNI's function it returns one entry per selected module (``{'op_names': [name], ...}``,
    the legacy keys translated first) and takes NNI's call shapes too:
    ``(graph_module, config_list)`` with a GraphModule from :func:`graph_passes.trace`, and
    ``(model, config_list, dummy_input)``. Layers whose output channels form whole blocks of a
    prunable channel group (a grouped conv's groups) get the block as ``granularity`` as well, so
    NNI removes whole units. Layers whose output channels cannot be removed (the model's output,
    rows shared with other groups such as attention heads) are left out of the list, with the
    reason logged: masking them would only zero weights the speedup has to keep. Made for NNI's
    channel pruners (``granularity`` ``'default'`` or ``'out_channel'``: L1Norm, L2Norm, FPGM,
    Slim, Taylor, Linear, AGP, Movement); entries with another granularity keep their settings
    and get no group id.
    """
    dummy_input, config_list = _call_shape(model, dummy_input, config_list)
    rows = _output_rows(model, _groups_of(model, dummy_input))
    configs = translate_legacy(config_list)
    chosen: list[tuple[int, str, dict[str, Any]]] = []
    for index, config in enumerate(configs):
        names, public = select_modules(model, config)
        chosen += [(index, name, public) for name in names]
    keys: dict[tuple, list[str]] = defaultdict(list)
    for index, name, public in chosen:
        info = rows.get(name)
        if isinstance(info, _Rows) and _channel_granularity(public):
            keys[(index, info.group, info.order)].append(name)
    settings = _group_settings(keys, rows)
    out: list[dict[str, Any]] = []
    for index, name, public in chosen:
        info = rows.get(name, "its output channels are not traced (not reached by the example input, or no weight)")
        if isinstance(info, str):
            logger.info("auto_set_dependency_group_ids: %s left out: %s", name, info)
            continue
        entry = {"op_names": [name], **copy.deepcopy(public)}
        if _channel_granularity(public):
            entry = _with_settings(entry, settings.get(name, {}), info)
        out.append(entry)
    return out


def _channel_granularity(config: Mapping[str, Any]) -> bool:
    weight = config.get("target_settings", {}).get("weight", {})
    return weight.get("granularity", config.get("granularity", "default")) in ("default", "out_channel")


def _group_settings(keys: Mapping[tuple, list[str]], rows: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer: a shared ``dependency_group_id`` for the layers of one channel group whose
    weights have the most common rank (NNI averages their importance per unit, so the shapes must
    broadcast alike; blocks of rows reduce to one unit each); the others copy the mask of a leader
    with rows in the same blocks through NNI's ``align`` setting, or form a group of their own."""
    out: dict[str, dict[str, Any]] = {}
    seen: Counter[int] = Counter()

    def share(group: int, names: list[str]) -> None:
        if len(names) > 1:
            gid = f"channel_group_{group}" + (f"_{seen[group]}" if seen[group] else "")
            seen[group] += 1
            out.update({name: {"dependency_group_id": gid} for name in names})

    for key, names in keys.items():
        by_rank: dict[int, list[str]] = defaultdict(list)
        for name in names:
            by_rank[rows[name].ndim].append(name)
        leaders = max(by_rank.values(), key=len)
        share(key[1], leaders)
        rest: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name in names:
            if name in leaders:
                continue
            source = next((n for n in leaders if rows[n].block == rows[name].block), None)
            if source is None:
                rest[(rows[name].ndim, rows[name].block)].append(name)
            else:
                out[name] = {"align": {"module_name": source, "target_name": "weight", "dims": [0]}}
        for others in rest.values():
            share(key[1], others)
    return out


_SPARSITY_KEYS = ("sparse_ratio", "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio", "global_group_id",
                  "dependency_group_id", "internal_metric_block")


def _with_settings(entry: dict[str, Any], settings: Mapping[str, Any], info: _Rows) -> dict[str, Any]:
    """``entry`` with its group's settings: a group id, or (aligned) no sparsity of its own."""
    if "align" not in settings:
        if info.block > 1:
            entry["granularity"] = [info.block] + [-1] * (info.ndim - 1)
        entry.update(settings)
        return entry
    # aligned: the rows come from the leader's mask, already whole blocks (NNI would read a block
    # granularity here as the shape of the mask it copies)
    for key in _SPARSITY_KEYS:
        entry.pop(key, None)
        entry.get("target_settings", {}).get("weight", {}).pop(key, None)
    targets = entry.setdefault("target_settings", {})
    for name in ("weight", "bias"):  # the bias would align to this layer's weight, itself aligned
        targets.setdefault(name, {})["align"] = dict(settings["align"])
    return entry


def auto_set_denpendency_group_ids(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """NNI's (misspelt) name of :func:`auto_set_dependency_group_ids`."""
    return auto_set_dependency_group_ids(*args, **kwargs)
