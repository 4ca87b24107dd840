"""Planning a HARP run before NNI wraps the model: the units (layers or channel groups) with their
initial scores, floors, ceilings and rates, the budgets, and the config list NNI will wrap.

Everything here reads the *unwrapped* model (``inner``; names of the bound model carry ``prefix``,
``'module.'`` under DDP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import Tensor, nn

from graph_passes.cost_model import CostModel
from graph_passes.groups import ChannelGroup

from ._allocation import UnitStats, allocate
from ._config import ParsedConfig, ensure_nni_setting
from ._structure import MaskFactor, channel_rms, controlled_groups, group_init_scores, group_names, mask_factors
from ._units import hydra_scores
from .budget import Budget, CostBudget, WeightedBudget
from .errors import ConfigListError, SettingsError, StructureError
from .settings import HARPSettings

__all__ = [
    "UnitPlan", "Plan", "plan_unstructured", "structured_target", "channel_structure", "plan_structured",
]


@dataclass
class UnitPlan:
    name: str  # readable: the module (unstructured) or the group's first producing module
    module: str  # wrapped module (bound-model naming) whose wrapper stores the unit's tensors
    attr: str
    init_scores: Tensor
    floor: float
    ceiling: float
    init_keep: float


@dataclass
class Plan:
    config_list: list[dict[str, Any]]
    units: list[UnitPlan]
    budgets: list[Budget]
    overall: Budget
    groups: list[ChannelGroup] = field(default_factory=list)
    factors: dict[str, dict[str, list[MaskFactor]]] = field(default_factory=dict)
    #: a latency budget's measured check of the final plan (``HARPSettings.latency_checks``)
    latency_check: Any = None


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _fan_in(weight: Tensor) -> int:
    return weight.numel() // weight.shape[0] if weight.dim() >= 2 else 1


def _output_floor(weight: Tensor, per_output: int) -> float:
    """The kept fraction of ``weight`` that is ``per_output`` weights per output channel (row)."""
    if per_output <= 0 or weight.dim() == 0:
        return 0.0
    rows = weight.shape[0] if weight.dim() >= 2 else 1
    return min(1.0, per_output * rows / weight.numel())


def _weighted(members: Sequence[int], weights: Sequence[float], targets: Sequence[float]) -> WeightedBudget:
    total = sum(weights[i] for i in members)
    if total <= 0:
        raise StructureError("the selected layers count no FLOPs on the dummy input; use budget='params'")
    return WeightedBudget({i: weights[i] for i in members}, sum(weights[i] * targets[i] for i in members) / total)


def _start(units: Sequence[UnitPlan], budgets: Sequence[Budget], settings: HARPSettings,
           stats: Sequence[UnitStats]) -> None:
    """Set every unit's ``init_keep`` from ``settings.init_allocation`` at each budget's start
    fraction (:meth:`HARPSettings.start_keep`); HYDRA's stay uniform at the target."""
    for budget in budgets:
        members = budget.units
        floors = {u: units[u].floor for u in members}
        ceilings = {u: units[u].ceiling for u in members}
        kind = settings.init_allocation if settings.learn_rates else "uniform"
        start = allocate(kind, budget, settings.start_keep(budget.target), {u: stats[u] for u in members}, floors, ceilings)
        for u, keep in start.items():
            units[u].init_keep = keep


def plan_unstructured(
    model: nn.Module, inner: nn.Module, prefix: str, parsed: ParsedConfig, settings: HARPSettings,
    budget_kind: str, dummy_input: Any,
) -> Plan:
    """One unit per selected weight, started per :func:`_start`; one budget per entry or
    ``global_group_id``, counting parameters or (measured on ``dummy_input``) dense FLOPs."""
    modules = dict(model.named_modules())
    units: list[UnitPlan] = []
    targets: list[float] = []
    keys: list[str] = []
    per_output = settings.min_kept_per_output if settings.learn_rates else 0  # HYDRA's rates stay uniform
    for entry in parsed.entries:
        for name in entry.modules:
            weight = modules[name].weight
            floor = max(settings.alpha * entry.keep, entry.floor, min(_output_floor(weight, per_output), entry.ceiling))
            units.append(UnitPlan(
                name=name, module=name, attr="weight_harp", init_scores=hydra_scores(weight, _fan_in(weight)),
                floor=floor, ceiling=entry.ceiling, init_keep=min(max(entry.keep, floor), entry.ceiling),
            ))
            targets.append(entry.keep)
            keys.append(entry.budget_key)
    if budget_kind == "params":
        weights = [float(modules[u.module].weight.numel()) for u in units]
    else:
        flops = _module_flops(inner, dummy_input)
        weights = [float(flops.get(_strip(u.module, prefix), 0)) for u in units]
    budgets: list[Budget] = [
        _weighted([i for i, k in enumerate(keys) if k == key], weights, targets) for key in dict.fromkeys(keys)
    ]
    overall = _weighted(list(range(len(units))), weights, targets)
    stats = [UnitStats(modules[u.module].weight.detach().abs(), tuple(modules[u.module].weight.shape)) for u in units]
    _start(units, budgets, settings, stats)
    return Plan(config_list=parsed.nni_config_list, units=units, budgets=budgets, overall=overall)


