"""The latency model a latency budget prunes against: fitted on the backend, then checked and
refined where the run's target puts the plan.

A model fitted on random channel configurations errs most where a plan chosen on it lands (the
plan follows the model's own figures): README's latency command (resnet18, 32 px, onnxruntime, 1
thread) learned a plan predicted at x0.500 of the dense latency that measured x0.358. So before
anything trains, the uniform plan the fitted model predicts at the target is timed and the model
fitted again with it (:func:`graph_passes.refine_latency`), until a measured plan lies within
:data:`REFINE_TOLERANCE` of the target, :data:`REFINE_PLANS` plans were measured, or the plan
asked for was measured before (the ``round_to`` channel grid has no closer one). The result is
cached beside the fit, per target, so the pruner's own call after the pipeline's, and a second run,
measure nothing.

HARP's learned plan is not the uniform one: it moves channels to the groups whose predicted cost
per unit of robustness is lowest, i.e. where the model errs in its favour. So when a latency run
fixes its masks, :class:`FinalPlanCheck` measures the plan itself, fits the model again with it
and, where the plan measured more than :data:`REFINE_TOLERANCE` over the target, takes the final
counts again under the refitted model (``HARPSettings.latency_checks`` measurements at most). A plan
measured at or under that is kept as it is: the target is a limit, and a loosened plan could only
be vouched for by another measurement, as noisy as the first (README's latency command: one
resnet18 plan at 32 px on onnxruntime measured x0.54 in the check and x0.41 a minute later).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from graph_passes._atomic import atomic_write_text
from graph_passes.groups import grid_step
from graph_passes.latency import LatencyModel

from .budget import CostBudget, lowest_latency, round_to_counts, uniform_keep
from .settings import HARPSettings

__all__ = ["REFINE_PLANS", "REFINE_TOLERANCE", "CHECK_SECONDS", "CHECK_RUNS", "CHECK_ROUNDS", "latency_for_target",
           "FinalPlanCheck"]

#: At most this many plans are measured to refine a fit for one target.
REFINE_PLANS = 2
#: Refining stops once a measured plan's latency fraction is within this (relative) of the target.
REFINE_TOLERANCE = 0.10

#: A final plan's check times it and the dense model this long each (runs clamped to ``CHECK_RUNS``),
#: in ``CHECK_ROUNDS`` alternating passes: its measurement decides the masks, so it runs longer than a
#: fit's 20 runs in 2 passes.
CHECK_SECONDS = 2.0
CHECK_RUNS = (20, 400)
CHECK_ROUNDS = 4

Progress = Callable[[Iterable[Any]], Iterable[Any]]


def _checked(latency: LatencyModel, target: float) -> bool:
    """Whether a plan measured by a refinement lies within :data:`REFINE_TOLERANCE` of ``target``."""
    plans = latency.measured[len(latency.measured) - latency.refined:] if latency.refined else []
    return any(abs(ms / latency.dense_ms / target - 1) <= REFINE_TOLERANCE for _, ms in plans)


def _refined_path(cache: Path, latency: LatencyModel, target: float) -> Path | None:
    return cache / f"latency-{latency.key}-target{target:.6f}.json" if latency.key else None


def latency_for_target(model: Any, example_inputs: Any, settings: HARPSettings, target: float, *,
                       progress: Progress | None = None, refine_progress: Progress | None = None) -> LatencyModel:
    """The latency model of ``model`` on ``settings``' backend (``latency_backend``,
    ``latency_threads``, ``round_to``, ``latency_norms``, cached in ``latency_cache_dir()``),
    refined for a kept latency fraction ``target`` (see the module docstring). ``progress`` wraps
    the fit's timing steps, ``refine_progress`` each refinement's (e.g. ``tqdm``); neither is
    called when the cache has what is asked. ``model``: a module, ``GraphModule`` or
    :class:`graph_passes.Analysis`."""
    from graph_passes import analysis_for, cost
    from graph_passes.latency import fit_latency, refine_latency

    cache = settings.latency_cache_dir()
    analysis = analysis_for(model, example_inputs)  # one trace for the fit and the refinements
    latency = fit_latency(analysis, example_inputs, backend=settings.latency_backend, threads=settings.latency_threads,
                          round_to=settings.round_to, cache_dir=cache, progress=progress, norms=settings.latency_norms)
    path = _refined_path(cache, latency, target)
    if path is not None and path.is_file():
        return LatencyModel.from_json(path.read_text())
    cost_model = cost(analysis)
    sizes = {g.id: g.size for g in analysis.groups if g.prunable}
    for _ in range(REFINE_PLANS):
        budget = CostBudget(cost_model, {g: g for g in sizes}, target, metric="latency", latency=latency)
        if _checked(latency, target) or lowest_latency(cost_model, analysis.groups, latency) > target:
            break  # close enough, or a target the backend cannot reach (the caller says so)
        fraction = uniform_keep(cost_model, list(sizes), target, latency)
        counts = round_to_counts(budget, dict.fromkeys(sizes, fraction), sizes, dict.fromkeys(sizes, 1), sizes,
                                 {g: grid_step(n, settings.round_to) for g, n in sizes.items()})
        if {g: c / sizes[g] for g, c in counts.items()} in [keep for keep, _ in latency.measured]:
            break  # the model already passes through this plan (the channel grid allows no closer one)
        latency = refine_latency(analysis, example_inputs, latency, [counts], progress=refine_progress)
    if path is not None:
        atomic_write_text(path, latency.to_json())
    return latency


@dataclass
class FinalPlanCheck:
    """The measured check of a latency budget's final plan (see the module docstring).

    ``analysis``: a channel analysis of the model as it was planned on (a copy, untouched by NNI's
    wrappers); ``records``: per measurement the plan's ``predicted`` latency fraction (by the model
    before the refit), the ``measured`` one and whether that is ``within_limit`` (at most
    :data:`REFINE_TOLERANCE` over the target: the plan is kept); ``counts``: the final counts by
    unit, once done."""

    analysis: Any
    example_inputs: Any
    checks: int
    records: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[int, int] | None = None

    @property
    def done(self) -> bool:
        return self.counts is not None

    @property
    def kept_as_measured(self) -> bool:
        """Whether the final counts are the last measured plan, kept for measuring within the limit."""
        return self.done and bool(self.records) and self.records[-1]["within_limit"]

    def run(self, budget: CostBudget, counts: Mapping[int, int], sizes: Mapping[int, int],
            recount: Callable[[CostBudget], dict[int, int]]) -> tuple[CostBudget, dict[int, int]]:
        """``budget`` with its latency model refitted on the measured plans, and the final counts
        (by unit) under it; ``recount(budget)`` gives the final counts under a budget."""
        from graph_passes.latency import refine_latency

        from .. import distributed as hd

        counts, measured_plans = dict(counts), []
        for _ in range(self.checks):
            if counts in measured_plans:
                break  # the refitted model counts a plan measured before: the grid has no closer one
            measured_plans.append(dict(counts))
            predicted = float(budget.kept({u: c / sizes[u] for u, c in counts.items()}))
            plan = {budget.group_of[u]: c for u, c in counts.items()}

            def measure(latency: Any = budget.latency, plan: dict[int, int] = plan) -> str:
                runs = min(max(round(CHECK_SECONDS * 1e3 / latency.dense_ms), CHECK_RUNS[0]), CHECK_RUNS[1])
                return refine_latency(self.analysis, self.example_inputs, latency, [plan], reps=runs,
                                      rounds=CHECK_ROUNDS).to_json()

            # rank 0 measures, every rank takes its model (so the ranks keep the same masks)
            refined = LatencyModel.from_json(hd.broadcast_object(hd.on_main(measure)))
            measured = refined.measured[-1][1] / refined.dense_ms
            within = measured <= budget.target * (1 + REFINE_TOLERANCE)
            self.records.append({"predicted": predicted, "measured": measured, "within_limit": within})
            budget = replace(budget, latency=refined)
            if within:
                break  # a measured plan beats an unmeasured one predicted at the target
            counts = recount(budget)
        self.counts = counts
        return budget, dict(counts)

    def state_dict(self, budget: CostBudget) -> dict[str, Any]:
        """What a resumed run needs: the records and, once done, the final counts and the refitted
        model (as JSON)."""
        done = self.counts is not None
        return {"records": [dict(r) for r in self.records], "counts": None if not done else dict(self.counts),
                "latency": budget.latency.to_json() if done and budget.latency is not None else None}

    def load_state_dict(self, state: Mapping[str, Any], budget: CostBudget) -> CostBudget:
        """Take ``state`` (of :meth:`state_dict`); returns ``budget`` with the stored model."""
        self.records = [dict(r) for r in state["records"]]
        counts = state.get("counts")
        self.counts = None if counts is None else {int(u): int(c) for u, c in counts.items()}
        return replace(budget, latency=LatencyModel.from_json(state["latency"])) if state.get("latency") else budget
