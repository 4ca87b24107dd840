"""Rows, seed aggregation and the Markdown table of benchmarks/robust_pruning.py (not a package API)."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _robust_methods import METHODS


@dataclass
class Row:
    """One model (one method, setting and seed) and what was measured on it."""

    model: str
    image_size: int
    seed: int
    mode: str  # dense | unstructured | structured | latency
    target: float | None  # sparsity (unstructured), fraction of FLOPs removed (structured), of latency kept (latency)
    method: str
    prune_epochs: int = 0
    clean: float | None = None
    pgd20: float | None = None
    autoattack: float | None = None
    robust: float | None = None  # min(pgd20, autoattack)
    pre_clean: float | None = None  # the pruned model before fine-tuning (eval mode, as pruning left it)
    pre_pgd20: float | None = None
    ft_epoch: int | None = None  # fine-tuning epoch whose checkpoint was kept (0: the pruned model itself)
    eval_n: int = 0
    aa_n: int = 0
    kept_params: float | None = None  # non-zero (unstructured) / remaining (structured) params, whole model
    kept_flops: float | None = None  # structured: measured on the smaller model; unstructured: sparse conv/linear
    prune_s: float = 0.0
    finetune_s: float = 0.0
    eval_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the job's process (all its threads): the cost on a loaded machine
    note: str = ""
    rates: dict[str, float] = field(default_factory=dict)  # HARP/HYDRA: kept fraction per layer / group
    history: list[dict[str, Any]] = field(default_factory=list)  # HARP/HYDRA: pruner.history
    frozen_at: int | None = None  # HARP: pruner.schedule.frozen_at
    alloc: dict[str, int] = field(default_factory=dict)  # HARP: kept entries per layer / channel group
    repeats: list[dict[str, Any]] = field(default_factory=list)  # --finetune-repeats > 1: each fine-tuning's numbers
    budget_target: float | None = None  # latency setting: the kept fraction the pruner's budget was given
    budget_kind: str | None = None  # ... of what: 'latency' or 'FLOPs'
    latency_predicted: float | None = None  # latency setting: the latency model's fraction for the final masks
    latency_measured: float | None = None  # latency setting: pruned_ms / dense_ms, measured on the smaller model
    dense_ms: float | None = None
    pruned_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.clean is not None

    @property
    def seconds(self) -> float:
        return self.prune_s + self.finetune_s + self.eval_s


Key = tuple[str, int, str, "float | None", str, int]


def key_of(row: Row) -> Key:
    return (row.model, row.image_size, row.mode, row.target, row.method, row.prune_epochs)


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (sample standard deviation over seeds; ``± n/a`` for a single seed)."""
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f} ± n/a"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _column(rows: Iterable[Row], name: str) -> list[float]:
    return [float(v) for v in (getattr(r, name) for r in rows) if v is not None and math.isfinite(float(v))]


def setting_label(mode: str, target: float | None, prune_epochs: int = 0, default_epochs: int = 0) -> str:
    if mode == "dense":
        return "dense"
    text = (f"{100 * target:.0f} % sparse (unstructured)" if mode == "unstructured"
            else f"latency x{target:g} (structured)" if mode == "latency"
            else f"{100 * target:.0f} % FLOPs removed (structured)")
    if prune_epochs and default_epochs and prune_epochs != default_epochs:
        text += f", {prune_epochs}-epoch pruning schedule"
    return text


def method_label(method: str) -> str:
    return "dense (PGD-AT)" if method == "dense" else METHODS[method].label


def group_rows(rows: Iterable[Row]) -> dict[Key, list[Row]]:
    groups: dict[Key, list[Row]] = defaultdict(list)
    for r in rows:
        groups[key_of(r)].append(r)
    return groups


