"""Measured CPU latency of dense vs pruned models next to their FLOPs ratio.

Each model is pruned by channel plans (``_speedup_plans.py``): to half its FLOPs by 'uniform'
(one keep fraction for every prunable group) and 'memory' (groups whose channels carry many
activation elements per FLOP pruned harder); and, per batch and runtime, by 'latency' (groups
that cost much predicted latency per FLOP pruned harder, to a latency a fitted
``graph_passes.LatencyModel`` predicts: the uniform plan's, and half the dense), keeping each
group's highest-L2-norm channels. Dense and pruned are timed alternately, in blocks of runs
(eager PyTorch and ONNX Runtime, CPU, batch 1 and 32 at 224 px). Writes ``results/speedup.md``.

    python benchmarks/speedup.py [--models resnet50,...] [--plans uniform,memory,latency] [--reps N] [--threads T] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402

import graph_passes as gp  # noqa: E402
from _common import (RESULTS, alternate_timings, calibrate_norms, n_flops, n_params, prune_kept_norms,  # noqa: E402
                     write_atomic)
from _speedup_plans import fractions, keep_for_target, latency_weights, memory_weights, plan_keep  # noqa: E402,F401

from nni_harp._heap import keep_freed_memory  # noqa: E402

MODELS = ["resnet50", "mobilenetv3_large_100", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224"]
TARGET = 0.5


#: Timed runs in a row per model when dense and pruned alternate (``_common.alternate_timings``);
#: at most reps // 4, so that each model runs in at least 4 blocks.
BLOCK = 5


def paired_latency(dense, pruned, reps: int, warmup: int = 2) -> tuple[float, float, float, float, float]:
    """Time ``dense`` and ``pruned`` alternately, in blocks of up to :data:`BLOCK` runs in a row
    (dense first on even blocks, pruned first on odd ones), so that a slow phase of a shared
    machine hits both alike and each runs as it does on its own.

    Returns (dense min, pruned min, dense median, pruned median, median of the per-repetition
    dense / pruned ratios). The minima are the figures least disturbed by other processes; the
    median paired ratio shows how stable the speedup was."""
    times = alternate_timings(dense, pruned, reps, warmup, block=max(1, min(BLOCK, reps // 4)))
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


#: Plans pruned once per model (plan -> gamma; None: --gamma) and the plan fitted per row.
STATIC_PLANS = {"uniform": 0.0, "memory": None}
LATENCY_PLAN = "latency"
PLANS = (*STATIC_PLANS, LATENCY_PLAN)
#: Runtime column -> graph_passes latency backend.
BACKEND = {"eager": "eager", "ort": "onnxruntime"}
RUNTIMES = tuple(BACKEND)
#: A prediction is within tolerance when |measured / predicted - 1| <= this.
PREDICTION_TOLERANCE = 0.10


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


def _measure(model, pruned, sessions, batch: int, runtime: str, reps: int) -> dict:
    """One row's paired latency of dense and pruned (``sessions``: their ONNX Runtime runners)."""
    xb = torch.randn(batch, 3, 224, 224)
    if runtime == "eager":
        with torch.inference_mode():
            d, p, d_med, p_med, paired = paired_latency(lambda: model(xb), lambda: pruned(xb), reps)
    else:
        d, p, d_med, p_med, paired = paired_latency(lambda: sessions[0](xb), lambda: sessions[1](xb), reps)
    return {"batch": batch, "runtime": runtime, "reps": reps, "dense": d, "pruned": p, "dense_med": d_med,
            "pruned_med": p_med, "paired": paired, "speedup": d / p}


def _fit_all(model, args, cache_dir) -> dict[tuple[int, str], tuple[gp.LatencyModel, gp.CostModel, gp.Analysis]]:
    """A latency model per (batch, runtime), with the cost model and the analysis of that input shape."""
    fits = {}
    for batch in (1, 32):
        xb = torch.randn(batch, 3, 224, 224)
        analysis = gp.analysis_for(model, xb)
        cm = gp.cost(analysis)
        for rt in RUNTIMES:
            lat = gp.fit_latency(analysis, xb, backend=BACKEND[rt], threads=args.threads, round_to=args.round_to,
                                 samples=args.fit_samples, reps=_fit_reps(args, batch), rounds=_fit_rounds(args, batch),
                                 cache_dir=cache_dir,
                                 norms="kept")
            print(f"  latency model b{batch} {rt}: dense {lat.dense_ms:.2f} ms, fit error "
                  f"{100 * lat.fit_error(cm):.1f} %", flush=True)
            fits[(batch, rt)] = (lat, cm, analysis)
    return fits


