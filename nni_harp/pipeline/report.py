"""The run's report: dense vs pruned metrics as a dataclass, a text table, JSON and Markdown."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .._io import atomic_write_text

__all__ = ["ModelMetrics", "Report", "format_table", "METRIC_ROWS"]


@dataclass(frozen=True)
class ModelMetrics:
    """What is measured on one model (dense or pruned). Accuracies are fractions in [0, 1]."""

    clean_acc: float
    pgd_acc: float
    autoattack_acc: float | None
    eval_samples: int
    params: int  # parameters stored by the model (all of them)
    nonzero_params: int  # parameters that are not zero (what unstructured pruning reduces)
    flops: int  # FLOPs of one forward pass on one image (2 x MACs), dense execution
    effective_flops: int  # FLOPs counting only non-zero weights (= flops for structured models)
    file_bytes: int  # size of the saved state dict
    compressed_bytes: int  # size of the saved state dict after zlib compression (sparsity shows here)
    latency_ms_torch: float | None  # median CPU latency, batch 1, PyTorch eager
    latency_ms_onnx: float | None  # median CPU latency, batch 1, onnxruntime
    latency_threads: int | None = None  # CPU threads both latencies were measured with (None: older reports)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelMetrics":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


# (key, label, kind) in table order; kind selects the formatting
METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("clean_acc", "clean accuracy", "pct"),
    ("pgd_acc", "PGD accuracy", "pct"),
    ("autoattack_acc", "AutoAttack accuracy", "pct"),
    ("params", "parameters", "count"),
    ("nonzero_params", "non-zero parameters", "count"),
    ("flops", "FLOPs (dense execution)", "count"),
    ("effective_flops", "FLOPs (non-zero weights)", "count"),
    ("file_bytes", "model file size", "bytes"),
    ("compressed_bytes", "model file size (zlib)", "bytes"),
    ("latency_ms_torch", "CPU latency, PyTorch (ms)", "ms"),
    ("latency_ms_onnx", "CPU latency, onnxruntime (ms)", "ms"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "pct":
        return f"{100.0 * value:.2f} %"
    if kind == "count":
        value = int(value)
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= scale:
                return f"{value / scale:.3f} {unit}"
        return str(value)
    if kind == "bytes":
        value = int(value)
        for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
            if value >= scale:
                return f"{value / scale:.2f} {unit}"
        return f"{value} B"
    if kind == "ms":
        return f"{value:.3f}"
    return str(value)


def _ratio(dense: Any, pruned: Any, kind: str) -> str:
    if dense is None or pruned is None:
        return ""
    if kind == "pct":
        return f"{100.0 * (pruned - dense):+.2f} pt"
    if not dense:
        return ""
    return f"x{pruned / dense:.3f}"


def format_table(rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> str:
    """A plain-text table with aligned columns (first column left, the others right)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(cells)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