def harp_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Per setting: the spread of HARP's learned kept fractions and where gamma froze, per seed."""
    lows = [min(r.rates.values()) for r in rows if r.rates]
    highs = [max(r.rates.values()) for r in rows if r.rates]
    spreads = [hi - lo for lo, hi in zip(lows, highs)]
    first_met = [next((int(h["epoch"]) for h in r.history if h.get("target_met")), None) for r in rows]
    start = [float(r.history[0]["kept_fraction"]) for r in rows if r.history and "kept_fraction" in r.history[0]]
    return {
        "units": max((len(r.rates) for r in rows), default=0),
        "min": lows, "max": highs, "spread": spreads,
        "first_met": first_met, "frozen_at": [r.frozen_at for r in rows],
        "start_kept": start,
        "target_kept": [float(r.history[0]["target_fraction"]) for r in rows
                        if r.history and "target_fraction" in r.history[0]],
    }


def _before(rows: Sequence[Row]) -> str:
    """The pruned models' clean / PGD-20 accuracy before fine-tuning (means over seeds)."""
    clean, pgd = _column(rows, "pre_clean"), _column(rows, "pre_pgd20")
    if not clean:
        return "—"
    return f"{100 * statistics.fmean(clean):.1f} / {100 * statistics.fmean(pgd):.1f}"


def _epochs(values: Sequence[int | None]) -> str:
    return ", ".join("never" if v is None else str(v) for v in values) or "—"