def _fit_reps(args, batch: int) -> int:
    return args.fit_reps if batch == 1 else args.fit_reps_b32


def _fit_rounds(args, batch: int) -> int:
    """Passes over the configurations of a fit or refinement: ``--fit-rounds``, at most one per run."""
    return max(1, min(args.fit_rounds, _fit_reps(args, batch)))


def latency_plan(fit: tuple[gp.LatencyModel, gp.CostModel, gp.Analysis], prunable, norms, target_of, args,
                 also_measure: dict[int, int] | None = None):
    """The 'latency' plan of one row. Its shape comes from the fitted model: groups reweighted by
    their predicted ms per FLOP (``latency_weights``, once). Its scale is bisected to
    ``target_of(model)`` (a predicted latency fraction), then ``args.refine`` times: the plan is
    measured (``graph_passes.refine_latency``; the first time with ``also_measure``, the counts a
    target refers to), the model fitted again, the scale bisected anew. The plans all lie on one
    path, so the last one sits between measured ones. Returns (keep vectors, frac, the last latency
    model, target)."""
    lat, cm, analysis = fit
    xb = torch.randn(lat.batch, 3, 224, 224)
    weight = latency_weights(lat, cm, prunable, args.gamma)
    for step in range(args.refine + 1):
        target = target_of(lat)
        keep, frac = plan_keep(prunable, norms, weight, lambda f, lat=lat: float(lat.fraction(cm, f)), target,
                               args.round_to)
        if step < args.refine:
            configs = [{gid: int(v.sum()) for gid, v in keep.items()}]
            if step == 0 and also_measure is not None:
                configs.insert(0, also_measure)
            lat = gp.refine_latency(analysis, xb, lat, configs, reps=_fit_reps(args, lat.batch),
                                    rounds=_fit_rounds(args, lat.batch))
    return keep, frac, lat, target