def _module_flops(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Dense FLOPs of every called module (the unstructured FLOPs budget's layer weights), from the
    traced cost model."""
    from graph_passes import cost
    from graph_passes.errors import GraphPassError

    if example_inputs is None:
        raise SettingsError("budget", "flops", "'params' unless a dummy_input is given (FLOPs are counted on a trace)")
    try:
        return cost(model, example_inputs).flops_by_module()
    except GraphPassError as exc:
        raise SettingsError("budget", "flops", f"'params' for a model graph_passes cannot trace ({exc})") from exc


def structured_target(parsed: ParsedConfig, budget_kind: str) -> float:
    """The one kept fraction of the whole model's FLOPs (or params) that structured HARP aims at."""
    keeps = {entry.keep for entry in parsed.entries}
    if len(keeps) > 1:
        detail = ", ".join(f"entry {e.index}: sparse_ratio {1 - e.keep:g}" for e in parsed.entries)
        raise ConfigListError(None, f"structured HARP has one {budget_kind} budget for the whole model, "
                                    f"so every entry needs the same sparse_ratio ({detail})")
    return keeps.pop()


def channel_structure(model: nn.Module, example_inputs: Any) -> tuple[list[ChannelGroup], CostModel]:
    """The model's coupled channel groups and cost model, from one trace on ``example_inputs``
    (inside :func:`graph_passes.trace_once`, the trace the caller made of the same model)."""
    from graph_passes import analysis_for, cost

    if example_inputs is None:
        raise StructureError("structured HARP traces the model: pass dummy_input (or give the evaluator one)")
    analysis = analysis_for(model, example_inputs)
    return list(analysis.groups), cost(analysis)


def plan_structured(
    inner: nn.Module, prefix: str, parsed: ParsedConfig, settings: HARPSettings, budget_kind: str,
    target: float, groups: Sequence[ChannelGroup], cost_model: CostModel, dummy_input: Any = None,
) -> Plan:
    """One unit per controlled channel group, started per :func:`_start`; every member module of
    those groups is wrapped (an extra config entry if unselected)."""
    selected = {_strip(n, prefix) for n in parsed.owner}
    excluded = {_strip(n, prefix) for n in parsed.excluded}
    # a group is only useful if one of its members has a weight or bias HARP can mask
    chosen = [g for g in controlled_groups(groups, selected, excluded) if mask_factors(inner, [g])]
    if not chosen:
        raise ConfigListError(None, "selects no prunable channel group: a group is pruned when it is prunable, "
                                    "one of its member modules is selected and none is excluded")
    factors = mask_factors(inner, chosen, prefix)
    names = group_names(chosen)
    units: list[UnitPlan] = []
    floors: dict[int, float] = {}
    ceilings: dict[int, float] = {}
    for i, group in enumerate(chosen):
        entry = next(parsed.owner[prefix + m.module] for m in group.members if m.module in selected)
        floors[i] = max(settings.alpha * target, entry.floor)
        ceilings[i] = max(entry.ceiling, floors[i])
        # the unit's tensors live on the wrapper of its first producing member that gets masked
        ordered = sorted(group.members, key=lambda m: m.role != "out")
        owner = next(m.module for m in ordered if prefix + m.module in factors)
        units.append(UnitPlan(
            name=names[i], module=prefix + owner, attr=f"harp_group{group.id}",
            init_scores=group_init_scores(inner, group), floor=floors[i], ceiling=ceilings[i], init_keep=1.0,
        ))
    latency = check = None
    if budget_kind == "latency":
        from graph_passes import analysis_for

        from ._latency import FinalPlanCheck, latency_for_target

        analysis = analysis_for(inner, dummy_input)
        latency = latency_for_target(analysis, dummy_input, settings, target)
        if settings.latency_checks:  # on a copy: NNI's wrappers will patch the model's modules
            check = FinalPlanCheck(analysis.copy(), dummy_input, settings.latency_checks)
    budget = CostBudget(cost_model, {i: g.id for i, g in enumerate(chosen)}, target, metric=budget_kind, latency=latency)
    lowest = float(budget.kept(floors))
    if lowest > target + 1e-9:
        raise StructureError(
            f"the {budget_kind} target {target:.4f} is unreachable: with every controlled channel group at its "
            f"floor the model still keeps {lowest:.4f} of its {budget_kind} (the rest is in layers HARP does not "
            "control: unprunable, unselected or excluded channels); select more layers or lower sparse_ratio"
        )
    _start(units, [budget], settings, [UnitStats(channel_rms(inner, g)) for g in chosen])
    extras = sorted(name for name in factors if name not in parsed.owner)
    config_list = list(parsed.nni_config_list)
    if extras:
        for name in extras:
            ensure_nni_setting(inner.get_submodule(_strip(name, prefix)))
        config_list.append({"op_names": extras, "granularity": "out_channel"})
    return Plan(config_list=config_list, units=units, budgets=[budget], overall=budget, groups=list(chosen), factors=factors,
                latency_check=check)
