"""NNI trial: ``python -m nni_harp.trial`` (the ``trialCommand`` of an NNI experiment).

Parameters come from ``nni.get_next_parameter()`` and fill in :data:`DEFAULTS` (outside an
experiment NNI returns nothing and the defaults are used; ``--param key=value`` overrides any of
them, for trying a trial by hand). The trial runs the pipeline (:func:`nni_harp.pipeline.run`:
adversarial pretraining, pruning with the pruner named by ``pruner`` from
:mod:`nni_harp.registry` -- by its NNI class name (``HARPPruner``, ``HydraPruner``,
``L1NormPruner``, ``L2NormPruner``, ``FPGMPruner``, ``TaylorPruner``, ``MovementPruner``) or its
short name (harp, hydra, l1norm, ...) -- adversarial fine-tuning with the masks fixed, speedup
when structured, evaluation) in a folder of its own.

Reported to NNI: after every pruning and fine-tuning epoch (one pass for a one-shot pruner) an
intermediate result ``{'default': PGD accuracy on the first eval_batches x batch_size test
images, 'clean': ..., 'stage': ..., 'epoch': ..., 'loss': ...}``; at the end the final result
``{'default': robust (PGD) accuracy, 'robust_acc', 'clean_acc', 'sparsity', 'flops_kept',
'target_sparsity', 'pruner', 'pruner_class', 'seconds', ...}``. Accuracies are fractions; ``sparsity`` is the
fraction of Conv/Linear weights removed, ``flops_kept`` the pruned model's FLOPs (non-zero
weights) over the dense model's.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .pipeline.callbacks import PipelineCallback

__all__ = ["DEFAULTS", "resolve_params", "config_for", "NNIReporter", "run_trial", "main"]

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "pruner": "harp",
    "model": "test_resnet",
    "dataset": "digits",
    "image_size": 32,
    "mode": "unstructured",
    "sparsity": 0.9,
    "gamma_0": 0.01,
    "adv_loss": "pgd",
    "eps": 8 / 255,
    "attack_steps": 2,
    "pretrain_epochs": 2,
    "prune_epochs": 2,
    "finetune_epochs": 1,
    "batch_size": 64,
    "pretrain_lr": 0.05,
    "prune_lr": 0.1,
    "finetune_lr": 0.01,
    "max_train_batches": None,
    "eval_batches": 2,
    "eval_attack_steps": 5,
    "seed": 0,
}

# the pipeline stages whose epochs are reported as intermediate results
REPORTED_STAGES = ("prune", "finetune")


def resolve_params(received: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS updated with NNI's parameters and then ``overrides``; unknown keys are an error."""
    params = dict(DEFAULTS)
    for source in (received or {}, overrides or {}):
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise KeyError(f"trial parameter {unknown[0]!r} is unknown; known: {', '.join(DEFAULTS)}")
        params.update(source)
    for key in ("sparsity", "gamma_0", "eps", "pretrain_lr", "prune_lr", "finetune_lr"):
        params[key] = float(params[key])
    from .registry import get_pruner

    get_pruner(str(params["pruner"]))  # an unknown pruner fails here, listing the known names
    return params