def _reps(args, batch: int) -> int:
    return args.reps if batch == 1 else args.reps_b32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--plans", default=",".join(PLANS),
                    help="comma-separated: 'uniform' (one keep fraction everywhere), 'memory' (groups that carry "
                         "many activation elements per FLOP pruned harder), 'latency' (groups that cost much "
                         "predicted latency per FLOP pruned harder, at the uniform plan's latency and at half the "
                         "dense latency, per batch and runtime)")
    ap.add_argument("--gamma", type=float, default=0.5, help="strength of the 'memory' and 'latency' reweighting")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions at batch 1")
    ap.add_argument("--reps-b32", type=int, default=6, help="timed repetitions at batch 32")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime")
    ap.add_argument("--round-to", type=int, default=8,
                    help="kept channels per group rounded to a multiple of this (1: no rounding)")
    ap.add_argument("--fit-samples", type=int, default=16, help="configurations a latency model is fitted on")
    ap.add_argument("--fit-reps", type=int, default=20, help="timed runs per configuration of a batch-1 fit")
    ap.add_argument("--fit-reps-b32", type=int, default=3, help="timed runs per configuration of a batch-32 fit")
    ap.add_argument("--fit-rounds", type=int, default=5,
                    help="passes over the configurations of a fit (each configuration's lowest per-pass median "
                         "counts: a slow phase of the machine, seconds long on a shared VM, spoils one pass, not the "
                         "dense model every prediction is a fraction of)")
    ap.add_argument("--refine", type=int, default=2,
                    help="times a latency plan is measured and the latency model fitted again with it (0: never)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where latency models are cached (default: none)")
    ap.add_argument("--output", type=Path, default=RESULTS / "speedup.md")
    args = ap.parse_args(argv)
    plans = args.plans.split(",")
    if unknown := [p for p in plans if p not in PLANS]:
        ap.error(f"unknown plan(s) {unknown}: choose from {', '.join(PLANS)}")
    warnings.simplefilter("ignore")
    args.kept_heap = keep_freed_memory()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gp_speedup_") as tmp_dir:  # ONNX files, removed at the end
        tmp = Path(tmp_dir)
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            # Realistic activation scales: random weights with default BatchNorm statistics blow
            # activations up by orders of magnitude per block, which is not what a trained model runs.
            calibrate_norms(model, torch.randn(8, 3, 224, 224))
            x1 = torch.randn(1, 3, 224, 224)
            dense_session = ort_session(model, x1, tmp / f"{name}_dense.onnx", args.threads)
            fits = _fit_all(model, args, args.cache_dir) if LATENCY_PLAN in plans else {}

            def predicted(keep, batch: int, rt: str, lat: gp.LatencyModel | None = None) -> dict:
                if (batch, rt) not in fits:
                    return {}
                fitted, cm, _ = fits[(batch, rt)]
                lat = lat or fitted
                return {"predicted": float(lat.fraction(cm, fractions(keep))), "fit_error": lat.fit_error(cm)}

            uniform_keep = None
            for plan in [p for p in plans if p in STATIC_PLANS]:
                gamma = args.gamma if STATIC_PLANS[plan] is None else STATIC_PLANS[plan]
                groups, keep, frac, act_ratio = keep_for_target(model, x1, TARGET, args.round_to, gamma)
                uniform_keep = keep if plan == "uniform" else uniform_keep
                pruned = prune_kept_norms(model, x1, groups, keep)
                base = {"model": name, "plan": plan, "frac": frac, "acts": act_ratio,
                        "flops": n_flops(pruned, x1) / n_flops(model, x1), "params": n_params(pruned) / n_params(model)}
                sessions = (dense_session, ort_session(pruned, x1, tmp / f"{name}_{plan}.onnx", args.threads))
                floor = dispatch_floor(model, pruned, args.reps)
                for batch in (1, 32):
                    for rt in RUNTIMES:
                        row = {**base, **_measure(model, pruned, sessions, batch, rt, _reps(args, batch)),
                               **predicted(keep, batch, rt)}
                        if rt == "eager" and batch == 1 and floor is not None:
                            # If everything above the floor shrank with the FLOPs, this is the speedup.
                            row["bound"] = row["dense"] / (floor[1] + (row["dense"] - floor[0]) * row["flops"])
                            row["floor"] = floor
                        rows.append(_finish(row))
                write_atomic(args.output, render(rows, args))
            if LATENCY_PLAN in plans:
                groups = gp.channel_groups(model, x1)
                prunable = [g for g in groups if g.prunable]
                norms = {g.id: gp.channel_norms(model, g) for g in prunable}
                if uniform_keep is None:
                    _, uniform_keep, _, _ = keep_for_target(model, x1, TARGET, args.round_to, 0.0)
                for batch in (1, 32):
                    for rt in RUNTIMES:
                        cm = fits[(batch, rt)][1]
                        targets = (("uniform's", lambda lat: float(lat.fraction(cm, fractions(uniform_keep)))),
                                   (f"{TARGET:g}", lambda lat: TARGET))
                        uniform_counts = {gid: int(v.sum()) for gid, v in uniform_keep.items()}
                        for label, target_of in targets:
                            keep, frac, lat, target = latency_plan(fits[(batch, rt)], prunable, norms, target_of, args,
                                                                   uniform_counts if label == "uniform's" else None)
                            pruned = prune_kept_norms(model, x1, groups, keep)
                            sessions = (dense_session, ort_session(pruned, x1, tmp / f"{name}_lat.onnx", args.threads)
                                        if rt == "ort" else None)
                            row = {"model": name, "plan": f"{LATENCY_PLAN} at {label}", "frac": frac, "target": target,
                                   "acts": float(cm.activations(fractions(keep))) / float(cm.total_activations),
                                   "flops": n_flops(pruned, x1) / n_flops(model, x1),
                                   "params": n_params(pruned) / n_params(model),
                                   **_measure(model, pruned, sessions, batch, rt, _reps(args, batch)),
                                   **predicted(keep, batch, rt, lat)}
                            rows.append(_finish(row))
                            write_atomic(args.output, render(rows, args))
    for plan in dict.fromkeys(r["plan"] for r in rows):
        print(_total(plan, [r for r in rows if r["plan"] == plan]))
    return 0


