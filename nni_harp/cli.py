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
"""
from __future__ import annotations

import argparse
import errno
import logging
import shlex
import signal
import sys
import time
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm

from .distributed import env_rank
from .data import DATASETS
from .pipeline.callbacks import PipelineCallback

__all__ = ["main", "build_parser", "TqdmProgress", "guarded", "resume_command"]

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM exits with 128 + SIGTERM = 143
# errors of the disk or the folder, not of the program: a message, not a traceback
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                   errno.EISDIR, errno.EFBIG, errno.EEXIST}


def _number(text: str) -> float:
    """A float, also written as a fraction: ``8/255``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


_DEFAULTS_EPILOG = """\
defaults (chosen so that `nni-harp prune resnet18` on digits takes a few minutes on a 2-core CPU):
  32 px images; PGD-AT with 3 steps (step 2.5*eps/steps) for training; 4 pretraining,
  8 pruning and 2 fine-tuning epochs; batch 64; SGD momentum 0.9, cosine schedule, lr
  0.05 / 0.1 / 0.01 (pretrain / prune / fine-tune), weight decay 5e-4; gamma_0 0.01.
  Evaluation on the first 200 test images: PGD-10 and AutoAttack's APGD-CE + APGD-T
  (torchattacks). `--autoattack standard` adds FAB-T and Square (5000 queries), about
  5 s per robust image for resnet18 on 2 CPU cores: use it with a small --eval-samples or
  on a GPU. Latency: median of 20 batch-1 CPU runs, PyTorch eager and onnxruntime.
  `nni-harp prune resnet18 --mode structured` with these defaults: about 2 minutes on an
  idle 2-core CPU (99.0 % clean / 94.5 % PGD-10 after removing half the FLOPs; README).
  The HARP paper's recipe is 100 + 20 + 100 epochs with PGD-10 and batch 128:
  --pretrain-epochs 100 --prune-epochs 20 --finetune-epochs 100 --attack-steps 10 --batch-size 128

outputs in --output-dir (default runs/MODEL-MODE, runs/MODEL-MODE-PRUNER for other pruners):
  model.pt, model_meta.json, plan.json (structured)  -> nni_harp.load_pruned(MODEL, DIR)
  model.onnx, dense_model.pt, report.json, report.md, kept_fraction.png,
  pruning_history.png, checkpoints/ (one per stage, rewritten every epoch, for --resume)
"""


