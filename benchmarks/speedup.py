"""Measured CPU latency of dense vs pruned models next to their FLOPs ratio.

Each model is pruned to half its FLOPs: one keep fraction for every prunable group, found by
bisection on ``graph_passes.cost(...).flops``, keeping each group's highest-L2-norm channels
(``graph_passes.channel_norms``). Latency: median wall time per batch, eager PyTorch and ONNX
Runtime (CPU), batch 1 and 32 at 224 px. Writes ``results/speedup.md``.

    python benchmarks/speedup.py [--models resnet50,...] [--reps N] [--threads T]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402

import graph_passes as gp  # noqa: E402
from _common import RESULTS, calibrate_norms, n_flops, n_params, write_atomic  # noqa: E402

MODELS = ["resnet50", "mobilenetv3_large_100", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224"]
TARGET = 0.5


def _rounded(n: float, size: int, round_to: int) -> int:
    """Kept channels of a group: ``n`` rounded to a multiple of ``round_to`` (never 0, never more
    than the group). Channel counts that are multiples of 8 keep the vectorised CPU kernels
    (oneDNN / ONNX Runtime's NCHWc layouts) on their fast paths."""
    if round_to > 1 and size > round_to:
        return int(min(size, max(round_to, round_to * round(n / round_to))))
    return int(min(size, max(1, round(n))))


def keep_for_target(model: torch.nn.Module, x: torch.Tensor, target: float, round_to: int = 1):
    groups = gp.channel_groups(model, x)
    cm = gp.cost(model, x)
    prunable = [g for g in groups if g.prunable]

    def keep_of(frac: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in prunable:
            k = _rounded(frac * g.size, g.size, round_to)
            top = torch.topk(gp.channel_norms(model, g), k).indices
            v = torch.zeros(g.size, dtype=torch.bool)
            v[top] = True
            out[g.id] = v
        return out

    def flops_at(frac: float) -> float:
        keep = keep_of(frac)
        return float(cm.flops({gid: float(v.sum()) / v.numel() for gid, v in keep.items()})) / cm.total_flops

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if flops_at(mid) > target:
            hi = mid
        else:
            lo = mid
    frac = hi if abs(flops_at(hi) - target) < abs(flops_at(lo) - target) else lo
    return groups, keep_of(frac), frac


def latency(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(min, median) wall time of ``fn`` over ``reps`` runs after ``warmup`` runs. The minimum is
    the figure least disturbed by other processes on a shared machine; the median is printed next
    to it so a noisy run shows."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def ort_session(model: torch.nn.Module, x: torch.Tensor, path: Path, threads: int):
    import onnxruntime as ort

    gp.export_onnx(model, x, path, dynamic_batch=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda xb: sess.run(None, {name: xb.numpy()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions at batch 1")
    ap.add_argument("--reps-b32", type=int, default=5, help="timed repetitions at batch 32")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime")
    ap.add_argument("--round-to", type=int, default=8,
                    help="kept channels per group rounded to a multiple of this (1: no rounding)")
    ap.add_argument("--output", type=Path, default=RESULTS / "speedup.md")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gp_speedup_"))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        # Realistic activation scales: random weights with default BatchNorm statistics blow
        # activations up by orders of magnitude per block, which is not what a trained model runs.
        calibrate_norms(model, torch.randn(8, 3, 224, 224))
        x1 = torch.randn(1, 3, 224, 224)
        groups, keep, frac = keep_for_target(model, x1, TARGET, args.round_to)
        pruned = gp.ModelSpeedup(model, x1, gp.group_masks(model, groups, keep)).speedup_model().eval()
        flops_ratio = n_flops(pruned, x1) / n_flops(model, x1)
        params_ratio = n_params(pruned) / n_params(model)
        sessions = {"dense": ort_session(model, x1, tmp / f"{name}_dense.onnx", args.threads),
                    "pruned": ort_session(pruned, x1, tmp / f"{name}_pruned.onnx", args.threads)}
        for batch, reps in ((1, args.reps), (32, args.reps_b32)):
            xb = torch.randn(batch, 3, 224, 224)
            res = {}
            with torch.inference_mode():
                for kind, m in (("dense", model), ("pruned", pruned)):
                    res[("eager", kind)] = latency(lambda: m(xb), reps)
            for kind, sess in sessions.items():
                res[("ort", kind)] = latency(lambda: sess(xb), reps)
            for rt in ("eager", "ort"):
                (d, d_med), (p, p_med) = res[(rt, "dense")], res[(rt, "pruned")]
                speed = d / p
                rows.append((name, batch, rt, reps, frac, flops_ratio, params_ratio, d, p, d_med, p_med, speed,
                             speed >= 0.8 / flops_ratio))
                print(f"{name:24s} b{batch:<3d} {rt:5s} keep={frac:.3f} flops={flops_ratio:.3f} dense={1e3 * d:8.1f}ms "
                      f"pruned={1e3 * p:8.1f}ms (medians {1e3 * d_med:.1f} / {1e3 * p_med:.1f}) "
                      f"speedup={speed:.2f}x (goal {0.8 / flops_ratio:.2f}x)", flush=True)
        write_atomic(args.output, render(rows, args))
    write_atomic(args.output, render(rows, args))
    met = sum(r[-1] for r in rows)
    print(f"speedup >= 0.8 x (1 / FLOPs ratio): {met}/{len(rows)}")
    return 0


def render(rows, args) -> str:
    met = sum(r[-1] for r in rows)
    lines = [
        "# Dense vs pruned latency (CPU)",
        "",
        f"Models pruned to about {TARGET:.0%} of their FLOPs: one uniform keep fraction for every prunable channel "
        "group (bisection on `graph_passes.cost(...).flops`), kept channels per group rounded to a multiple of "
        f"{args.round_to}, highest-L2-norm channels kept (`graph_passes.channel_norms`), random weights with "
        "BatchNorm statistics from one batch of 8 random images, 224 px. Latency: wall time of one batch, "
        f"{args.threads} intra-op threads, after two warm-up runs; {args.reps} repetitions at batch 1, "
        f"{args.reps_b32} at batch 32; **min** over the repetitions (least disturbed by other processes), "
        "medians alongside. ONNX: `graph_passes.export_onnx`, ONNX Runtime CPU execution provider, default graph "
        "optimisations. 'speedup' = dense / pruned min latency; goal: speedup >= 0.8 x (dense FLOPs / pruned FLOPs).",
        "",
        f"Command: `python benchmarks/speedup.py --reps {args.reps} --reps-b32 {args.reps_b32} --threads {args.threads} "
        f"--round-to {args.round_to}`",
        "",
        f"**Totals:** goal met in {met}/{len(rows)} rows.",
        "",
        "| model | batch | runtime | reps | keep fraction | FLOPs ratio | params ratio | dense ms | pruned ms "
        "| dense / pruned median ms | speedup | goal (0.8 / FLOPs ratio) | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, batch, rt, reps, frac, fr, pr, d, p, dm, pm, s, ok in rows:
        lines.append(f"| {name} | {batch} | {rt} | {reps} | {frac:.3f} | {fr:.3f} | {pr:.3f} | {1e3 * d:.1f} | {1e3 * p:.1f} "
                     f"| {1e3 * dm:.1f} / {1e3 * pm:.1f} | {s:.2f}x | {0.8 / fr:.2f}x | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
