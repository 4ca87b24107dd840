"""HARP under several settings on the robust-pruning benchmark's setup: what each does to the
pruning run and to the pruned model, per seed.

For each seed (its split and cached PGD-AT dense model, as ``robust_pruning.py`` builds them) and
each settings variant (a JSON object of ``HARPSettings`` fields), HARP prunes a copy of the dense
model through the public API exactly as the benchmark's ``harp`` method does, then the model is fine-tuned as the benchmark does
(``Setup.finetune``: best of the pruned model and its checkpoints). Printed and saved per run: the
pruning-time adversarial loss and kept fraction every few epochs, the epoch gamma froze, clean and
PGD-20 accuracy before and after fine-tuning. No AutoAttack: this is for choosing what to put in
front of the full benchmark, whose table is the number to report.

    python benchmarks/harp_settings_ab.py --mode unstructured --target 0.99 '{}' '{"descent_deadline": 0.5}'

Writes ``benchmarks/results/harp_settings_ab.md`` (``--out`` to change; atomically).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, write_atomic
from _robust_methods import _harp_like
from _robust_options import DEFAULT_CACHE_DIR, Options, grids
from _robust_report import Row
from _robust_setup import Setup

from nni_harp.adversarial import evaluate_robustness
from nni_harp.pruning import HARPSettings, fix_masks


def run(setup: Setup, cache: Path, mode: str, target: float, epochs: int, settings: dict) -> dict:
    model = copy.deepcopy(setup.dense(cache))
    torch.manual_seed(setup.seed)
    start = time.perf_counter()
    pruned = _harp_like(setup, model, mode, target, epochs, hydra=False, settings=HARPSettings(**settings))
    fix_masks(model, pruned.masks)
    row = Row(setup.grid.model, setup.grid.image_size, setup.seed, mode, target, "harp", epochs)
    setup.finetune(model, row)
    model.eval()
    after = evaluate_robustness(model, setup.test_batches, setup.eval_attack, autoattack=False)
    return {"seed": setup.seed, "settings": settings, "frozen_at": pruned.frozen_at,
            "loss": [round(float(h["adv_loss"]), 2) for h in pruned.history],
            "kept": [round(float(h["kept_fraction"]), 4) for h in pruned.history],
            "before": [row.pre_clean, row.pre_pgd20], "ft_epoch": row.ft_epoch,
            "after": [after.clean, after.pgd], "seconds": round(time.perf_counter() - start)}


def table(mode: str, target: float, epochs: int, runs: list[dict], command: str) -> str:
    lines = [f"# HARP settings A/B: {mode}, target {target}, {epochs} pruning epochs", "",
             f"Command: `{command}`", "",
             "Per seed: pruning-time adversarial loss and kept fraction at epochs 0, 5, 10, 15 and the last; "
             "the epoch gamma froze; clean / PGD-20 (%) of the pruned model before and after fine-tuning "
             "(the benchmark's fine-tuning with checkpoint selection; 'FT' = the kept epoch).", "",
             "| settings | seed | loss | kept | frozen | before | FT | after |", "|---|---:|---|---|---:|---|---:|---|"]
    for r in runs:
        pick = sorted({0, 5, 10, 15, len(r["kept"]) - 1} & set(range(len(r["kept"]))))
        lines.append(f"| `{json.dumps(r['settings'])}` | {r['seed']} | {' '.join(str(r['loss'][i]) for i in pick)} | "
                     f"{' '.join(str(r['kept'][i]) for i in pick)} | {r['frozen_at']} | "
                     f"{100 * r['before'][0]:.1f} / {100 * r['before'][1]:.1f} | {r['ft_epoch']} | "
                     f"{100 * r['after'][0]:.1f} / {100 * r['after'][1]:.1f} |")
    lines += ["", "| settings | after fine-tuning: PGD-20 mean ± std over seeds |", "|---|---|"]
    for variant in dict.fromkeys(json.dumps(r["settings"]) for r in runs):
        pgd = [100 * r["after"][1] for r in runs if json.dumps(r["settings"]) == variant]
        spread = f" ± {statistics.stdev(pgd):.1f}" if len(pgd) > 1 else ""
        lines.append(f"| `{variant}` | {statistics.fmean(pgd):.1f}{spread} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="HARPSettings fields as JSON objects, e.g. '{}' '{\"norm_lr\": 0.01}'")
    parser.add_argument("--mode", choices=("unstructured", "structured"), default="unstructured")
    parser.add_argument("--target", type=float, default=0.95, help="sparsity / fraction of FLOPs removed")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="robust_pruning.py's cache (the dense models)")
    parser.add_argument("--out", default=str(RESULTS / "harp_settings_ab"))
    args = parser.parse_args(argv)
    try:
        variants = [json.loads(v) for v in args.variants]
        for v in variants:
            HARPSettings(**v)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        print(f"harp_settings_ab.py: bad settings variant: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    opts = Options(seeds=args.seeds).resolved()
    grid = list(grids(opts))[0]
    runs = []
    for seed in range(args.seeds):
        setup = Setup(opts, grid, seed)
        for variant in variants:
            runs.append(run(setup, Path(args.cache_dir), args.mode, args.target, args.epochs, variant))
            print(json.dumps(runs[-1]), flush=True)
    command = "python benchmarks/harp_settings_ab.py " + " ".join(
        f"'{a}'" if a.startswith("{") else a for a in (argv if argv is not None else sys.argv[1:]))
    text = table(args.mode, args.target, args.epochs, runs, command)
    write_atomic(Path(f"{args.out}.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
