"""PNG plots of what HARP learned: per-layer kept fractions and the pruning schedule.

Uses matplotlib's Agg backend through an explicit ``Figure`` (no pyplot state), so plotting works
headless and does not change the backend of a caller that uses pyplot itself.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._io import atomic_write_bytes

__all__ = ["plot_layer_rates", "plot_history"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_layer_rates(
    rates: Mapping[str, float], uniform: float | None, path: str | Path, title: str = ""
) -> Path:
    """Bars of the learned kept fraction per layer, with the uniform target as a horizontal line."""
    names = list(rates)
    values = [float(rates[n]) for n in names]
    width = min(max(6.0, 0.28 * len(names) + 2.0), 40.0)
    fig = _figure(width, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    if names:
        ax.bar(range(len(names)), values, color="tab:blue", label="learned kept fraction")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no per-layer rates recorded", ha="center", va="center", transform=ax.transAxes)
    if uniform is not None:
        ax.axhline(uniform, color="tab:red", linestyle="--", label=f"uniform target {uniform:.3g}")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("kept fraction")
    ax.set_title(title or "HARP: learned kept fraction per layer")
    if names or uniform is not None:
        ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_history(history: Sequence[Mapping[str, Any]], target: float | None, path: str | Path, title: str = "") -> Path:
    """gamma (left axis, log scale when positive) and kept fraction (right axis) per pruning epoch."""
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]  # 1-based, as the progress shows
    gamma = [float(h["gamma"]) if h.get("gamma") is not None else float("nan") for h in history]
    kept = [float(h["kept_fraction"]) if h.get("kept_fraction") is not None else float("nan") for h in history]
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if history:
        ax.plot(epochs, gamma, marker="o", color="tab:orange", label="gamma")
        if all(g > 0 for g in gamma):
            ax.set_yscale("log")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("pruning epoch")
        ax.set_ylabel("gamma", color="tab:orange")
        ax2 = ax.twinx()
        ax2.plot(epochs, kept, marker="s", color="tab:blue", label="kept fraction")
        if target is not None:
            ax2.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.3g}")
        ax2.set_ylabel("kept fraction", color="tab:blue")
        ax2.set_ylim(0.0, 1.05)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pruning history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "HARP: gamma and kept fraction per epoch")
    return _save(fig, path)
