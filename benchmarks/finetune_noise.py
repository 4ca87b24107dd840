"""How much of a robust-pruning cell is fine-tuning noise: each pruned model fine-tuned several times.

``robust_pruning.py`` fine-tunes every pruned model once (5 epochs of PGD-AT, the best of the
model and its checkpoints kept). This script prunes exactly as it does (same split, cached dense
model, methods from its registry, HARP first so the ``harp-alloc-mag`` ablation gets its
allocation), then fine-tunes each pruned model ``--ft-seeds`` times, each with its own attack
randomness and batch order (``Setup.finetune``'s repeats 1, 2, ...: ``torch.manual_seed`` and the
loader's generator both seeded ``1000 * repeat + seed``), and measures PGD-20 on the evaluation half
after each. No AutoAttack: this measures the spread, not the cell's reported number.

Reported per method and setting: PGD-20 mean ± std over all seeds x fine-tuning seeds, the std
over pruning seeds of the per-seed means (what is left when fine-tuning noise is averaged out),
and the pooled within-model std (the same pruned model, fine-tuned again).

    python benchmarks/finetune_noise.py --targets 0.75,0.9 --ft-seeds 3

Writes ``benchmarks/results/finetune_noise.md`` and ``.json`` (``--out`` to change; atomically).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, write_atomic
from _robust_methods import METHODS, allocation
from _robust_options import DEFAULT_CACHE_DIR, Options, grids
from _robust_report import Row
from _robust_setup import Setup

from nni_harp.adversarial import evaluate_robustness
from nni_harp.pruning import fix_masks, release_masks

DEFAULT_METHODS = "harp,hydra,global-mag,layer-mag,harp-alloc-mag,nni-l1,nni-taylor,torch-pruning"


def finetune_once(setup: Setup, pruned_model: torch.nn.Module, masks: dict, repeat: int) -> tuple[float, int]:
    """Fine-tune a copy of ``pruned_model`` under ``masks`` as ``Setup.finetune``'s ``repeat``; its PGD-20."""
    model = copy.deepcopy(pruned_model)
    fix_masks(model, masks)
    row = Row(setup.grid.model, setup.grid.image_size, setup.seed, "", None, "")
    setup.finetune(model, row, repeat)
    model.eval()
    pgd = evaluate_robustness(model, setup.test_batches, setup.eval_attack, autoattack=False).pgd
    release_masks(model)
    return 100 * pgd, int(row.ft_epoch or 0)


def run(opts: Options, cache: Path, mode: str, targets: list[float], methods: list[str], ft_seeds: int,
        epochs: int) -> list[dict]:
    grid = grids(opts)[0]
    runs = []
    for seed in range(opts.seeds):
        setup = Setup(opts, grid, seed)
        for target in targets:
            harp_alloc = None
            for name in methods:
                model = copy.deepcopy(setup.dense(cache))
                torch.manual_seed(seed)
                start = time.perf_counter()
                pruned = METHODS[name].prune(setup, model, mode, target, epochs, harp_alloc)
                masks = {m: {p: t.to(setup.device) for p, t in d.items()} for m, d in (pruned.masks or {}).items()}
                if name == "harp":
                    harp_alloc = allocation(masks, mode, setup.structure)
                results = [finetune_once(setup, model, masks, k + 1) for k in range(ft_seeds)]
                runs.append({"seed": seed, "target": target, "method": name, "pgd20": [round(p, 1) for p, _ in results],
                             "ft_epoch": [e for _, e in results], "seconds": round(time.perf_counter() - start)})
                print(json.dumps(runs[-1]), flush=True)
    return runs


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def table(runs: list[dict], mode: str, epochs: int, command: str) -> str:
    lines = [f"# Fine-tuning noise: {mode}, {epochs} pruning epochs", "", f"Command: `{command}`", "",
             "Each pruned model fine-tuned once per fine-tuning seed (5 epochs PGD-AT as `robust_pruning.py`); "
             "PGD-20 (%) on the evaluation half. 'per seed' lists, per pruning seed, the fine-tuning seeds' results. "
             "'seed-mean std' = std over pruning seeds of the per-seed means; 'within std' = pooled std of the "
             "same pruned model fine-tuned again.", "",
             "| target | method | per seed | mean ± std (all) | seed-mean std | within std |",
             "|---:|---|---|---|---:|---:|"]
    for target in dict.fromkeys(r["target"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs):
            cell = [r for r in runs if r["target"] == target and r["method"] == method]
            if not cell:
                continue
            every = [p for r in cell for p in r["pgd20"]]
            means = [statistics.fmean(r["pgd20"]) for r in cell]
            within = [(p - statistics.fmean(r["pgd20"])) ** 2 for r in cell for p in r["pgd20"]]
            dof = sum(len(r["pgd20"]) - 1 for r in cell)
            pooled = math.sqrt(sum(within) / dof) if dof else float("nan")
            per_seed = "; ".join(" ".join(f"{p:.1f}" for p in r["pgd20"]) for r in cell)
            lines.append(f"| {target} | {method} | {per_seed} | {statistics.fmean(every):.1f} ± {_std(every):.1f} | "
                         f"{_std(means):.1f} | {pooled:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("unstructured", "structured"), default="structured")
    parser.add_argument("--targets", default="0.75,0.9", help="comma-separated sparsities / fractions of FLOPs removed")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated, from robust_pruning.py's methods")
    parser.add_argument("--ft-seeds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="pruning epochs of HARP/HYDRA")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="robust_pruning.py's cache (dense models)")
    parser.add_argument("--out", default=str(RESULTS / "finetune_noise"))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS or args.mode not in METHODS[m].modes]
    if unknown:
        print(f"finetune_noise.py: no {args.mode} method {', '.join(unknown)}; choose from "
              f"{', '.join(n for n, m in METHODS.items() if args.mode in m.modes)}", file=sys.stderr)
        return 2
    if "harp-alloc-mag" in methods and ("harp" not in methods or methods.index("harp") > methods.index("harp-alloc-mag")):
        print("finetune_noise.py: harp-alloc-mag needs harp listed before it", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    opts = Options(seeds=args.seeds).resolved()
    runs = run(opts, Path(args.cache_dir), args.mode, [float(t) for t in args.targets.split(",")], methods,
               args.ft_seeds, args.epochs)
    command = "python benchmarks/finetune_noise.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(runs, args.mode, args.epochs, command)
    write_atomic(Path(f"{args.out}.md"), text)
    write_atomic(Path(f"{args.out}.json"), json.dumps({"command": command, "runs": runs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
