"""Measured CPU latency of dense vs pruned models next to their FLOPs ratio.

Each model is pruned to half its FLOPs by two plans ('uniform': one keep fraction for every
prunable group; 'memory': groups whose channels carry many activation elements per FLOP pruned
harder), keeping each group's highest-L2-norm channels. Dense and pruned are timed alternately
(eager PyTorch and ONNX Runtime, CPU, batch 1 and 32 at 224 px). Writes ``results/speedup.md``.

    python benchmarks/speedup.py [--models resnet50,...] [--plans uniform,memory] [--reps N] [--threads T]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402

import graph_passes as gp  # noqa: E402
from _common import RESULTS, alternate_timings, calibrate_norms, n_flops, n_params, write_atomic  # noqa: E402

MODELS = ["resnet50", "mobilenetv3_large_100", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224"]
TARGET = 0.5


def _rounded(n: float, size: int, round_to: int) -> int:
    """Kept channels of a group: ``n`` rounded to a multiple of ``round_to`` (never 0, never more
    than the group). Channel counts that are multiples of 8 keep the vectorised CPU kernels
    (oneDNN / ONNX Runtime's NCHWc layouts) on their fast paths."""
    if round_to > 1 and size > round_to:
        return int(min(size, max(round_to, round_to * round(n / round_to))))
    return int(min(size, max(1, round(n))))


def memory_weights(cm: gp.CostModel, groups: list[gp.ChannelGroup], gamma: float) -> dict[int, float]:
    """Per-group multipliers of the keep fraction for the 'memory' plan.

    ``rho_g`` = activation elements per FLOP that one channel of group ``g`` carries (from
    ``CostModel.activations`` and ``CostModel.flops`` with ``g`` removed). Channels with a high
    ``rho`` (inverted-residual hidden channels: a depthwise conv, norms, activations and SE gating
    per channel, few FLOPs) are mostly memory traffic; channels with a low ``rho`` feed wide dense
    convs. The multiplier is ``(rho_g / rho_ref) ** -gamma`` with ``rho_ref`` the FLOPs-weighted
    geometric mean, so high-``rho`` groups are pruned harder; gamma = 0 is the uniform plan."""
    f0, a0 = float(cm.total_flops), float(cm.total_activations)
    group_flops, rho = {}, {}
    for g in groups:
        group_flops[g.id] = f0 - float(cm.flops({g.id: 0.0}))
        acts = a0 - float(cm.activations({g.id: 0.0}))
        rho[g.id] = acts / group_flops[g.id] if group_flops[g.id] > 0 else math.inf
    finite = [gid for gid, r in rho.items() if 0 < r < math.inf]
    if not finite or gamma == 0:
        return {g.id: 1.0 for g in groups}
    lo, hi = min(rho[gid] for gid in finite), max(rho[gid] for gid in finite)
    log_ref = sum(group_flops[gid] * math.log(rho[gid]) for gid in finite) / sum(group_flops[gid] for gid in finite)
    # Groups without FLOPs (or without activations) get the extreme finite value.
    return {gid: math.exp(-gamma * (math.log(min(max(r, lo), hi)) - log_ref)) for gid, r in rho.items()}


def keep_for_target(model: torch.nn.Module, x: torch.Tensor, target: float, round_to: int = 1, gamma: float = 0.0):
    """Keep vectors for every prunable group at about ``target`` of the dense FLOPs: group ``g``
    keeps ``min(1, frac * w_g)`` of its channels (rounded to ``round_to``), its highest-L2-norm
    ones; ``frac`` is found by bisection. ``w_g`` = 1 (gamma = 0): the uniform plan; otherwise
    :func:`memory_weights`. Returns (groups, keep, frac, kept activation fraction)."""
    groups = gp.channel_groups(model, x)
    cm = gp.cost(model, x, groups)
    prunable = [g for g in groups if g.prunable]
    weight = memory_weights(cm, prunable, gamma)
    norms = {g.id: gp.channel_norms(model, g) for g in prunable}

    def keep_of(frac: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in prunable:
            k = _rounded(min(1.0, frac * weight[g.id]) * g.size, g.size, round_to)
            v = torch.zeros(g.size, dtype=torch.bool)
            v[torch.topk(norms[g.id], k).indices] = True
            out[g.id] = v
        return out

    def fractions(keep: dict[int, torch.Tensor]) -> dict[int, float]:
        return {gid: float(v.sum()) / v.numel() for gid, v in keep.items()}

    def flops_at(frac: float) -> float:
        return float(cm.flops(fractions(keep_of(frac)))) / cm.total_flops

    lo, hi = 0.0, 1.0 / min(1.0, min(weight.values(), default=1.0))
    for _ in range(30):
        mid = (lo + hi) / 2
        if flops_at(mid) > target:
            hi = mid
        else:
            lo = mid
    frac = hi if abs(flops_at(hi) - target) < abs(flops_at(lo) - target) else lo
    keep = keep_of(frac)
    return groups, keep, frac, float(cm.activations(fractions(keep))) / cm.total_activations


def keep_heap() -> bool:
    """Ask glibc's malloc to keep freed memory instead of handing it back to the kernel.

    By default, buffers above a few hundred KiB are ``mmap``-ed and ``munmap``-ed on every
    allocation, so each forward pass page-faults its activations in again: on the 2-core reference
    machine that kernel time was most of a batch-32 forward pass (efficientnet_b0: 6.7 M minor
    faults and 17 s of system time in 14 passes). Raising the mmap and trim thresholds makes freed
    buffers reusable, which is what jemalloc / tcmalloc (PyTorch's CPU tuning guide) achieve.
    Dense and pruned models run in the same process, so both get it. Returns whether it applied."""
    if platform.system() != "Linux" or not ctypes.util.find_library("c"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def paired_latency(dense, pruned, reps: int, warmup: int = 2) -> tuple[float, float, float, float, float]:
    """Time ``dense`` and ``pruned`` alternately (dense first on even repetitions, pruned first on
    odd ones) so that a slow phase of a shared machine hits both alike.

    Returns (dense min, pruned min, dense median, pruned median, median of the per-repetition
    dense / pruned ratios). The minima are the figures least disturbed by other processes; the
    median paired ratio shows how stable the speedup was."""
    times = alternate_timings(dense, pruned, reps, warmup)
    td, tp = times["a"], times["b"]
    ratios = [d / p for d, p in zip(td, tp)]
    return min(td), min(tp), statistics.median(td), statistics.median(tp), statistics.median(ratios)


def ort_session(model: torch.nn.Module, x: torch.Tensor, path: Path, threads: int):
    import onnxruntime as ort

    gp.export_onnx(model, x, path, dynamic_batch=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda xb: sess.run(None, {name: xb.numpy()})


PLANS = {"uniform": 0.0, "memory": None}  # plan -> gamma (None: --gamma)


FLOOR_PX = 32


def dispatch_floor(model: torch.nn.Module, pruned: torch.nn.Module, reps: int) -> tuple[float, float] | None:
    """Eager batch-1 latency of dense and pruned at FLOOR_PX px: per-op dispatch with next to no
    arithmetic (1/49 of the 224 px work). At batch 1 this time does not shrink with the channels,
    so it bounds the eager batch-1 speedup. None for models that only accept their own size."""
    x = torch.randn(1, 3, FLOOR_PX, FLOOR_PX)
    try:
        with torch.inference_mode():
            d, p, *_ = paired_latency(lambda: model(x), lambda: pruned(x), reps)
    except Exception:  # noqa: BLE001 - fixed-size models (ViT position embeddings) cannot run at 32 px
        return None
    return d, p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--plans", default="uniform,memory",
                    help="comma-separated: 'uniform' (one keep fraction everywhere) and/or 'memory' "
                         "(groups that carry many activation elements per FLOP pruned harder)")
    ap.add_argument("--gamma", type=float, default=0.5, help="strength of the 'memory' plan's reweighting")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions at batch 1")
    ap.add_argument("--reps-b32", type=int, default=6, help="timed repetitions at batch 32")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime")
    ap.add_argument("--round-to", type=int, default=8,
                    help="kept channels per group rounded to a multiple of this (1: no rounding)")
    ap.add_argument("--output", type=Path, default=RESULTS / "speedup.md")
    args = ap.parse_args(argv)
    plans = args.plans.split(",")
    if unknown := [p for p in plans if p not in PLANS]:
        ap.error(f"unknown plan(s) {unknown}: choose from {sorted(PLANS)}")
    warnings.simplefilter("ignore")
    args.kept_heap = keep_heap()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="gp_speedup_"))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        # Realistic activation scales: random weights with default BatchNorm statistics blow
        # activations up by orders of magnitude per block, which is not what a trained model runs.
        calibrate_norms(model, torch.randn(8, 3, 224, 224))
        x1 = torch.randn(1, 3, 224, 224)
        dense_session = ort_session(model, x1, tmp / f"{name}_dense.onnx", args.threads)
        for plan in plans:
            gamma = args.gamma if PLANS[plan] is None else PLANS[plan]
            groups, keep, frac, act_ratio = keep_for_target(model, x1, TARGET, args.round_to, gamma)
            pruned = gp.ModelSpeedup(model, x1, gp.group_masks(model, groups, keep)).speedup_model(inplace=False).eval()
            base = {"model": name, "plan": plan, "frac": frac, "acts": act_ratio,
                    "flops": n_flops(pruned, x1) / n_flops(model, x1), "params": n_params(pruned) / n_params(model)}
            pruned_session = ort_session(pruned, x1, tmp / f"{name}_{plan}.onnx", args.threads)
            floor = dispatch_floor(model, pruned, args.reps)
            for batch, reps in ((1, args.reps), (32, args.reps_b32)):
                xb = torch.randn(batch, 3, 224, 224)
                with torch.inference_mode():
                    eager = paired_latency(lambda: model(xb), lambda: pruned(xb), reps)
                ort = paired_latency(lambda: dense_session(xb), lambda: pruned_session(xb), reps)
                for rt, (d, p, d_med, p_med, ratio_med) in (("eager", eager), ("ort", ort)):
                    row = {**base, "batch": batch, "runtime": rt, "reps": reps, "dense": d, "pruned": p,
                           "dense_med": d_med, "pruned_med": p_med, "paired": ratio_med, "speedup": d / p}
                    row["met"] = row["speedup"] >= 0.8 / row["flops"]
                    if rt == "eager" and batch == 1 and floor is not None:
                        # If everything above the floor shrank with the FLOPs, this is the speedup.
                        row["bound"] = d / (floor[1] + (d - floor[0]) * row["flops"])
                        row["floor"] = floor
                    rows.append(row)
                    print(f"{name:22s} {plan:7s} b{batch:<3d} {rt:5s} flops={row['flops']:.3f} acts={act_ratio:.3f} "
                          f"dense={1e3 * d:8.1f}ms pruned={1e3 * p:8.1f}ms (paired median {ratio_med:.2f}x) "
                          f"speedup={row['speedup']:.2f}x (goal {0.8 / row['flops']:.2f}x)", flush=True)
            write_atomic(args.output, render(rows, args))
    for plan in plans:
        sel = [r for r in rows if r["plan"] == plan]
        print(f"plan {plan}: speedup >= 0.8 x (1 / FLOPs ratio) in {sum(r['met'] for r in sel)}/{len(sel)} rows")
    return 0


def render(rows: list[dict], args) -> str:
    plans = list(dict.fromkeys(r["plan"] for r in rows))
    totals = "; ".join(f"plan **{p}**: goal met in {sum(r['met'] for r in rows if r['plan'] == p)}/"
                       f"{sum(r['plan'] == p for r in rows)} rows" for p in plans)
    lines = [
        "# Dense vs pruned latency (CPU)",
        "",
        f"Models pruned to about {TARGET:.0%} of their FLOPs (bisection on `graph_passes.cost(...).flops`), kept "
        f"channels per group rounded to a multiple of {args.round_to}, highest-L2-norm channels kept "
        "(`graph_passes.channel_norms`), random weights with BatchNorm statistics from one batch of 8 random "
        "images, 224 px. Two plans reach the same FLOPs: **uniform** keeps the same fraction of every prunable "
        "group; **memory** (`--gamma "
        f"{args.gamma}`) multiplies each group's fraction by (rho_g / rho_ref)^-gamma, where rho_g is the number "
        "of activation elements per FLOP one channel of the group carries (`CostModel.activations` / "
        "`CostModel.flops`), so channels that are mostly memory traffic (depthwise convs, norms, activations, SE "
        "gates) go first. 'acts kept' is the fraction of activation elements the pruned model still produces.",
        "",
        f"Latency: wall time of one batch, {args.threads} intra-op threads, dense and pruned timed alternately "
        f"after two warm-up runs each; {args.reps} repetitions at batch 1, {args.reps_b32} at batch 32; **min** "
        "over the repetitions (least disturbed by other processes), medians and the median of the per-repetition "
        "dense/pruned ratios alongside. glibc malloc keeps freed memory "
        f"({'applied' if args.kept_heap else 'NOT applied on this machine'}; see `keep_heap`), so activations "
        "are not page-faulted in again on every pass. ONNX: `graph_passes.export_onnx`, ONNX Runtime CPU "
        "execution provider, default graph optimisations. 'speedup' = dense / pruned min latency; goal: "
        "speedup >= 0.8 x (dense FLOPs / pruned FLOPs).",
        "",
        f"Eager batch-1 rows also give the **floor**: the same models at {FLOOR_PX} px (about 2% of the "
        "arithmetic), i.e. eager PyTorch's per-op dispatch, which removing channels does not shorten. "
        "'attainable above the floor' = dense / (pruned floor + (dense - dense floor) x FLOPs ratio): the "
        "speedup if all time above the floor fell with the FLOPs. Where it is below the goal, no channel "
        "plan can meet the goal in that row on this machine.",
        "",
        f"Command: `python benchmarks/speedup.py --plans {','.join(plans)} --gamma {args.gamma} --reps {args.reps} "
        f"--reps-b32 {args.reps_b32} --threads {args.threads} --round-to {args.round_to}`",
        "",
        f"**Totals:** {totals}.",
        "",
        "| model | plan | batch | runtime | reps | FLOPs ratio | params ratio | acts kept | dense ms | pruned ms "
        "| dense / pruned median ms | median paired ratio | speedup | goal (0.8 / FLOPs ratio) | met "
        f"| eager floor at {FLOOR_PX} px, dense / pruned ms | attainable above the floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['plan']} | {r['batch']} | {r['runtime']} | {r['reps']} | {r['flops']:.3f} "
            f"| {r['params']:.3f} | {r['acts']:.3f} | {1e3 * r['dense']:.1f} | {1e3 * r['pruned']:.1f} "
            f"| {1e3 * r['dense_med']:.1f} / {1e3 * r['pruned_med']:.1f} | {r['paired']:.2f}x | {r['speedup']:.2f}x "
            f"| {0.8 / r['flops']:.2f}x | {'yes' if r['met'] else 'no'} "
            + (f"| {1e3 * r['floor'][0]:.1f} / {1e3 * r['floor'][1]:.1f} | {r['bound']:.2f}x |" if "bound" in r else "| | |"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
