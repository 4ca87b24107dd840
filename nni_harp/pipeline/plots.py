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
    rates: Mapping[str, float], uniform: float | None, path: str | Path, title: str = "",
    start: Mapping[str, float] | None = None, latency: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Bars of the learned kept fraction per layer, with the uniform target as a horizontal line and,
    when given, where each layer started (``start``, markers).

    A latency-budget run (``latency``: report.json's ``latency_budget``; ``groups``: per group its
    ``latency_share`` and ``flops_share``) gets a second panel showing what the latency budget
    weighs differently from a FLOPs budget: for every group, its share of the latency and its share
    of the FLOPs that fall with its channels (``d cost / d kept fraction`` of the dense model,
    normalised over the groups). HARP's hinge pulls on a group's rate in proportion to that share,
    so where the latency bar is the taller one the latency budget prunes harder than a FLOPs
    budget would. The uniform line is then the one channel fraction that meets the latency
    target, and the target, predicted and measured latency fractions are written on the plot."""
    names = list(rates)
    values = [float(rates[n]) for n in names]
    shares = {n: groups[n] for n in names if groups and n in groups}
    width = min(max(8.0 if shares else 6.0, 0.28 * len(names) + 2.0), 40.0)
    fig = _figure(width, 9.0 if shares else 4.5)
    ax = fig.add_subplot(2 if shares else 1, 1, 1)
    if names:
        ax.bar(range(len(names)), values, color="tab:blue", label="learned kept fraction")
        if start:
            xs = [i for i, n in enumerate(names) if n in start]
            ax.scatter(xs, [float(start[names[i]]) for i in xs], marker="_", s=120, color="black", zorder=3,
                       label="start of pruning")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
        if shares:
            ax.tick_params(labelbottom=False)  # the panel below names the groups
    else:
        ax.text(0.5, 0.5, "no per-layer rates recorded", ha="center", va="center", transform=ax.transAxes)
    if uniform is not None:
        what = "uniform channel fraction at the latency target" if latency else "uniform target"
        ax.axhline(uniform, color="tab:red", linestyle="--", label=f"{what} {uniform:.3g}")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("kept fraction")
    heading = title or "HARP: learned kept fraction per layer"
    ax.set_title(heading + "\n" + _latency_note(latency) if latency else heading, fontsize=10 if latency else None)
    if names or uniform is not None:
        ax.legend(loc="upper right", fontsize=8)
    if shares:
        _plot_shares(fig.add_subplot(2, 1, 2, sharex=ax), names, shares, str((latency or {}).get("backend", "")))
        fig.tight_layout()
    return _save(fig, path)


def _latency_note(latency: Mapping[str, Any]) -> str:
    """The latency budget's numbers, as fractions of the dense model's latency."""
    def fmt(key: str) -> str:
        value = latency.get(key)
        return "n/a" if value is None else f"x{float(value):.3f}"

    note = (f"latency ({latency.get('backend', '?')}, {latency.get('threads', '?')} thread(s)): target {fmt('target')}, "
            f"predicted {fmt('predicted')}, measured {fmt('measured')}")
    if latency.get("flops_kept") is not None:
        note += f"; FLOPs {fmt('flops_kept')}"
    return note


def _plot_shares(ax: Any, names: Sequence[str], shares: Mapping[str, Mapping[str, float]], backend: str) -> None:
    """Paired bars per group: its share of the latency (the latency budget's pull) and of the FLOPs."""
    xs = [i for i, n in enumerate(names) if n in shares]
    bar = 0.4
    ax.bar([x - bar / 2 for x in xs], [float(shares[names[x]]["latency_share"]) for x in xs], width=bar,
           color="tab:orange", label=f"share of the latency ({backend} latency model)" if backend else "share of the latency")
    ax.bar([x + bar / 2 for x in xs], [float(shares[names[x]]["flops_share"]) for x in xs], width=bar,
           color="tab:gray", label="share of the FLOPs")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("share of d(cost)/d(kept fraction)")
    ax.set_title("each group's share of the cost (dense model): the latency budget prunes harder where orange is taller",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=8)


#: Background colour and legend text of each phase of HARP's schedule (``history[i]['phase']``).
_PHASE_STYLE = {
    "robustness": ("#d9f0d3", "robustness first (gamma growing)"),
    "descent": ("#fde0c5", "descent to the target (gamma growing)"),
    "balance": ("#d6e6f5", "balance (gamma frozen)"),
}


def plot_history(history: Sequence[Mapping[str, Any]], target: float | None, path: str | Path, title: str = "") -> Path:
    """The pruning schedule: the kept fraction at every epoch boundary (right axis; the first point
    is where pruning started), gamma per epoch (left axis, log scale when positive), the phase of
    every epoch as background colour (hatched: settling on the final masks), the epoch ends the
    glide path held (``held``), and the epoch that first met the target (gamma frozen after it)."""
    def number(h: Mapping[str, Any], key: str) -> float:
        value = h.get(key)
        return float(value) if value is not None else float("nan")

    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    if not history:
        ax.text(0.5, 0.5, "no pruning history recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title or "HARP: gamma and kept fraction per epoch")
        return _save(fig, path)
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    n = len(history)
    shown: dict[str, Any] = {}
    for i, h in enumerate(history):
        style = _PHASE_STYLE.get(str(h.get("phase")))
        if style is not None:
            ax.axvspan(i, i + 1, color=style[0], zorder=0, linewidth=0)
            shown.setdefault(str(h.get("phase")), Patch(color=style[0], label=style[1]))
        if h.get("settled"):
            ax.axvspan(i, i + 1, facecolor="none", edgecolor="grey", hatch="//", zorder=0, linewidth=0)
            shown.setdefault("settled", Patch(facecolor="none", edgecolor="grey", hatch="//",
                                              label="final masks fixed (settling)"))
    gamma = [number(h, "gamma") for h in history]
    ax.step(range(n + 1), gamma + gamma[-1:], where="post", color="tab:orange", label="gamma (per epoch)")
    if all(g > 0 for g in gamma):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, n)
    ax.set_xlabel("pruning epoch (end)")
    ax.set_ylabel("gamma", color="tab:orange")
    ax2 = ax.twinx()
    kept = [number(history[0], "kept_start") if "kept_start" in history[0] else float("nan")]
    kept += [number(h, "kept_fraction") for h in history]
    ax2.plot(range(n + 1), kept, marker="s", color="tab:blue", label="kept fraction")
    held = [i + 1 for i, h in enumerate(history) if h.get("held")]
    if held:
        ax2.plot(held, [kept[i] for i in held], linestyle="none", marker="v", markersize=9, color="tab:purple",
                 label="held to the glide path (projected)")
    if target is not None:
        ax2.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.3g}")
    # HYDRA's history has no phases: its rates are fixed, so there is no schedule to freeze
    met = next((i for i, h in enumerate(history) if h.get("target_met") and h.get("phase")), None)
    if met is not None:
        how = ("met" if not history[met].get("forced") else
               "forced (settling)" if history[met].get("settled") else "forced (descent deadline)")
        ax2.axvline(met + 1, color="black", linestyle=":", label=f"target {how} after epoch {met + 1}: gamma frozen")
    ax2.set_ylabel("kept fraction", color="tab:blue")
    ax2.set_ylim(0.0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0] + list(shown.values())
    # below the axes, so it never hides the curve
    ax2.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
    ax.set_title(title or "HARP: gamma and kept fraction per epoch")
    return _save(fig, path)
