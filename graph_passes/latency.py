"""Latency as a function of the kept channels, measured on the user's backend.

``fit_latency(model, example, backend=...)`` times the model itself, dense and pruned to a set of
channel configurations (counts on the ``round_to`` grid, physically removed by
:func:`graph_passes.apply_keep`), on the given backend, thread count, input shape and batch, and
fits a :class:`LatencyModel`::

    latency(keep) = intercept + sum_kind a_kind * flops_kind(keep) + b * activations(keep) + c * params(keep)

over the traced cost model's terms (``flops_kind``: the FLOPs of the conv, linear and attention
layers; ``activations``: the elements the ops produce, the memory traffic that depthwise convs,
norms and activations spend their time on; ``params``: the weights every forward pass reads, the
time of a small input, where the arithmetic is little and the weights do not stay in cache:
resnet18 at 32 px in onnxruntime fell to x0.26-0.32 of its latency at x0.48 of its FLOPs and
x0.20 of its parameters), with non-negative coefficients (NNLS). The terms are
those of :class:`~graph_passes.CostModel`, so the prediction is differentiable in the kept
fractions and a layer's latency falls with the product of its input and output fractions, as its
cost does (a sum of per-group tables cannot express that a conv between two halved groups keeps a
quarter of its time). The fit is cached on disk under a key of everything that changes it (model
structure, input shape, backend, threads, library versions, grid), so a second run measures nothing.
:func:`refine_latency` measures given configurations (a plan chosen on the model's prediction)
and fits again with them added, which corrects the model where that plan lives.

Backends (:data:`BACKENDS`, in :mod:`._latency_backends`): ``eager`` (PyTorch on CPU), ``onnxruntime`` (CPU execution provider)
and ``cuda`` (PyTorch on the GPU). A backend that is not installed or has no device raises
:class:`LatencyError` saying so.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ._atomic import atomic_write_text
from ._latency_backends import BACKENDS, LatencyError, Runner, check_backend
from .cost_model import CostModel, Fraction
from .dependency import Traceable
from .groups import grid_step

__all__ = ["BACKENDS", "LatencyError", "LatencyModel", "check_backend", "fit_latency", "latency_runner", "measure_ms",
           "refine_latency", "time_ms"]

logger = logging.getLogger(__name__)

#: The FLOPs terms of the model, by ``LayerCost.kind`` (attention's two matmuls are one term).
_KIND_TERMS = {"conv": "conv", "linear": "linear", "attention_scores": "attention", "attention_values": "attention"}
#: The layer kinds whose FLOPs make up each FLOPs term, in term order.
_TERM_KINDS = {term: tuple(k for k, t in _KIND_TERMS.items() if t == term)
               for term in dict.fromkeys(_KIND_TERMS.values())}
TERMS: tuple[str, ...] = ("conv", "linear", "attention", "activations", "params")


def latency_runner(model: nn.Module, example_inputs: Any, backend: str, threads: int, work: Path) -> Runner:
    """A callable running one forward pass of ``model`` (eval mode) on ``backend``."""
    check_backend(backend)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LatencyError(f"threads must be an int >= 1, got {threads!r}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return BACKENDS[backend](model.eval(), inputs, threads, work)


def measure_ms(run: Runner, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``run()`` over ``reps`` calls after ``warmup`` calls, in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def time_ms(model: nn.Module, example_inputs: Any, backend: str, threads: int, reps: int = 20, warmup: int = 3) -> float:
    """:func:`measure_ms` of one forward pass of ``model`` on ``backend`` (:func:`latency_runner`,
    its files in a temporary folder removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="harp-latency-") as tmp:
        return measure_ms(latency_runner(model, example_inputs, backend, threads, Path(tmp)), reps=reps, warmup=warmup)


def _terms(cost: CostModel, keep: Mapping[int, Fraction]) -> dict[str, Fraction]:
    values: dict[str, Fraction] = {term: cost.flops(keep, kinds=kinds) for term, kinds in _TERM_KINDS.items()}
    values["activations"] = cost.activations(keep)
    values["params"] = cost.params(keep)
    return values