def _add_declared(p: argparse.ArgumentParser, only_group: str | None = None) -> None:
    """One argument per setting declared in :class:`~nni_harp.pipeline.PipelineConfig` with
    :func:`~nni_harp.pipeline.config.setting` (``--latency-target`` for ``latency_target``, the
    required ``model`` positional), in the order of the class and grouped as declared: its help,
    default, type, choices and flag come from the declaration (``only_group``: that group's
    settings alone). Choices are shown, not enforced here: the config's check names the setting
    in one line (argparse would print its usage too)."""
    from dataclasses import MISSING

    from .pipeline.config import declared_settings, setting_type

    groups: dict[str | None, Any] = {None: p}
    for f in declared_settings():
        meta = f.metadata
        if only_group is not None and meta["group"] != only_group:
            continue
        if f.default is MISSING:
            p.add_argument(f.name, metavar=meta["metavar"], help=meta["help"])
            continue
        if not meta["hidden"] and meta["group"] not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        group = p if meta["hidden"] else groups[meta["group"]]
        default = f.default if meta["cli_default"] is MISSING else meta["cli_default"]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": argparse.SUPPRESS if meta["hidden"] else meta["help"]}
        kind = setting_type(f)
        if kind is bool:  # the flag turns the default around: --resume, --no-onnx
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = _number if kind is float else kind
            choices = meta["choices"]() if meta["choices"] is not None else None
            kwargs["metavar"] = meta["metavar"] or ("{" + ",".join(choices) + "}" if choices else None)
        group.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kwargs)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (the final table still prints)")
    p.add_argument("--verbose", "-v", action="store_true", help="log INFO messages of the library")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nni-harp",
        description="HARP (Holistic Adversarially Robust Pruning) for timm models, as an NNI 3.0 pruner.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "prune", help="pretrain adversarially, prune with HARP, fine-tune, speed up, export, evaluate",
        description="Prune a timm model (random init, pretrained=False) with HARP and report dense vs pruned.",
        epilog=_DEFAULTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_declared(p)
    _add_common(p)

    e = sub.add_parser(
        "evaluate", help="clean / PGD / AutoAttack accuracy, size and latency of a saved model",
        description="Evaluate a saved model: a dense state dict, or the output folder of `nni-harp prune`.",
    )
    e.add_argument("model", metavar="MODEL", help="the timm model name the weights belong to")
    e.add_argument("--checkpoint", required=True, help="dense state dict file, or a `nni-harp prune` output folder")
    e.add_argument("--dataset", default=None, choices=DATASETS,
                   help="default: the run's dataset (output folder) or digits")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--image-size", type=int, default=None, help="default: the run's (output folder) or 32")
    e.add_argument("--eps", type=_number, default=8 / 255, help="default: 8/255")
    e.add_argument("--batch-size", type=int, default=100, help="default: %(default)s")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output-dir", default=None, help="also write evaluate_report.json/.md (and model.onnx) here")
    _add_declared(e, only_group="evaluation")
    _add_common(e)

    lm = sub.add_parser(
        "list-models", help="list timm model names; --check marks those the pruning graph cannot handle",
        description=(
            "List timm models matching PATTERN (shell-style, default '*'). Without --check this is "
            "instant. With --check each model is built (random weights) and analysed by graph_passes "
            "at --image-size; results stream as they come (about 0.1-5 s per model, so narrow the "
            "pattern). Marks: 'ok' (structured and unstructured), 'unstructured only' (no channel "
            "group can be pruned), 'unsupported: REASON' (the graph could not be traced/analysed)."
        ),
    )
    lm.add_argument("pattern", nargs="?", default="*", metavar="PATTERN")
    lm.add_argument("--check", action="store_true", help="analyse each model with graph_passes")
    lm.add_argument("--image-size", type=int, default=32, help="input size for --check (default: %(default)s)")
    lm.add_argument("--verbose", "-v", action="store_true", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------
#: What one step of a stage is, where it is not a batch (``measure-latency``: one model timed).
_UNITS = {"measure-latency": "model"}


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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the request cannot be done as asked', shown without a traceback."""
    from graph_passes import PlanError

    from .data import DatasetError
    from .loading import LoadError
    from .pipeline import CheckpointWriteError, ConfigError, ResumeError

    from .distributed import DistributedError

    errors: list[type[BaseException]] = [
        ConfigError, DatasetError, ResumeError, LoadError, FileNotFoundError, DistributedError, PlanError,
        CheckpointWriteError,
    ]
    from .adversarial import AdversarialError
    from .pruning import PruningError

    errors += [AdversarialError, PruningError]
    return tuple(errors)


def _fail(message: str, code: int = EXIT_USER_ERROR, prog: str = "nni-harp") -> int:
    rank = env_rank()
    print(f"{prog}: error: {f'[rank {rank}] ' if rank else ''}{message}", file=sys.stderr)
    return code


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command line that continues the run ``argv`` started: ``--resume`` for ``--overwrite``."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*shlex.split(prog), *args])


def guarded(command: Callable[[], int], *, prog: str = "nni-harp", resume: str | None = None,
            model: str | None = None) -> int:
    """Run ``command`` the way every entry point of nni-harp does: SIGTERM ends it like Ctrl-C
    (every finished epoch is already saved; the message names ``resume``, the command that
    continues it), and every error that is not a bug becomes one line on stderr and an exit code."""
    from graph_passes import GraphPassError

    from .pipeline import RunInterrupted
    from .pipeline._loop import NonFiniteLossError

    received: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return command()
    except NonFiniteLossError as exc:
        return _fail(str(exc), EXIT_NONFINITE, prog)
    except KeyboardInterrupt as exc:
        code = 128 + received[0] if received else EXIT_INTERRUPTED
        how = f"stopped by {signal.Signals(received[0]).name}" if received else "interrupted"
        if isinstance(exc, RunInterrupted) and exc.resumable and resume:
            return _fail(f"{how}; {exc.saved}; to continue: {resume}", code, prog)
        saved = f"; {exc.saved}" if isinstance(exc, RunInterrupted) else ""
        return _fail(f"{how}{saved}", code, prog)
    except _user_errors() as exc:
        return _fail(str(exc), prog=prog)
    except GraphPassError as exc:
        return _fail(
            f"the pruning graph cannot handle {model or 'this model'}: {exc}"
            " (`nni-harp list-models PATTERN --check` shows supported models; --mode unstructured needs no graph)",
            prog=prog,
        )
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        again = f"; finished epochs are kept: fix it, then run {resume}" if resume else ""
        return _fail(f"{exc.strerror or exc}{where}: free space or fix the folder's permissions{again}", prog=prog)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
def _cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import PipelineConfig, run
    from .pipeline.config import declared_settings

    settings = {f.name: getattr(args, f.name) for f in declared_settings()}
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

    config = EvaluateConfig(
        model=args.model, checkpoint=args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
        image_size=args.image_size, eps=args.eps, eval_attack_steps=args.eval_attack_steps,
        eval_samples=args.eval_samples, autoattack=args.autoattack, batch_size=args.batch_size,
        seed=args.seed, latency_runs=args.latency_runs, export_onnx=args.export_onnx, output_dir=args.output_dir,
    )
    report = evaluate(config, callbacks=[] if args.quiet else [TqdmProgress()])
    print(report.table())
    return 0


def _cmd_list_models(args: argparse.Namespace) -> int:
    import timm

    from .pipeline.support import check_model

    names = timm.list_models(args.pattern)
    if not names:
        return _fail(f"no timm model matches {args.pattern!r}")
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
    commands = {"prune": _cmd_prune, "evaluate": _cmd_evaluate, "list-models": _cmd_list_models}
    resume = resume_command("nni-harp", argv) if args.command == "prune" else None
    return guarded(lambda: commands[args.command](args), resume=resume, model=getattr(args, "model", None))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
