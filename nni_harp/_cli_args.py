"""The command line's parser: ``prune`` and ``evaluate`` take one argument per setting declared in
:class:`~nni_harp.pipeline.PipelineConfig` / :class:`~nni_harp.pipeline.EvaluateConfig` (with
:func:`~nni_harp.pipeline.config.setting`), and ``--help`` states the defaults those declare;
``list-models`` has its own few. The commands themselves are in :mod:`nni_harp.cli`."""
from __future__ import annotations

import argparse
from dataclasses import MISSING
from fractions import Fraction
from typing import Any

__all__ = ["build_parser", "settings_of"]


def _number(text: str) -> float:
    """A float, also written as a fraction: ``8/255``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


# the numbers are PipelineConfig's defaults (filled in by _defaults_epilog); the run's results are the README's
_DEFAULTS_EPILOG = """\
defaults (chosen so that `nni-harp prune resnet18` on {dataset} takes a few minutes on a 2-core CPU):
  {image_size} px images; PGD-AT with {attack_steps} steps (step 2.5*eps/steps) for training;
  {pretrain_epochs} pretraining, {prune_epochs} pruning and {finetune_epochs} fine-tuning epochs; batch {batch_size};
  SGD momentum 0.9, cosine schedule, lr {pretrain_lr:g} / {prune_lr:g} / {finetune_lr:g} (pretrain / prune / fine-tune),
  weight decay {weight_decay:g}; gamma_0 {gamma_0:g}.
  Evaluation on the first {eval_samples} test images: PGD-{eval_attack_steps} and AutoAttack's APGD-CE + APGD-T
  (torchattacks). `--autoattack standard` adds FAB-T and Square (5000 queries), about
  5 s per robust image for resnet18 on 2 CPU cores: use it with a small --eval-samples or
  on a GPU. Latency: median of {latency_runs} batch-1 CPU runs with {latency_threads} thread(s) (--latency-threads),
  PyTorch eager and onnxruntime.
  `nni-harp prune resnet18 --mode structured` with these defaults: about 2 minutes on an
  idle 2-core CPU (99.0 % clean / 94.5 % PGD-10 after removing half the FLOPs; README).
  The HARP paper's recipe is 100 + 20 + 100 epochs with PGD-10 and batch 128:
  --pretrain-epochs 100 --prune-epochs 20 --finetune-epochs 100 --attack-steps 10 --batch-size 128

outputs in --output-dir (default runs/MODEL-MODE, runs/MODEL-MODE-PRUNER for other pruners):
  model.pt, model_meta.json, plan.json (structured)  -> nni_harp.load_pruned(MODEL, DIR)
  model.onnx, dense_model.pt, report.json, report.md, kept_fraction.png,
  pruning_history.png, checkpoints/ (one per stage, rewritten every epoch, for --resume)
"""


def _defaults_epilog() -> str:
    from .pipeline.config import declared_settings

    return _DEFAULTS_EPILOG.format(**{f.name: f.default for f in declared_settings() if f.default is not MISSING})


def add_declared(p: argparse.ArgumentParser, cls: type) -> None:
    """One argument per setting of ``cls`` declared with :func:`~nni_harp.pipeline.config.setting`
    (``--latency-target`` for ``latency_target``; a required setting is a positional argument, or
    a required option where it names its flag: ``--checkpoint``), in the order of the class and
    grouped as declared: its help, default, type, choices and flag come from the declaration.
    Choices are shown, not enforced here: the config's check names the setting in one line
    (argparse would print its usage too)."""
    from .pipeline.config import declared_settings, setting_type

    groups: dict[str | None, Any] = {None: p}
    for f in declared_settings(cls):
        meta = f.metadata
        if f.default is MISSING and meta["flag"] is None:
            p.add_argument(f.name, metavar=meta["metavar"], help=meta["help"])
            continue
        if not meta["hidden"] and meta["group"] not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        group = p if meta["hidden"] else groups[meta["group"]]
        kwargs: dict[str, Any] = {"dest": f.name, "help": argparse.SUPPRESS if meta["hidden"] else meta["help"]}
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if meta["cli_default"] is MISSING else meta["cli_default"]
        kind = setting_type(f, cls)
        if kind is bool:  # the flag turns the default around: --resume, --no-onnx
            kwargs["action"] = "store_false" if kwargs["default"] else "store_true"
        else:
            kwargs["type"] = _number if kind is float else kind
            choices = meta["choices"]() if meta["choices"] is not None else None
            kwargs["metavar"] = meta["metavar"] or ("{" + ",".join(choices) + "}" if choices else None)
        group.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kwargs)


def settings_of(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """What the command line gave for each setting declared in ``cls``."""
    from .pipeline.config import declared_settings

    return {f.name: getattr(args, f.name) for f in declared_settings(cls)}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (the final table still prints)")
    p.add_argument("--verbose", "-v", action="store_true", help="log INFO messages of the library")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline._settings import declared_default
    from .pipeline.config import EvaluateConfig, PipelineConfig

    parser = argparse.ArgumentParser(
        prog="nni-harp",
        description="HARP (Holistic Adversarially Robust Pruning) for timm models, as an NNI 3.0 pruner.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "prune", help="pretrain adversarially, prune with HARP, fine-tune, speed up, export, evaluate",
        description="Prune a timm model (random init, pretrained=False) with HARP and report dense vs pruned.",
        epilog=_defaults_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_declared(p, PipelineConfig)
    _add_common(p)

    e = sub.add_parser(
        "evaluate", help="clean / PGD / AutoAttack accuracy, size and latency of a saved model",
        description="Evaluate a saved model: a dense state dict, or the output folder of `nni-harp prune`.",
    )
    add_declared(e, EvaluateConfig)
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
    lm.add_argument("--image-size", type=int, default=declared_default(PipelineConfig, "image_size"),
                    help="input size for --check (default: %(default)s)")
    lm.add_argument("--verbose", "-v", action="store_true", help=argparse.SUPPRESS)
    return parser
