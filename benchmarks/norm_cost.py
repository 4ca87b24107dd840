"""What a pruned LayerNorm costs in ONNX Runtime, against a dense LayerNormalization of the same width.

When channels go from a tensor a LayerNorm normalises, the masked model still counts them (as
zeros) in its mean and variance, so the speedup pass replaces the norm by
``graph_passes.ExactStatsNorm`` over the kept channels with the original count. That keeps the
pruned model equal to the masked one, but exports as a chain of element-wise ONNX nodes where a
plain ``nn.LayerNorm`` exports as one fused ``LayerNormalization``. Issue #11's goal: the pruned
norm costs no more than 1.5x a dense LayerNormalization of the same (kept) width. The route #11
builds for fine-tuned models: the masked model normalises over the kept channels
(``graph_passes.kept_stats_norms`` swaps in ``KeptStatsNorm``) and the speedup emits a plain norm of
the kept width; the 'kept route' column times the norm the speedup emits that way (a LayerNorm
pruned inside linear -> norm -> linear, taken out of the pruned model).

For each width (convnext_tiny's four stages and vit_small's embedding, at 224 px and batch 1) the
script exports four one-norm models -- ``LayerNorm(kept)``, ``ExactStatsNorm(kept of original)``,
the kept route's norm and ``LayerNorm(original)`` -- and times each alternately with
``LayerNorm(kept)`` in ONNX Runtime (CPU, ``--threads``), min over ``--reps`` runs.

    python benchmarks/norm_cost.py [--reps 200] [--threads 1] [--keep 0.5]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
import torch  # noqa: E402

import graph_passes as gp  # noqa: E402
from _common import RESULTS, alternate_timings, prune_kept_norms, write_atomic  # noqa: E402

#: (label, tokens, channels): the LayerNorm inputs of convnext_tiny's stages and vit_small at 224 px.
SHAPES = (("convnext_tiny stage 1", 56 * 56, 96), ("convnext_tiny stage 2", 28 * 28, 192),
          ("convnext_tiny stage 3", 14 * 14, 384), ("convnext_tiny stage 4", 7 * 7, 768),
          ("vit_small_patch16_224", 197, 384))
GOAL = 1.5


def _kept(channels: int, keep: float) -> int:
    return max(8, 8 * round(channels * keep / 8))


def _exact(kept: int, original: int) -> torch.nn.Module:
    weight, bias = torch.rand(kept) + 0.5, torch.rand(kept) - 0.5
    return gp.ExactStatsNorm("layer", -1, False, original, weight, bias, 1e-6).eval()


def _kept_route(kept: int, original: int) -> torch.nn.Module:
    """The norm the speedup emits for a LayerNorm fine-tuned with kept statistics: linear -> norm ->
    linear, ``kept`` of the norm's channels kept (random), pruned as the pipeline prunes such a model
    (``_common.prune_kept_norms``); the pruned norm taken out."""
    gen = torch.Generator().manual_seed(original)
    model = torch.nn.Sequential(torch.nn.Linear(original, original), _plain(original), torch.nn.Linear(original, 8)).eval()
    x = torch.randn(1, 4, original, generator=gen)
    groups = gp.channel_groups(copy.deepcopy(model), x)
    keep = torch.zeros(original, dtype=torch.bool)
    keep[torch.randperm(original, generator=gen)[:kept]] = True
    keep_by_group = {g.id: keep for g in groups if g.prunable and "1" in {m.module for m in g.members}}
    return prune_kept_norms(model, x, groups, keep_by_group).get_submodule("1").eval()


def _plain(width: int) -> torch.nn.Module:
    norm = torch.nn.LayerNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of the channels kept (rounded to 8)")
    ap.add_argument("--output", type=Path, default=RESULTS / "norm_cost.md")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="norm_cost_") as tmp:
        for label, tokens, channels in SHAPES:
            kept = _kept(channels, args.keep)
            runners, nodes = {}, {}
            for name, module, width in (("plain kept", _plain(kept), kept), ("exact kept", _exact(kept, channels), kept),
                                        ("kept route", _kept_route(kept, channels), kept),
                                        ("plain original", _plain(channels), channels)):
                x = torch.randn(1, tokens, width)
                path = gp.export_onnx(module, (x,), Path(tmp) / f"{name.replace(' ', '_')}_{channels}.onnx")
                nodes[name] = len(onnx.load(str(path)).graph.node)
                runners[name] = gp.onnx_runner(path, (x,), threads=args.threads)
            exact = alternate_timings(runners["exact kept"], runners["plain kept"], args.reps)
            route = alternate_timings(runners["kept route"], runners["plain kept"], args.reps)
            dense = alternate_timings(runners["plain original"], runners["plain kept"], args.reps)
            row = {"label": label, "tokens": tokens, "channels": channels, "kept": kept,
                   "plain_kept_us": 1e6 * min(exact["b"] + route["b"] + dense["b"]), "exact_us": 1e6 * min(exact["a"]),
                   "route_us": 1e6 * min(route["a"]), "plain_original_us": 1e6 * min(dense["a"]), "nodes": nodes}
            row["ratio"] = row["exact_us"] / row["plain_kept_us"]
            row["route_ratio"] = row["route_us"] / row["plain_kept_us"]
            rows.append(row)
            print(f"{label:24s} {kept}/{channels} ch x {tokens} tokens: LayerNorm({kept}) {row['plain_kept_us']:.1f} us, "
                  f"ExactStatsNorm {row['exact_us']:.1f} us ({row['ratio']:.2f}x, {nodes['exact kept']} nodes), "
                  f"kept route {row['route_us']:.1f} us ({row['route_ratio']:.2f}x, {nodes['kept route']} nodes), "
                  f"LayerNorm({channels}) {row['plain_original_us']:.1f} us", flush=True)
    met = sum(r["ratio"] <= GOAL for r in rows)
    met_route = sum(r["route_ratio"] <= GOAL for r in rows)
    lines = [
        "# A pruned LayerNorm in ONNX Runtime",
        "",
        "One-norm models exported with `graph_passes.export_onnx` and timed alternately in ONNX Runtime (CPU "
        f"execution provider, {args.threads} intra-op thread(s), default graph optimisations), min over {args.reps} "
        f"runs each, batch 1, {args.keep:g} of the channels kept (rounded to 8). 'exact' is "
        "`graph_passes.ExactStatsNorm`, what the speedup pass puts in place of a LayerNorm whose channels were "
        "pruned; 'kept route' is the norm it puts there when the masked model was fine-tuned with statistics over "
        "the kept channels (`graph_passes.kept_stats_norms`, the pipeline's default `--norm-stats kept`); goal "
        f"(#11): at most {GOAL}x a LayerNormalization of the kept width.",
        "",
        f"Command: `python benchmarks/norm_cost.py --reps {args.reps} --threads {args.threads} --keep {args.keep:g}`",
        "",
        f"**Goal met in {met}/{len(rows)} rows by ExactStatsNorm, in {met_route}/{len(rows)} by the kept route.**",
        "",
        "| input | tokens | channels kept / original | LayerNorm(kept) us | ExactStatsNorm us | ratio | kept route us "
        "| ratio | nodes (LayerNorm / exact / kept route) | LayerNorm(original) us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['label']} | {r['tokens']} | {r['kept']} / {r['channels']} | {r['plain_kept_us']:.1f} | "
              f"{r['exact_us']:.1f} | {r['ratio']:.2f}x | {r['route_us']:.1f} | {r['route_ratio']:.2f}x | "
              f"{r['nodes']['plain kept']} / {r['nodes']['exact kept']} / {r['nodes']['kept route']} | "
              f"{r['plain_original_us']:.1f} |" for r in rows]
    write_atomic(args.output, "\n".join(lines) + "\n")
    print(f"goal (<= {GOAL}x) met in {met}/{len(rows)} rows by ExactStatsNorm, {met_route}/{len(rows)} by the kept "
          f"route; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