@dataclass(frozen=True)
class Report:
    """Everything a run measured; ``pruned`` is None for ``nni-harp evaluate`` of one model."""

    model: str
    mode: str
    dataset: str
    target: dict[str, float]
    dense: ModelMetrics | None
    pruned: ModelMetrics | None
    layer_rates: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, float] = field(default_factory=dict)  # max |difference| of speedup / ONNX outputs, ranks
    pruner: str = "harp"  # the registry name of the pruner that made the masks
    achieved: dict[str, float] = field(default_factory=dict)  # sparsity (of Conv/Linear weights), flops_kept
    # --budget latency: target, predicted and measured latency fractions (pruned / dense), backend, ...
    latency_budget: dict[str, Any] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """Which models the report holds: both, or the one of ``nni-harp evaluate``."""
        return tuple(name for name in ("dense", "pruned") if getattr(self, name) is not None)

    def rows(self) -> list[tuple[str, ...]]:
        """Table rows: (metric, dense, pruned, pruned/dense), or (metric, value) for one model."""
        out: list[tuple[str, ...]] = []
        threads = {m.latency_threads for m in (self.dense, self.pruned) if m is not None} - {None}
        for key, label, kind in METRIC_ROWS:
            d = getattr(self.dense, key) if self.dense is not None else None
            p = getattr(self.pruned, key) if self.pruned is not None else None
            if key.startswith("latency_ms") and threads:
                n = "/".join(str(t) for t in sorted(threads))
                label = label.replace("(ms)", f"(ms, {n} thread{'s' if n != '1' else ''})")
            if len(self.columns) == 2:
                out.append((label, _fmt(d, kind), _fmt(p, kind), _ratio(d, p, kind)))
            else:
                out.append((label, _fmt(d if self.dense is not None else p, kind)))
        return out

    def headers(self) -> tuple[str, ...]:
        if len(self.columns) == 2:
            return ("metric", "dense", "pruned", "pruned/dense")
        return ("metric", self.columns[0] if self.columns else "value")

    def table(self) -> str:
        head = f"{self.model} on {self.dataset}, {self.mode}"
        if self.target:
            head += ", target " + ", ".join(f"{k} {v:g}" for k, v in self.target.items())
        n = (self.pruned or self.dense).eval_samples if (self.pruned or self.dense) else 0
        head += f" (attacks on {n} test images)"
        text = head + "\n" + format_table(self.rows(), self.headers())
        lb = self.latency_budget
        if lb:
            text += (f"\n\nlatency budget on {lb['backend']} ({lb.get('threads', '?')} thread(s), the input's shape): "
                     f"target x{lb['target']:.3f}, predicted x{lb['predicted']:.3f}, measured x{lb['measured']:.3f} "
                     "of the dense latency")
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["table_rows"] = [list(r) for r in self.rows()]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Report":
        kwargs = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("dense", "pruned"):
            if kwargs.get(key) is not None:
                kwargs[key] = ModelMetrics.from_dict(kwargs[key])
        return cls(**kwargs)

    def to_markdown(self) -> str:
        lines = [f"# HARP report: {self.model}", ""]
        lines.append(f"- dataset: {self.dataset}")
        lines.append(f"- mode: {self.mode}")
        if self.pruned is not None:
            lines.append(f"- pruner: {self.pruner}")
        for k, v in self.target.items():
            lines.append(f"- target {k}: {v:g}")
        for k, v in self.achieved.items():
            lines.append(f"- achieved {k}: {v:.4g}")
        lb = self.latency_budget
        if lb:
            lines.append(f"- latency budget ({lb['backend']}, {lb.get('threads', '?')} thread(s)): target {lb['target']:.3g}, "
                         f"predicted {lb['predicted']:.3g}, measured {lb['measured']:.3g} of the dense latency "
                         f"({lb.get('pruned_ms', float('nan')):.3f} / {lb.get('dense_ms', float('nan')):.3f} ms)")
            if lb.get("checks"):  # the pruner's measured checks of its final plan (HARPSettings.latency_checks)
                lines.append("- final plan measured while pruning (a plan more than 10 % over the target is counted "
                             "again with the model refitted on it): "
                             + "; ".join(f"x{c['measured']:.3f} (predicted x{c['predicted']:.3f})" for c in lb["checks"]))
        if self.stage_seconds:
            lines.append("- stage wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items()))
        heads = self.headers()
        lines += ["", "| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        if self.checks:
            lines += ["", "Checks: " + ", ".join(f"{k} = {v:.3g}" for k, v in self.checks.items())]
        if self.layer_rates:
            lines += ["", "## Learned kept fraction per layer", "", "| layer | kept |", "|---|---:|"]
            lines += [f"| {name} | {rate:.4f} |" for name, rate in self.layer_rates.items()]
        if self.history:
            lines += ["", "## Pruning history", ""]
            met = next((h.get("epoch") for h in self.history if h.get("target_met") and h.get("phase")), None)
            if met is not None:
                lines += [f"The target was first met at the end of epoch {int(met) + 1}; gamma is frozen from then on.", ""]
            lines += ["| epoch | phase | gamma | kept fraction | adv loss | hw loss |", "|---:|---|---:|---:|---:|---:|"]
            for h in self.history:
                notes = ", ".join(note for key, note in _EPOCH_NOTES if h.get(key))
                lines.append("| {} | {} | {} | {} | {} | {} |".format(
                    int(h.get("epoch", 0)) + 1, (h.get("phase") or "") + (f" ({notes})" if notes else ""),
                    *(_num(h.get(k)) for k in ("gamma", "kept_fraction", "adv_loss", "hw_loss"))
                ))
        if self.files:
            lines += ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in self.files.items()]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` (atomically) into ``out_dir``."""
        out = Path(out_dir)
        js = atomic_write_text(out / f"{stem}.json", json.dumps(self.to_dict(), indent=2, default=_json_default))
        md = atomic_write_text(out / f"{stem}.md", self.to_markdown())
        return js, md


#: What the pruning run did at an epoch's end, by history key, as the markdown history names it.
_EPOCH_NOTES = (("held", "held to the glide path"), ("forced", "projected onto the target"),
                ("settled", "final masks fixed"))


def _num(v: Any) -> str:
    if v is None:
        return ""
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