@dataclass(frozen=True)
class LatencyModel:
    """Milliseconds per unit of every cost term, fitted on one backend (see the module docstring).

    ``measured`` holds the fit's data, ``[(kept fractions by group id, measured ms)]``, the last
    ``refined`` of them added by :func:`refine_latency`, and ``dense_ms`` the dense model's
    measured latency; ``norms``: how the pruned configurations' layer norms were built (see
    :func:`fit_latency`); ``key``: the cache key of the fit (:func:`cache_key`), which a refined
    model keeps, so that what is derived from it can be cached beside it."""

    backend: str
    threads: int
    batch: int
    intercept: float
    coefficients: dict[str, float]
    dense_ms: float
    measured: list[tuple[dict[int, float], float]]
    refined: int = 0
    norms: str = "exact"
    key: str = ""

    def latency(self, cost: CostModel, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        """Predicted milliseconds with kept fractions ``keep`` (differentiable when they are tensors)."""
        terms = _terms(cost, keep or {})
        total: Fraction = self.intercept
        for name, value in terms.items():
            total = total + self.coefficients.get(name, 0.0) * value
        return total

    def fraction(self, cost: CostModel, keep: Mapping[int, Fraction] | None = None) -> Fraction:
        """Predicted latency over the predicted dense latency."""
        return self.latency(cost, keep) / float(self.latency(cost, {}))

    def fit_error(self, cost: CostModel) -> float:
        """Largest relative difference between predicted and measured latency over the fit's data."""
        return max(abs(float(self.latency(cost, k)) - ms) / ms for k, ms in self.measured)

    def to_json(self) -> str:
        data = asdict(self)
        data["measured"] = [[{str(g): f for g, f in k.items()}, ms] for k, ms in self.measured]
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        data = json.loads(text)
        data["measured"] = [({int(g): float(f) for g, f in k.items()}, float(ms)) for k, ms in data["measured"]]
        return cls(**data)


def _versions(backend: str) -> dict[str, str]:
    out = {"torch": torch.__version__}
    if backend == "onnxruntime":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def cache_key(gm: nn.Module, example_inputs: Any, backend: str, threads: int, grid: Any) -> str:
    """A digest of everything that changes a fit: the traced code and parameter shapes, the input
    shapes, the backend, threads, library versions and the sampling grid."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    parts = {
        "code": getattr(gm, "code", type(gm).__name__),
        "params": [(n, tuple(p.shape)) for n, p in gm.named_parameters()],
        "inputs": [tuple(t.shape) for t in inputs],
        "backend": backend, "threads": threads, "versions": _versions(backend), "grid": grid,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


#: Version of the configurations :func:`_configurations` draws and of the terms fitted (part of the cache key).
_DESIGN = 5


def _configurations(sizes: Mapping[int, int], round_to: int, samples: int, seed: int) -> list[dict[int, int]]:
    """Channel counts per group: dense, then ``samples - 1`` draws, each count on the ``round_to``
    grid of its group. Draws alternate between one global kept fraction in [0.25, 1] with per-group
    jitter (plans near uniform) and a fraction drawn for every group on its own in [0.25, 1] (plans
    far from uniform, which a latency-driven plan is: they set the terms apart that near-uniform
    draws move together)."""
    rng = np.random.default_rng(seed)

    def on_grid(size: int, fraction: float) -> int:
        step = grid_step(size, round_to)
        return int(min(size, max(step, step * round(fraction * size / step))))

    configs = [dict(sizes)]
    for i in range(samples - 1):
        if i % 2 == 0:
            scale = rng.uniform(0.25, 1.0)
            fractions = {g: float(np.clip(scale * rng.uniform(0.7, 1.3), 0.05, 1.0)) for g in sizes}
        else:
            fractions = {g: float(rng.uniform(0.25, 1.0)) for g in sizes}
        configs.append({g: on_grid(n, fractions[g]) for g, n in sizes.items()})
    return configs


def fit_latency(
    model: Traceable, example_inputs: Any, *, backend: str = "eager", threads: int = 1, round_to: int = 8,
    samples: int = 16, reps: int = 20, rounds: int = 2, seed: int = 0, cache_dir: str | Path | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None, norms: str = "exact",
) -> LatencyModel:
    """Measure ``model`` on ``backend`` dense and pruned to ``samples - 1`` configurations of its
    prunable channel groups, and fit a :class:`LatencyModel` (see the module docstring).

    ``example_inputs`` fixes the input shape and batch the latency is for. The configurations are
    timed in ``rounds`` passes over all of them, ``ceil(reps / rounds)`` runs each per pass, and a
    configuration's latency is the lowest of its per-pass medians: a burst of other work on the
    machine then spoils one pass of a configuration, not its value. ``cache_dir``: read the fit
    from there when its key matches, else write it there (atomically). ``progress`` wraps the
    ``rounds * samples`` timing steps (e.g. ``tqdm``).

    ``norms``: how the layer norms of a pruned configuration are built. ``'exact'`` (the speedup of
    plain masks): :class:`~graph_passes.ExactStatsNorm`, element-wise ops over the kept channels;
    ``'kept'``: the plain norms of the kept width that a model whose norms were swapped by
    :func:`graph_passes.kept_stats_norms` (fine-tuned with kept-channel statistics) is pruned to.

    ``model`` may also be a traced ``GraphModule`` or its :class:`~graph_passes.Analysis` (see
    :func:`graph_passes.analysis_for`): it is traced once, and each configuration is removed from a
    copy of that trace (the model itself is left alone)."""
    from .cost import cost_of_analysis
    from .dependency import analysis_for

    check_backend(backend)  # before tracing or measuring anything
    _check_norms(norms)
    analysis = analysis_for(model, example_inputs)
    gm = analysis.gm
    cost = cost_of_analysis(gm, analysis)
    sizes = {g.id: g.size for g in analysis.groups if g.prunable}
    if not sizes:
        raise LatencyError("the model has no prunable channel group: its latency cannot change with pruning")
    if rounds < 1 or reps < 1:
        raise LatencyError(f"reps and rounds must be >= 1, got reps={reps!r}, rounds={rounds!r}")
    grid = {"round_to": round_to, "samples": samples, "seed": seed, "reps": reps, "rounds": rounds, "design": _DESIGN,
            "norms": norms}
    key = cache_key(gm, example_inputs, backend, threads, grid)
    cached = Path(cache_dir) / f"latency-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        logger.info("latency model read from %s", cached)
        return LatencyModel.from_json(cached.read_text())
    configs = _configurations(sizes, round_to, samples, seed)
    times = _measure(analysis, example_inputs, configs, backend, threads, reps, rounds, progress, norms)
    rows = [({g: c / sizes[g] for g, c in counts.items()}, ms) for counts, ms in zip(configs, times)]
    fitted = _fit(rows, cost)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    result = LatencyModel(backend=backend, threads=threads, batch=int(inputs[0].shape[0]), intercept=fitted[0],
                          coefficients=fitted[1], dense_ms=rows[0][1], measured=rows, norms=norms, key=key)
    logger.info("latency model on %s: dense %.3f ms, largest fit error %.1f %%", backend, result.dense_ms,
                100 * result.fit_error(cost))
    if cached is not None:
        atomic_write_text(cached, result.to_json())
    return result


def _measure(analysis: Any, example_inputs: Any, configs: list[dict[int, int]], backend: str, threads: int,
             reps: int, rounds: int, progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
             norms: str = "exact") -> list[float]:
    """Milliseconds of the model of ``analysis`` with each configuration's channel counts (an
    empty configuration or every group at its size: the model itself), timed in ``rounds`` passes
    over all of them, ``ceil(reps / rounds)`` runs each per pass; a configuration's latency is the
    lowest of its per-pass medians. ``norms``: see :func:`fit_latency`."""
    from .groups import group_masks
    from .kept_norms import kept_stats_norms
    from .speedup import apply_keep

    sizes = {g.id: g.size for g in analysis.groups if g.prunable}
    per_round = -(-reps // rounds)
    steps = [(r, i) for r in range(rounds) for i in range(len(configs))]
    runners: dict[int, Runner] = {}
    medians: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    with tempfile.TemporaryDirectory(prefix="harp-latency-") as tmp:
        for r, i in progress(steps) if progress is not None else steps:
            if i not in runners:
                counts = configs[i]
                if all(counts.get(g, n) >= n for g, n in sizes.items()):
                    pruned = copy.deepcopy(analysis.gm)  # a copy: a GraphModule shares the model's modules
                else:  # which channels go does not change the time
                    keep = {g: torch.arange(sizes[g]) < counts.get(g, sizes[g]) for g in sizes}
                    fresh = analysis.copy()
                    if norms == "kept":  # the plain norms a fine-tuned structured run ends with
                        kept_stats_norms(fresh.gm, group_masks(fresh.gm, fresh.groups, keep), analysis=fresh)
                    pruned = apply_keep(fresh.gm, fresh, keep)
                work = Path(tmp) / str(i)
                work.mkdir()
                runners[i] = latency_runner(pruned, example_inputs, backend, threads, work)
            medians[i].append(measure_ms(runners[i], reps=per_round, warmup=3 if r == 0 else 1))
        runners.clear()
    return [min(medians[i]) for i in range(len(configs))]


def refine_latency(
    model: Traceable, example_inputs: Any, latency: LatencyModel, configs: Iterable[Mapping[int, int]], *,
    reps: int = 20, rounds: int = 2, progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> LatencyModel:
    """``latency`` fitted again with ``configs`` (kept channel counts by group id; a group left out
    keeps all its channels) measured on its backend, threads and input and added to its data. The
    dense model is timed with them, in the same passes, and each plan's time is scaled by the
    dense time of the fit over the dense time now (``dense_ms / dense now``), so a machine that
    runs at another speed than during the fit does not bias them. Each model runs ``reps / rounds``
    times in a row per pass, as in the fit: run by run in turn, a small plan's weights no longer
    stay in the CPU caches (resnet18 at 32 px, onnxruntime, a plan keeping 56 % of the channels:
    x0.25-0.28 of dense in runs of 10, x0.31-0.41 alternating run by run), so its time would not be
    the time the fit's samples were measured at.

    A plan chosen by minimising predicted latency lands where the fitted model errs most in its
    favour (its groups are reweighted by the model's own figures); measuring that plan and fitting
    again, a few times, corrects the model exactly where the plan lives. ``model`` as for
    :func:`fit_latency` (the model ``latency`` was fitted on, whose ``norms`` it uses; nothing is
    cached)."""
    from .cost import cost_of_analysis
    from .dependency import analysis_for

    analysis = analysis_for(model, example_inputs)
    sizes = {g.id: g.size for g in analysis.groups if g.prunable}
    configs = [dict(c) for c in configs]
    if unknown := sorted({g for c in configs for g in c} - set(sizes)):
        raise LatencyError(f"configurations name channel groups {unknown} that are not prunable groups of this model "
                           f"(those are {sorted(sizes)})")
    if rounds < 1 or reps < 1:
        raise LatencyError(f"reps and rounds must be >= 1, got reps={reps!r}, rounds={rounds!r}")
    # the dense model is timed with the plans and scales them: the fit's data were measured at another
    # time, and a machine that runs slower or faster now (other work, clocks) would bias every plan
    dense_now, *times = _measure(analysis, example_inputs, [dict(sizes), *configs], latency.backend, latency.threads,
                                 reps, rounds, progress, latency.norms)
    scale = latency.dense_ms / dense_now
    rows = latency.measured + [({g: c.get(g, n) / n for g, n in sizes.items()}, ms * scale)
                               for c, ms in zip(configs, times)]
    refined = latency.refined + len(configs)
    intercept, coefficients = _fit(rows, cost_of_analysis(analysis.gm, analysis), refined)
    return LatencyModel(backend=latency.backend, threads=latency.threads, batch=latency.batch, intercept=intercept,
                        coefficients=coefficients, dense_ms=latency.dense_ms, measured=rows, refined=refined,
                        norms=latency.norms, key=latency.key)


#: How much more an anchor of the fit (the dense model, a plan measured by :func:`refine_latency`)
#: weighs than all sampled rows.
#: A plan chosen on the model is where its prediction matters; with equal weight (1) the fit still
#: missed such plans by 2-4 % (resnet50, onnxruntime and eager, 1 thread).
REFINED_WEIGHT = 100.0

#: The FLOPs terms of :data:`TERMS`, and the share of the model's FLOPs below which one of them is
#: fitted at the per-FLOP cost of the largest (see :func:`_fit`).
_FLOPS_TERMS = tuple(_TERM_KINDS)
MIN_FLOPS_SHARE = 0.05

#: Values of ``fit_latency(norms=...)``.
NORMS = ("exact", "kept")


def _check_norms(norms: str) -> None:
    if norms not in NORMS:
        raise LatencyError(f"norms must be one of {', '.join(map(repr, NORMS))}, got {norms!r}")


def _fit(rows: list[tuple[dict[int, float], float]], cost: CostModel, refined: int = 0) -> tuple[float, dict[str, float]]:
    """Non-negative least squares of measured ms on ``[1, terms...]``, relative errors weighted
    alike (every row divided by its measurement), except for the anchors, each of which weighs
    :data:`REFINED_WEIGHT` times as much as all the sampled rows together: the last ``refined``
    rows (plans measured by :func:`refine_latency`) and the dense model (every group kept whole).
    The fit then passes through them where its terms allow, and the samples set the slopes in the
    directions they leave free. The dense model is an anchor because every plan is chosen on its
    predicted *fraction* of the dense latency (:meth:`LatencyModel.fraction`): a plan's time
    fitted exactly over a dense time missed by 7 % is a fraction missed by 7 %."""
    from scipy.optimize import nnls

    dense = _terms(cost, {})
    names = [n for n in TERMS if float(dense[n]) > 0]
    # a FLOPs term with a tiny share of the FLOPs (resnet18's classifier: 0.01 %) has a slope the
    # noise sets, and a large one makes its few channels look like the cheapest latency to cut:
    # such terms count at the per-FLOP cost of the largest FLOPs term instead
    flops_terms = [n for n in names if n in _FLOPS_TERMS]
    total = sum(float(dense[n]) for n in flops_terms)
    major = max(flops_terms, key=lambda n: float(dense[n]), default=None)
    minor = [n for n in flops_terms if n != major and float(dense[n]) < MIN_FLOPS_SHARE * total]
    names = [n for n in names if n not in minor]

    def column(terms: dict[str, Fraction], name: str) -> float:
        return float(terms[name]) + (sum(float(terms[n]) for n in minor) if name == major else 0.0)

    design = np.array([[1.0] + [column(_terms(cost, keep), n) for n in names] for keep, _ in rows])
    target = np.array([ms for _, ms in rows])
    anchors = [i for i, (keep, _) in enumerate(rows) if i >= len(rows) - refined or all(f >= 1 for f in keep.values())]
    weight = np.ones_like(target)
    weight[anchors] = np.sqrt(REFINED_WEIGHT * max(1, len(rows) - len(anchors)))  # squared in the fit
    scale = design.max(axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(design / scale / target[:, None] * weight[:, None], weight)
    solution = solution / scale
    coefficients = {n: float(c) for n, c in zip(names, solution[1:])}
    return float(solution[0]), coefficients | {n: coefficients[major] for n in minor}
