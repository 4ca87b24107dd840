"""Cost of one pruning step against one plain PGD-AT training step of the same model and batch,
and of the channel analysis against Torch-Pruning's ``DependencyGraph``.

Steps: the pipeline's models (``nni_harp.loading.create_model``: timm, random weights, 10
classes, 32 px, input normalisation inside), the pipeline's default adversarial loss (PGD-AT,
``attack_steps`` and ``eps`` of ``PipelineConfig``) and optimizers, one random batch. The plain
side trains every weight with the pipeline's SGD (pretraining and fine-tuning); the pruner side
is built by the registry as the prune stage builds it (``spec.build`` with the stage's config list
and options) and driven through NNI's ``TorchEvaluator`` (patched loss and optimizer step, the
pruner's own optimizers and mask refresh). Both steps run inside the evaluator's training function,
alternately (``_common.alternate_timings``), so a slow phase of a shared machine hits both alike.

Analysis: ``graph_passes.channel_groups`` + ``graph_passes.cost`` on one trace (``analysis_for``,
as structured HARP calls them: ``nni_harp.pruning._plan.channel_structure``) against Torch-Pruning's
``DependencyGraph().build_dependency`` + ``get_all_groups`` (and ``count_ops_and_params``, its
FLOPs count), same model and input, alternately. Writes ``results/step_cost.md`` and ``.json``.

    python benchmarks/step_cost.py [--models test_resnet,resnet18,vit_small_patch16_224] [--rows harp:unstructured,...]
        [--batch 32] [--reps 10] [--threads 2] [--dg-models resnet50,vit_small_patch16_224,convnext_tiny] [--dg-reps 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402

from _common import RESULTS, alternate_timings, write_atomic  # noqa: E402

from nni_harp._heap import keep_freed_memory  # noqa: E402
from nni_harp.loading import create_model  # noqa: E402
from nni_harp.pipeline.config import PipelineConfig  # noqa: E402
from nni_harp.pipeline.stages._pruning import pruner_config_list  # noqa: E402
from nni_harp.pipeline.training import make_training_step, sgd  # noqa: E402
from nni_harp.pruning._plan import channel_structure  # noqa: E402
from nni_harp.registry import PruneRequest, get_pruner  # noqa: E402

MODELS = ["test_resnet", "resnet18", "vit_small_patch16_224"]
ROWS = ["harp:unstructured", "harp:structured", "hydra:unstructured", "hydra:structured"]
DG_MODELS = ["resnet50", "vit_small_patch16_224", "convnext_tiny"]
GOAL, MEAN, STD = 1.10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def step_row(name: str, pruner: str, mode: str, batch: int, reps: int) -> dict[str, Any]:
    """Time a plain PGD-AT step and a ``pruner`` step (``mode``) of ``name`` alternately."""
    from nni.compression import TorchEvaluator

    cfg = PipelineConfig(model=name, mode=mode, pruner=pruner, batch_size=batch)
    spec = get_pruner(pruner)
    torch.manual_seed(0)
    plain = create_model(name, 10, 3, cfg.image_size, MEAN, STD)[0]
    model = copy.deepcopy(plain)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size)
    y = torch.randint(0, 10, (batch,))
    step = make_training_step(SimpleNamespace(config=cfg))
    plain_opt = sgd(plain.parameters(), cfg.pretrain_lr, cfg.weight_decay)
    plain.train()

    def plain_step() -> None:  # the epoch loop's body (pipeline/_loop.py)
        plain_opt.zero_grad(set_to_none=True)
        step((x, y), plain).backward()
        plain_opt.step()

    out: dict[str, Any] = {}

    def training(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None, *a, **k):
        opts = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
        model.train()

        def pruner_step() -> None:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            training_step((x, y), model).backward()
            for opt in opts:
                opt.step()

        out.update(alternate_timings(plain_step, pruner_step, reps))

    optimizer = sgd(model.parameters(), cfg.prune_lr, 0.0, traced=True)
    evaluator = TorchEvaluator(training, optimizer, step, dummy_input=x[:1])
    options: dict[str, Any] = {"score_lr": cfg.prune_lr}
    if spec.learns_rates:
        options.update(gamma_0=cfg.gamma_0, init_allocation=cfg.init_allocation, init_keep=cfg.init_keep)
    kept = cfg.target_keep if mode == "structured" else cfg.flops_target
    cl = pruner_config_list(spec.name, mode, cfg.sparsity, kept, kept)
    built = spec.build(PruneRequest(model, cl, evaluator, x[:1], steps_per_epoch=1, epochs=1, options=options))
    spec.compress(built, 1, 1)
    med = statistics.median
    return {"model": name, "pruner": pruner, "mode": mode, "batch": batch, "reps": reps, "attack_steps": cfg.attack_steps,
            "plain": min(out["a"]), "pruned": min(out["b"]), "plain_med": med(out["a"]), "pruned_med": med(out["b"]),
            "paired": med(b / a for a, b in zip(out["a"], out["b"])), "ratio": min(out["b"]) / min(out["a"]),
            "cpu_ratio": min(out["b_cpu"]) / min(out["a_cpu"]), "times": out}


def dg_row(name: str, reps: int) -> dict[str, Any]:
    """``channel_groups`` + ``cost`` against Torch-Pruning's dependency graph (and its FLOPs count)."""
    import torch_pruning as tp

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    ours = lambda: channel_structure(model, x)  # noqa: E731 - groups + cost on one trace, as structured HARP calls them
    groups = lambda: list(tp.DependencyGraph().build_dependency(model, example_inputs=x).get_all_groups())  # noqa: E731
    t = alternate_timings(ours, groups, reps, warmup=1)
    t_ours, t_dg, m_ours, m_dg = min(t["a"]), min(t["b"]), statistics.median(t["a"]), statistics.median(t["b"])
    t_ops = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tp.utils.count_ops_and_params(model, x)
        t_ops.append(time.perf_counter() - t0)
    return {"model": name, "reps": reps, "ours": t_ours, "dg": t_dg, "ours_med": m_ours, "dg_med": m_dg,
            "tp_ops": min(t_ops), "ratio": t_ours / (t_dg + min(t_ops)), "ratio_dg": t_ours / t_dg}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="empty: skip the step rows")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated pruner:mode pairs; empty: no step rows")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10, help="timed steps per side (after two warm-up steps each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dg-models", default=",".join(DG_MODELS), help="empty: skip the analysis rows")
    ap.add_argument("--dg-reps", type=int, default=5)
    ap.add_argument("--output", type=Path, default=RESULTS / "step_cost.md")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("nni_harp").setLevel(logging.ERROR)  # one pruning epoch never meets the target: no news
    args.kept_heap = keep_freed_memory()
    torch.set_num_threads(args.threads)
    steps, dgs = [], []
    for name in filter(None, args.models.split(",")):
        for pair in filter(None, args.rows.split(",")):
            pruner, mode = pair.split(":")
            steps.append(step_row(name, pruner, mode, args.batch, args.reps))
            r = steps[-1]
            print(f"{name:24s} {pruner:6s} {mode:12s} plain {1e3 * r['plain']:7.1f} ms  pruner {1e3 * r['pruned']:7.1f} "
                  f"ms  {r['ratio']:.3f}x (paired median {r['paired']:.3f}x, CPU time {r['cpu_ratio']:.3f}x)", flush=True)
            write_atomic(args.output, render(steps, dgs, args))
    for name in filter(None, args.dg_models.split(",")):
        dgs.append(dg_row(name, args.dg_reps))
        r = dgs[-1]
        print(f"{name:24s} channel_groups+cost {1e3 * r['ours']:7.0f} ms  DependencyGraph {1e3 * r['dg']:7.0f} ms  "
              f"count_ops {1e3 * r['tp_ops']:7.0f} ms  {r['ratio']:.2f}x", flush=True)
    write_atomic(args.output, render(steps, dgs, args))
    write_atomic(args.output.with_suffix(".json"), json.dumps({"steps": steps, "analysis": dgs}, indent=1))
    return 0


def command(args: argparse.Namespace) -> str:
    return (f"python benchmarks/step_cost.py --models '{args.models}' --rows '{args.rows}' --batch {args.batch} "
            f"--reps {args.reps} --threads {args.threads} --dg-models '{args.dg_models}' --dg-reps {args.dg_reps}")


def render(steps: list[dict], dgs: list[dict], args: argparse.Namespace) -> str:
    met = sum(r["ratio"] <= GOAL for r in steps)
    lines = [
        "# Cost of a pruning step, and of the channel analysis",
        "",
        f"One optimizer step on one batch of {args.batch} random 32 px images: a plain PGD-AT step (every weight "
        "trained by the pipeline's SGD) against a step of the pruner as the prune stage drives it (NNI "
        "`TorchEvaluator`, patched loss and optimizer step, the pruner's score/rate optimizers and mask refresh), "
        f"same model (random weights), same batch, same PGD-AT loss ({steps[0]['attack_steps'] if steps else '?'} "
        f"attack steps, the pipeline's default). {args.threads} intra-op threads; the two steps alternate after two "
        f"warm-up steps each, {args.reps} timed steps per side; **min** over them (least disturbed by other "
        "processes), medians, the median per-step ratio and the ratio of the minimum process CPU times (all threads; "
        "less sensitive to other processes than wall time) alongside. glibc malloc keeps freed memory "
        f"({'applied' if args.kept_heap else 'NOT applied'}). Goal: ratio <= {GOAL:.2f}x in every row.",
        "",
        f"Command: `{command(args)}`",
        "",
    ]
    if steps:
        lines += [
            f"**Goal met in {met}/{len(steps)} rows.**",
            "",
            "| model | pruner | mode | plain ms | pruner ms | plain / pruner median ms | median paired ratio "
            "| CPU time ratio (min) | ratio (min) | met |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines.append("No step rows in this run (`--models` or `--rows` empty).")
    for r in steps:
        lines.append(f"| {r['model']} | {r['pruner']} | {r['mode']} | {1e3 * r['plain']:.1f} | {1e3 * r['pruned']:.1f} | "
                     f"{1e3 * r['plain_med']:.1f} / {1e3 * r['pruned_med']:.1f} | {r['paired']:.3f}x | {r['cpu_ratio']:.3f}x | "
                     f"{r['ratio']:.3f}x | {'yes' if r['ratio'] <= GOAL else 'no'} |")
    if dgs:
        lines += [
            "",
            "## Channel analysis against Torch-Pruning",
            "",
            "`graph_passes.channel_groups` + `graph_passes.cost` on one trace (`analysis_for`; structured HARP's "
            "`channel_structure`) against Torch-Pruning's "
            "`DependencyGraph().build_dependency(model, example_inputs=x)` + `get_all_groups()`, alternately, and "
            "`tp.utils.count_ops_and_params(model, x)` (its FLOPs count, the counterpart of `cost`) after them; timm, "
            f"random weights, 224 px, batch 1, {dgs[0]['reps']} repetitions, min. Goal: ours no slower than "
            "Torch-Pruning's graph + FLOPs count (ratio <= 1).",
            "",
            "| model | channel_groups + cost ms (median) | DependencyGraph + groups ms (median) | count_ops_and_params ms | "
            "ratio to DG + count | ratio to DG alone |",
            "|---|---|---|---|---|---|",
        ]
        for r in dgs:
            lines.append(f"| {r['model']} | {1e3 * r['ours']:.0f} ({1e3 * r['ours_med']:.0f}) | {1e3 * r['dg']:.0f} "
                         f"({1e3 * r['dg_med']:.0f}) | {1e3 * r['tp_ops']:.0f} | {r['ratio']:.2f}x | {r['ratio_dg']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
