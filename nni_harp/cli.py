"""``nni-harp``: prune any timm model with HARP, evaluate saved models, list supported models.

    nni-harp prune resnet18                                 # digits, unstructured, 90 % sparsity
    nni-harp prune resnet18 --mode structured --flops-target 0.3
    nni-harp prune resnet18 --mode structured --budget latency --latency-target 0.5 --latency-backend onnxruntime
    nni-harp prune resnet18 --pruner l1norm                 # a baseline through the same stages
    torchrun --nproc_per_node=4 -m nni_harp prune resnet18  # DDP: nccl on GPUs, gloo on CPU
    nni-harp prune resnet18 --resume --output-dir runs/resnet18-unstructured
    nni-harp evaluate resnet18 --checkpoint runs/resnet18-unstructured
    nni-harp list-models 'resnet*' --check

User errors (bad model name, bad target, missing data, an output folder that cannot be used, a
damaged file to read back, a full disk) print one line on stderr and exit with status 2; a run
stopped by a NaN/inf loss exits with 3; an interrupted run (Ctrl-C: 130, SIGTERM: 143) says what
was saved and the command that continues it. Under torchrun only rank 0 shows progress, logs and
prints the report; the other ranks print errors only.

This module holds the commands, their progress bars and logging; the parser, derived from the
settings' declarations, is in :mod:`nni_harp._cli_args`, the exit codes and error handling every
entry point shares in :mod:`nni_harp._cli_guard` (both re-exported here).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from ._cli_args import build_parser, settings_of
from ._cli_guard import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_USER_ERROR, fail, guarded, resume_command
from ._heap import keep_freed_memory
from .distributed import env_rank
from .pipeline.callbacks import PipelineCallback

__all__ = ["main", "build_parser", "TqdmProgress", "guarded", "resume_command",
           "EXIT_USER_ERROR", "EXIT_NONFINITE", "EXIT_INTERRUPTED"]

#: What one step of a stage is, where it is not a batch (the latency stages: one configuration timed once).
_UNITS = {"measure-latency": "timing", "refine-latency": "timing"}


class TqdmProgress(PipelineCallback):
    """Progress bars for the pipeline callbacks: one bar per epoch with running loss/accuracy."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.epochs: dict[str, int] = {}

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_stage_start(self, stage: str, epochs: int, start_epoch: int, total: int | None) -> None:
        self.epochs[stage] = epochs
        if start_epoch:
            tqdm.write(f"{stage}: resuming at epoch {start_epoch + 1}/{epochs}", file=sys.stderr)

    def on_epoch_start(self, stage: str, epoch: int, total: int | None) -> None:
        self._close()
        epochs = self.epochs.get(stage, 1)
        desc = f"{stage} {epoch + 1}/{epochs}" if epochs > 1 else stage
        unit = _UNITS.get(stage, "batch")
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True, file=sys.stderr)

    def on_step(self, stage: str, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if metrics:
            self.bar.set_postfix(_postfix(metrics), refresh=False)

    def on_epoch_end(self, stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.bar is not None:
            if metrics:
                self.bar.set_postfix(_postfix(metrics), refresh=False)
            self.bar.refresh()
        self._close()

    def on_stage_end(self, stage: str, result: Mapping[str, Any]) -> None:
        self._close()

    def on_message(self, text: str) -> None:
        self._close()
        tqdm.write(text, file=sys.stderr)


def _postfix(metrics: Mapping[str, float]) -> dict[str, str]:
    out = {}
    for k, v in metrics.items():
        if k in ("acc", "clean", "pgd", "autoattack", "kept_fraction"):
            out[k] = f"{100 * v:.1f}%"
        elif k == "lr":
            out[k] = f"{v:.2g}"
        else:
            out[k] = f"{v:.4g}"
    return out


class _TqdmLoggingHandler(logging.Handler):
    """Log records through tqdm.write, so they do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmLoggingHandler()
    rank = env_rank()
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    for name in ("nni_harp", "graph_passes"):
        level = logging.INFO if verbose else logging.WARNING
        logging.getLogger(name).setLevel(level if rank == 0 else logging.ERROR)
    logging.getLogger("nni").setLevel(logging.WARNING if verbose and rank == 0 else logging.ERROR)


# ---------------------------------------------------------------------------------------------
def _cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import PipelineConfig, run

    settings = settings_of(args, PipelineConfig)
    config = PipelineConfig.from_dict({**settings, "output_dir": args.output_dir or _default_output_dir(args)})
    main_rank = env_rank() == 0
    callbacks = [] if args.quiet or not main_rank else [TqdmProgress()]
    start = time.perf_counter()
    report = run(config, callbacks=callbacks)
    if not main_rank:
        return 0
    print(report.table())
    print(f"\nwrote {config.out_path}/report.json, report.md, model.pt, plots "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def _default_output_dir(args: argparse.Namespace) -> str:
    """runs/MODEL-MODE, runs/MODEL-MODE-PRUNER for pruners other than HARP (by registry name)."""
    from .registry import get_pruner

    try:
        pruner = get_pruner(args.pruner).name
    except KeyError:  # the config's check names it
        pruner = args.pruner
    return f"runs/{args.model}-{args.mode}" + ("" if pruner == "harp" else f"-{pruner}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import EvaluateConfig, evaluate

    config = EvaluateConfig(**settings_of(args, EvaluateConfig))
    report = evaluate(config, callbacks=[] if args.quiet else [TqdmProgress()])
    print(report.table())
    return 0


def _cmd_list_models(args: argparse.Namespace) -> int:
    import timm

    from .pipeline.support import check_model

    names = timm.list_models(args.pattern)
    if not names:
        return fail(f"no timm model matches {args.pattern!r}")
    if not args.check:
        for name in names:
            print(name)
        print(f"{len(names)} models; add --check to mark the ones the pruning graph does not support yet",
              file=sys.stderr)
        return 0
    unsupported = 0
    for name in names:
        status = check_model(name, args.image_size)
        unsupported += not status.ok
        print(f"{name}\t{status.describe()}", flush=True)
    print(f"{len(names)} models checked, {unsupported} not supported for structured pruning", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    keep_freed_memory()  # this process's allocator: see nni_harp._heap
    commands = {"prune": _cmd_prune, "evaluate": _cmd_evaluate, "list-models": _cmd_list_models}
    resume = resume_command("nni-harp", argv) if args.command == "prune" else None
    return guarded(lambda: commands[args.command](args), resume=resume, model=getattr(args, "model", None))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