def _finish(row: dict) -> dict:
    """Derived columns of a measured row; prints it."""
    row["met"] = row["speedup"] >= 0.8 / row["flops"]
    row["measured"] = row["pruned"] / row["dense"]
    if "predicted" in row:
        row["error"] = row["measured"] / row["predicted"] - 1
    print(f"{row['model']:22s} {row['plan']:18s} b{row['batch']:<3d} {row['runtime']:5s} flops={row['flops']:.3f} "
          f"dense={1e3 * row['dense']:8.1f}ms pruned={1e3 * row['pruned']:8.1f}ms (paired median {row['paired']:.2f}x) "
          f"speedup={row['speedup']:.2f}x (goal {0.8 / row['flops']:.2f}x)"
          + (f" predicted x{row['predicted']:.3f} measured x{row['measured']:.3f}" if "predicted" in row else ""),
          flush=True)
    return row


def _total(plan: str, rows: list[dict]) -> str:
    text = f"plan **{plan}**: speedup >= 0.8 x (1 / FLOPs ratio) in {sum(r['met'] for r in rows)}/{len(rows)} rows"
    predicted = [r for r in rows if "error" in r]
    if predicted:
        text += (f", measured latency within {PREDICTION_TOLERANCE:.0%} of the predicted in "
                 f"{sum(abs(r['error']) <= PREDICTION_TOLERANCE for r in predicted)}/{len(predicted)}")
    targeted = [r for r in rows if "target" in r]
    if targeted:
        text += (f", measured <= target in {sum(r['measured'] <= r['target'] for r in targeted)}/{len(targeted)} "
                 f"(<= target x {1 + PREDICTION_TOLERANCE:g} in "
                 f"{sum(r['measured'] <= r['target'] * (1 + PREDICTION_TOLERANCE) for r in targeted)}/{len(targeted)})")
    return text