def render(header: Sequence[str], rows: Sequence[Row], prune_epochs: int) -> str:
    """The Markdown report: ``header`` lines, then per model a table of mean ± std over seeds and
    HARP's learned allocation per setting."""
    lines = list(header)
    groups = group_rows(r for r in rows)
    models = list(dict.fromkeys((r.model, r.image_size) for r in rows))
    order = {name: i for i, name in enumerate(["dense", *METHODS])}
    for model, size in models:
        keys = [k for k in groups if (k[0], k[1]) == (model, size)]
        keys.sort(key=lambda k: (_MODE_ORDER.get(k[2], 9), k[3] or 0, k[5] != prune_epochs, k[5],
                                 order.get(k[4], 99)))
        seeds = sorted({r.seed for r in rows if (r.model, r.image_size) == (model, size)})
        lines += ["", (f"## `{model}` at {size} px ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
                  f"{', '.join(map(str, seeds))})"), "",
                  ("| setting | method | clean | PGD-20 | AutoAttack | robust | before FT: clean / PGD-20 | FT epoch kept "
                  "| kept params | kept FLOPs | wall s | CPU s | seeds | note |"),
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for k in keys:
            group = groups[k]
            done = [r for r in group if r.ok]
            notes = sorted({r.note for r in group if r.note})
            secs, cpu = _column(done, "seconds"), _column(done, "cpu_s")
            lines.append(
                f"| {setting_label(k[2], k[3], k[5], prune_epochs)} | {method_label(k[4])} | "
                f"{mean_std(_column(done, 'clean'))} | {mean_std(_column(done, 'pgd20'))} | "
                f"{mean_std(_column(done, 'autoattack'))} | **{mean_std(_column(done, 'robust'))}** | "
                f"{_before(done)} | {_epochs([r.ft_epoch for r in done]) if k[2] != 'dense' else '—'} | "
                f"{mean_std(_column(done, 'kept_params'))} | {mean_std(_column(done, 'kept_flops'))} | "
                f"{statistics.fmean(secs) if secs else 0:.0f} | {statistics.fmean(cpu) if cpu else 0:.0f} | {len(done)} | "
                f"{'; '.join(notes)} |")
        lines += _latency_table(model, [(k, groups[k]) for k in keys if k[2] == "latency"])
        harp_keys = [k for k in keys if k[4] == "harp" and any(r.rates for r in groups[k])]
        if harp_keys:
            lines += ["", f"### HARP's learned allocation (`{model}`)", "",
                      ("Kept fraction per layer (unstructured) / per channel group (structured) of HARP's final masks: "
                      "min, max and spread (max - min) over the units, mean ± std over seeds; the kept fraction of the "
                      "budgeted resource (params / FLOPs) at the end of the first pruning epoch; the first epoch whose "
                      "end met the target and the epoch at which gamma froze, per seed."), "",
                      ("| setting | units | min kept | max kept | spread | kept after epoch 0 (target) | "
                      "first met (per seed) | gamma frozen at (per seed) |"),
                      "|---|---:|---:|---:|---:|---:|---|---|"]
            for k in harp_keys:
                s = harp_summary([r for r in groups[k] if r.ok])
                target = f" ({100 * s['target_kept'][0]:.1f})" if s["target_kept"] else ""
                lines.append(
                    f"| {setting_label(k[2], k[3], k[5], prune_epochs)} | {s['units']} | "
                    f"{mean_std(s['min'], digits=1)} | {mean_std(s['max'], digits=1)} | "
                    f"{mean_std(s['spread'], digits=1)} | {mean_std(s['start_kept'])}{target} | "
                    f"{_epochs(s['first_met'])} | {_epochs(s['frozen_at'])} |")
        repeated = [k for k in keys if any(r.repeats for r in groups[k])]
        if repeated:
            lines += ["", f"### Fine-tuning spread (`{model}`)", "",
                      ("Robust accuracy (%) of each fine-tuning of each pruned model (`--finetune-repeats`), per seed, and "
                      "the pooled standard deviation of the same pruned model fine-tuned again."), "",
                      "| setting | method | robust per fine-tuning (per seed) | within-model std |", "|---|---|---|---:|"]
            for k in repeated:
                runs = [[100 * x["robust"] for x in r.repeats] for r in groups[k] if r.ok and r.repeats]
                lines.append(f"| {setting_label(k[2], k[3], k[5], prune_epochs)} | {method_label(k[4])} | "
                             f"{'; '.join(' '.join(f'{x:.1f}' for x in run) for run in runs)} | {pooled_std(runs):.1f} |")
    return "\n".join(lines).rstrip() + "\n"


_MODE_ORDER = {"dense": 0, "unstructured": 1, "structured": 2, "latency": 3}


def _latency_table(model: str, settings: Sequence[tuple[Key, list[Row]]]) -> list[str]:
    """The latency setting: what each pruner's budget was given, where it landed (measured and
    predicted fraction of the dense latency) and its robustness, mean ± std over seeds."""
    if not settings:
        return []
    lines = ["", f"### A latency budget against a FLOPs budget at the same latency (`{model}`)", "",
             ("HARP with a latency budget (kept fraction of the dense latency the latency model predicts) against HARP "
              "with its FLOPs budget at the FLOPs of the uniform plan that same latency model predicts at the target. "
              "Measured: the physically pruned model's latency over the dense model's, timed alternately on the same "
              "backend, threads and input (one image); predicted: the latency model's fraction for the final channel "
              "counts; budget: the kept fraction each pruner was given (latency, or FLOPs). In %, mean ± std over "
              "seeds."), "",
             ("| setting | method | budget given | measured latency | predicted latency | kept FLOPs | clean | PGD-20 "
              "| AutoAttack | robust | dense ms / pruned ms | seeds |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, group in settings:
        done = [r for r in group if r.ok]
        dense_ms, pruned_ms = _column(done, "dense_ms"), _column(done, "pruned_ms")
        ms = (f"{statistics.fmean(dense_ms):.3g} / {statistics.fmean(pruned_ms):.3g}" if dense_ms and pruned_ms
              else "—")
        kind = " / ".join(sorted({r.budget_kind for r in done if r.budget_kind}))
        lines.append(
            f"| {setting_label(k[2], k[3])} | {method_label(k[4])} | {kind} {mean_std(_column(done, 'budget_target'))} | "
            f"{mean_std(_column(done, 'latency_measured'))} | {mean_std(_column(done, 'latency_predicted'))} | "
            f"{mean_std(_column(done, 'kept_flops'))} | {mean_std(_column(done, 'clean'))} | "
            f"{mean_std(_column(done, 'pgd20'))} | {mean_std(_column(done, 'autoattack'))} | "
            f"**{mean_std(_column(done, 'robust'))}** | {ms} | {len(done)} |")
    return lines


def pooled_std(groups: Sequence[Sequence[float]]) -> float:
    """The standard deviation within groups, pooled over them (nan without two values in one)."""
    dof = sum(len(g) - 1 for g in groups)
    if dof < 1:
        return float("nan")
    return math.sqrt(sum((x - statistics.fmean(g)) ** 2 for g in groups for x in g) / dof)