def config_for(params: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> Any:
    """The :class:`~nni_harp.pipeline.PipelineConfig` of one trial.

    ``sparsity`` is the target in both modes: the fraction of weights removed (unstructured) or
    of FLOPs removed (structured, ``flops_target = 1 - sparsity``). Evaluation (per epoch and at
    the end) attacks the first ``eval_batches x batch_size`` test images with PGD; AutoAttack,
    ONNX and latency runs are left out, a trial compares pruners on robust accuracy.
    """
    from .pipeline import PipelineConfig

    samples = int(params["eval_batches"]) * int(params["batch_size"])
    return PipelineConfig(
        model=str(params["model"]), dataset=str(params["dataset"]), image_size=int(params["image_size"]),
        mode=str(params["mode"]), pruner=str(params["pruner"]), sparsity=float(params["sparsity"]),
        flops_target=1.0 - float(params["sparsity"]), adv_loss=str(params["adv_loss"]), eps=float(params["eps"]),
        attack_steps=int(params["attack_steps"]), pretrain_epochs=int(params["pretrain_epochs"]),
        prune_epochs=int(params["prune_epochs"]), finetune_epochs=int(params["finetune_epochs"]),
        batch_size=int(params["batch_size"]), seed=int(params["seed"]), output_dir=str(output_dir),
        overwrite=True, pretrain_lr=float(params["pretrain_lr"]), prune_lr=float(params["prune_lr"]),
        finetune_lr=float(params["finetune_lr"]), gamma_0=float(params["gamma_0"]),
        eval_samples=samples, eval_attack_steps=int(params["eval_attack_steps"]), epoch_eval_samples=samples,
        autoattack="off", latency_runs=1, export_onnx=False,
        max_train_batches=None if params["max_train_batches"] is None else int(params["max_train_batches"]),
    )


class NNIReporter(PipelineCallback):
    """Sends the pipeline's pruning and fine-tuning epochs to NNI as intermediate results.

    ``sink`` has ``report_intermediate_result`` (the ``nni`` module in an experiment); each
    result is also kept in :attr:`sent`. Epochs count on across the two stages.
    """

    def __init__(self, sink: Any = None) -> None:
        self.sink = sink
        self.sent: list[dict[str, Any]] = []

    def on_epoch_end(self, stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
        if stage not in REPORTED_STAGES or "val_pgd" not in metrics:
            return
        result: dict[str, Any] = {
            "default": float(metrics["val_pgd"]), "clean": float(metrics["val_clean"]),
            "stage": stage, "epoch": len(self.sent),
        }
        result.update({k: float(v) for k, v in metrics.items() if k not in ("val_pgd", "val_clean")})
        self.sent.append(result)
        if self.sink is not None:
            self.sink.report_intermediate_result(result)
        logger.info("intermediate %s", result)


def final_result(report: Any, params: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The trial's final result from the pipeline's :class:`~nni_harp.pipeline.Report`."""
    from .registry import get_pruner

    dense, pruned = report.dense, report.pruned
    return {
        "default": pruned.pgd_acc,
        "robust_acc": pruned.pgd_acc,
        "clean_acc": pruned.clean_acc,
        "dense_robust_acc": dense.pgd_acc if dense is not None else None,
        "dense_clean_acc": dense.clean_acc if dense is not None else None,
        "sparsity": report.achieved.get("sparsity"),
        "flops_kept": report.achieved.get("flops_kept"),
        "target_sparsity": float(params["sparsity"]),
        "pruner": report.pruner,
        "pruner_class": get_pruner(report.pruner).class_name,
        "mode": report.mode,
        "eval_samples": pruned.eval_samples,
        "seconds": seconds,
    }


def _default_output_dir() -> Path:
    """The trial's own folder: NNI's ``NNI_OUTPUT_DIR`` in an experiment, else a fresh temp dir."""
    base = os.environ.get("NNI_OUTPUT_DIR")
    if base:
        return Path(base) / "nni-harp"
    import tempfile

    return Path(tempfile.mkdtemp(prefix="nni-harp-trial-"))


def run_trial(params: Mapping[str, Any], report: Any = None, output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run one trial through :func:`nni_harp.pipeline.run`; ``report`` has
    ``report_intermediate_result`` / ``report_final_result`` (the ``nni`` module in an
    experiment). Returns the final result dict. Under torchrun only rank 0 reports."""
    from . import distributed as hd
    from .pipeline import run

    start = time.perf_counter()
    out = Path(output_dir) if output_dir is not None else _default_output_dir()
    config = config_for(params, out)
    main_rank = hd.env_rank() == 0
    reporter = NNIReporter(report if main_rank else None)
    result_report = run(config, callbacks=[reporter])
    result = final_result(result_report, params, time.perf_counter() - start)
    if report is not None and main_rank:
        report.report_final_result(result)
    return result


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nni_harp.trial", description=__doc__.splitlines()[0])
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trial parameter (value parsed as JSON when it can be)")
    parser.add_argument("--output-dir", default=None,
                        help="the pipeline's output folder (default: $NNI_OUTPUT_DIR/nni-harp, else a temp dir)")
    parser.add_argument("--json-out", help="also write the final result to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    import nni

    received = nni.get_next_parameter()
    params = resolve_params(received, _parse_overrides(args.param))
    logger.info("trial parameters: %s", params)
    result = run_trial(params, nni, args.output_dir)
    print(json.dumps(result, sort_keys=True))
    if args.json_out:
        from ._io import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