def render(rows: list[dict], args) -> str:
    plans = list(dict.fromkeys(r["plan"] for r in rows))
    totals = "; ".join(_total(p, [r for r in rows if r["plan"] == p]) for p in plans)
    lines = [
        "# Dense vs pruned latency (CPU)",
        "",
        f"Models pruned by channel plans (`benchmarks/_speedup_plans.py`), kept channels per group rounded to a "
        f"multiple of {args.round_to}, highest-L2-norm channels kept (`graph_passes.channel_norms`), random weights "
        "with BatchNorm statistics from one batch of 8 random images, 224 px. **uniform** keeps the same fraction "
        f"of every prunable group, at {TARGET:.0%} of the dense FLOPs (bisection on `graph_passes.cost(...).flops`); "
        f"**memory** (`--gamma {args.gamma}`) reaches the same FLOPs with each group's fraction multiplied by "
        "(rho_g / rho_ref)^-gamma, where rho_g is the number of activation elements per FLOP one channel of the "
        "group carries (`CostModel.activations` / `CostModel.flops`), so channels that are mostly memory traffic "
        "(depthwise convs, norms, activations, SE gates) go first. **latency** uses the same reweighting with rho_g "
        "= the *predicted latency* per FLOP of one channel, from a latency model (`graph_passes.fit_latency`: "
        f"{args.fit_samples} channel configurations timed on the row's runtime, batch and threads, {args.fit_reps} "
        f"runs each at batch 1, {args.fit_reps_b32} at batch 32, in {args.fit_rounds} passes, each configuration's "
        "lowest per-pass median kept), and bisects to a *predicted latency* target: "
        "the uniform plan's predicted latency in that row ('at uniform's'), and half the dense latency "
        f"('at {TARGET:g}'); then, {args.refine} time(s), the plan is measured (the first time with the uniform "
        "plan, for the row at uniform's), the latency model fitted again with it (`graph_passes.refine_latency`: a "
        "measured plan, like the dense model, weighs 100x as much as all the samples) and the plan's scale bisected anew (its shape, the "
        "per-group weights, stays the first model's); the row's prediction is that last model's, for the last "
        "plan, which it has not measured. Pruned models are built as a fine-tuned structured run of the pipeline "
        "builds them (`--norm-stats kept`: layer norms over the kept channels, plain norms after the speedup), and "
        "the latency models time such models (`fit_latency(norms='kept')`). "
        "'acts kept' is the fraction of activation elements the pruned model still produces.",
        "",
        f"Latency: wall time of one batch, {args.threads} intra-op threads, dense and pruned timed alternately "
        f"after two warm-up runs each, in blocks of runs in a row (up to {BLOCK}, each after one untimed run: run by "
        "run, two ONNX Runtime sessions' thread pools spin against each other and a small model's weights leave "
        f"the caches); {args.reps} repetitions at batch 1, {args.reps_b32} at batch 32; **min** "
        "over the repetitions (least disturbed by other processes), medians and the median of the per-repetition "
        "dense/pruned ratios alongside. glibc malloc keeps freed memory "
        f"({'applied' if args.kept_heap else 'NOT applied on this machine'}; see `nni_harp._heap`), so activations "
        "are not page-faulted in again on every pass. ONNX: `graph_passes.export_onnx`, ONNX Runtime CPU "
        "execution provider, default graph optimisations. 'speedup' = dense / pruned min latency; goal: "
        "speedup >= 0.8 x (dense FLOPs / pruned FLOPs). 'measured' = pruned / dense min latency; 'predicted' = "
        "the row's latency model's prediction for the plan over its prediction for the dense model; 'error' = "
        f"measured / predicted - 1 (goal: within {PREDICTION_TOLERANCE:.0%}); 'fit error' = the latency model's "
        "largest relative error on its own measurements.",
        "",
        f"Eager batch-1 rows also give the **floor**: the same models at {FLOOR_PX} px (about 2% of the "
        "arithmetic), i.e. eager PyTorch's per-op dispatch, which removing channels does not shorten. "
        "'attainable above the floor' = dense / (pruned floor + (dense - dense floor) x FLOPs ratio): the "
        "speedup if all time above the floor fell with the FLOPs. Where it is below the goal, no channel "
        "plan can meet the goal in that row on this machine.",
        "",
        f"Command: `python benchmarks/speedup.py --models {args.models} --plans {','.join(args.plans.split(','))} "
        f"--gamma {args.gamma} --reps {args.reps} --reps-b32 {args.reps_b32} --threads {args.threads} "
        f"--round-to {args.round_to}"
        + (f" --fit-samples {args.fit_samples} --fit-reps {args.fit_reps} --fit-reps-b32 {args.fit_reps_b32}"
           f" --fit-rounds {args.fit_rounds}"
           f" --refine {args.refine}" if LATENCY_PLAN in args.plans.split(",") else "") + "`",
        "",
        f"**Totals:** {totals}.",
        "",
        "| model | plan | batch | runtime | reps | FLOPs ratio | params ratio | acts kept | dense ms | pruned ms "
        "| dense / pruned median ms | median paired ratio | speedup | goal (0.8 / FLOPs ratio) | met "
        "| target | predicted | measured | error | fit error "
        f"| eager floor at {FLOOR_PX} px, dense / pruned ms | attainable above the floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['plan']} | {r['batch']} | {r['runtime']} | {r['reps']} | {r['flops']:.3f} "
            f"| {r['params']:.3f} | {r['acts']:.3f} | {1e3 * r['dense']:.1f} | {1e3 * r['pruned']:.1f} "
            f"| {1e3 * r['dense_med']:.1f} / {1e3 * r['pruned_med']:.1f} | {r['paired']:.2f}x | {r['speedup']:.2f}x "
            f"| {0.8 / r['flops']:.2f}x | {'yes' if r['met'] else 'no'} "
            + (f"| {r['target']:.3f} " if "target" in r else "| ")
            + (f"| {r['predicted']:.3f} | {r['measured']:.3f} | {100 * r['error']:+.1f} % | {100 * r['fit_error']:.1f} % "
               if "predicted" in r else f"| | {r['measured']:.3f} | | ")
            + (f"| {1e3 * r['floor'][0]:.1f} / {1e3 * r['floor'][1]:.1f} | {r['bound']:.2f}x |" if "bound" in r else "| | |"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
