"""How steady robust_pruning.py's adversarial fine-tuning is: one pruned model fine-tuned several
times, its accuracy after every epoch.

Builds robust_pruning.py's setup for one (method, setting, seed) -- its digits split, cached dense
model (``--cache-dir``), pruning and fine-tuning loop -- prunes once, then fine-tunes copies of the
pruned model ``--repeats`` times (each with the batch order and attack randomness that
robust_pruning's ``--finetune-repeats`` gives it) and logs, after every epoch, the checkpoint
selection's PGD-10 accuracy on 256 training images and the clean and PGD-20 accuracy on the
held-out images. ``--keep-last-batch yes`` trains on every epoch's partial last batch as the runs
before 2026-12-02 did; with it, epochs ended in sudden collapses. Writes
``results/finetune_stability.md`` (a table per fine-tuning: held-out PGD-20 after each epoch).

    python benchmarks/finetune_stability.py [--method harp] [--mode structured] [--target 0.75] [--seed 1]
        [--repeats 2] [--finetune-epochs 20] [--keep-last-batch no] [--eps 0.12] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, write_atomic  # noqa: E402
from _robust_methods import METHODS  # noqa: E402
from _robust_options import DEFAULT_CACHE_DIR, Options, _parse_bool, _parse_eps, grids  # noqa: E402
from _robust_report import Row  # noqa: E402
from _robust_setup import Setup  # noqa: E402

from nni_harp.adversarial import evaluate_robustness  # noqa: E402
from nni_harp.pruning import fix_masks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="harp", choices=sorted(METHODS))
    ap.add_argument("--mode", default="structured", choices=("unstructured", "structured"))
    ap.add_argument("--target", type=float, default=0.75, help="sparsity or fraction of FLOPs removed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--keep-last-batch", type=_parse_bool, default=False, help="yes: train on the partial last batch")
    ap.add_argument("--eps", type=_parse_eps, default=Options.eps, help="e.g. 0.12 or 8/255")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, default=RESULTS / "finetune_stability.md")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    opts = Options(eps=args.eps, finetune_epochs=args.finetune_epochs, keep_last_batch=args.keep_last_batch)
    grid = grids(opts)[0]
    setup = Setup(opts, grid, args.seed)
    model = copy.deepcopy(setup.dense(args.cache_dir))
    torch.manual_seed(args.seed)
    pruned = METHODS[args.method].prune(setup, model, args.mode, args.target, opts.prune_epochs, None)
    if pruned.masks is None:
        raise SystemExit(f"{args.method} returns a physically smaller model; pick a method that returns masks")
    epochs: list[list[tuple[float, float, float]]] = []  # per fine-tuning: (select, clean, pgd20) per epoch
    select = setup._selection_accuracy

    def logged(net: torch.nn.Module) -> float:
        accuracy = select(net)
        was_training = net.training
        held_out = evaluate_robustness(net.eval(), setup.test_batches, setup.eval_attack, autoattack=False)
        net.train(was_training)
        epochs[-1].append((accuracy, held_out.clean, held_out.pgd))
        print(f"  epoch {len(epochs[-1]) - 1}: selection {accuracy:.3f}, held-out clean {held_out.clean:.3f} "
              f"PGD-20 {held_out.pgd:.3f}", flush=True)
        return accuracy

    setup._selection_accuracy = logged  # type: ignore[method-assign]
    start = time.perf_counter()
    kept = []
    for repeat in range(args.repeats):
        print(f"fine-tuning {repeat}", flush=True)
        epochs.append([])
        net = copy.deepcopy(model)
        fix_masks(net, pruned.masks)
        row = Row(grid.model, grid.image_size, args.seed, args.mode, args.target, args.method, opts.prune_epochs)
        setup.finetune(net, row, repeat)
        kept.append(row.ft_epoch)
    lines = [
        "# Fine-tuning stability",
        "",
        f"`{args.method}` {args.mode} {args.target:g} on {grid.tag}, seed {args.seed}, eps {args.eps:g}; "
        f"{args.finetune_epochs} PGD-AT fine-tuning epochs (SGD lr {opts.finetune_lr}, cosine), "
        f"{'training on' if opts.keep_last_batch else 'leaving out'} every epoch's partial last batch. Held-out "
        f"PGD-20 accuracy (%) after each epoch (0: the pruned model), per fine-tuning; the kept checkpoint "
        f"(best selection accuracy) in bold. {time.perf_counter() - start:.0f} s.",
        "",
        "Command: `python benchmarks/finetune_stability.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) + "`",
        "",
        "| fine-tuning | " + " | ".join(str(e) for e in range(args.finetune_epochs + 1)) + " |",
        "|---|" + "---:|" * (args.finetune_epochs + 1),
    ]
    for repeat, (log, best) in enumerate(zip(epochs, kept)):
        cells = [f"**{100 * p:.1f}**" if e == best else f"{100 * p:.1f}" for e, (_, _, p) in enumerate(log)]
        lines.append(f"| {repeat} | " + " | ".join(cells) + " |")
    write_atomic(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
