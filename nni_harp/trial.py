"""NNI trial: ``python -m nni_harp.trial`` (the ``trialCommand`` of an NNI experiment).

Parameters come from ``nni.get_next_parameter()`` and fill in :data:`DEFAULTS`: every setting of
:class:`~nni_harp.pipeline.PipelineConfig` by the same name, except those the trial sets itself
(:data:`SET_BY_TRIAL`), and ``eval_batches`` (outside an experiment NNI returns nothing and the
defaults are used; ``--param key=value`` overrides any of them, for trying a trial by hand). The
trial runs the pipeline (:func:`nni_harp.pipeline.run`: adversarial pretraining, pruning with
the pruner named by ``pruner`` from :mod:`nni_harp.registry` -- by its NNI class name
(``HARPPruner``, ``HydraPruner``, ``L1NormPruner``, ``L2NormPruner``, ``FPGMPruner``,
``TaylorPruner``, ``MovementPruner``) or its short name (harp, hydra, l1norm, ...) -- adversarial
fine-tuning with the masks fixed, speedup when structured, evaluation) in a folder of its own,
under the command line's rules: an empty folder, or one that holds a run of the same settings with
``--resume``, or any with ``--overwrite`` (which replaces only the files a run writes). Bad
parameters, an unusable folder and the other user errors print one line on stderr and exit with
status 2, as ``nni-harp`` does.

Reported to NNI: after every pruning and fine-tuning epoch (one pass for a one-shot pruner) an
intermediate result ``{'default': PGD accuracy on the first eval_batches x batch_size test
images, 'clean': ..., 'stage': ..., 'epoch': ..., 'loss': ...}``; at the end the final result
``{'default': robust (PGD) accuracy, 'robust_acc', 'clean_acc', 'sparsity', 'flops_kept',
'target_sparsity', 'pruner', 'pruner_class', 'seconds', 'latency_budget', ...}``
(``latency_budget``: report.json's, ``None`` unless ``budget='latency'``). Accuracies are
fractions; ``sparsity`` is the fraction of Conv/Linear weights removed, ``flops_kept`` the pruned
model's FLOPs (non-zero weights) over the dense model's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .pipeline.callbacks import PipelineCallback
from .pipeline.config import PipelineConfig, coerce_number, coerce_setting, declared_settings

__all__ = ["DEFAULTS", "TRIAL_DEFAULTS", "SET_BY_TRIAL", "resolve_params", "config_for", "NNIReporter", "run_trial",
           "main"]

logger = logging.getLogger(__name__)

#: A trial compares pruners on robust accuracy: AutoAttack, the ONNX export and latency runs are left out.
FIXED: dict[str, Any] = {"autoattack": "off", "latency_runs": 1, "export_onnx": False}
#: PipelineConfig's settings that the trial sets itself, not parameters: from its command line
#: (``--output-dir``, ``--resume``, ``--overwrite``), from other parameters (``flops_target = 1 -
#: sparsity``; ``eval_samples`` and ``epoch_eval_samples``: ``eval_batches x batch_size``), or :data:`FIXED`.
SET_BY_TRIAL = ("output_dir", "resume", "overwrite", "flops_target", "eval_samples", "epoch_eval_samples", *FIXED)
#: Where a trial's defaults differ from PipelineConfig's: a small model and short stages.
TRIAL_DEFAULTS: dict[str, Any] = {
    "model": "test_resnet", "attack_steps": 2, "pretrain_epochs": 2, "prune_epochs": 2, "finetune_epochs": 1,
    "eval_attack_steps": 5,
}
#: The trial's parameters: every setting of PipelineConfig but :data:`SET_BY_TRIAL`, with its
#: declared default (or the one in :data:`TRIAL_DEFAULTS`), and the trial's own ``eval_batches``.
DEFAULTS: dict[str, Any] = {
    **{f.name: TRIAL_DEFAULTS.get(f.name, f.default) for f in declared_settings(PipelineConfig)
       if f.name not in SET_BY_TRIAL},
    "eval_batches": 2,
}

# the pipeline stages whose epochs are reported as intermediate results
REPORTED_STAGES = ("prune", "finetune")


def _typed(key: str, value: Any) -> Any:
    """A parameter's value as its setting's type (NNI sends 2.0 for an integer, ``--param`` strings)."""
    return coerce_number(key, value, int) if key == "eval_batches" else coerce_setting(key, value)


def resolve_params(received: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS updated with NNI's parameters and then ``overrides``; an unknown key, a value of the
    wrong type or an unknown pruner is a :class:`~nni_harp.pipeline.ConfigError` naming the parameter
    (the ranges are :class:`~nni_harp.pipeline.PipelineConfig`'s, checked by :func:`config_for`)."""
    from .pipeline import ConfigError

    params = dict(DEFAULTS)
    for source in (received or {}, overrides or {}):
        if not isinstance(source, Mapping):
            raise ConfigError("parameters", f"NNI's parameters must be an object of name -> value, got {source!r}")
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown trial parameter; known: {', '.join(DEFAULTS)}")
        params.update(source)
    params = {key: _typed(key, value) for key, value in params.items()}
    from .registry import get_pruner

    try:
        get_pruner(str(params["pruner"]))
    except KeyError as exc:  # its message lists the known names
        raise ConfigError("pruner", str(exc.args[0])) from None
    return params


def config_for(params: Mapping[str, Any], output_dir: str | os.PathLike[str], resume: bool = False,
               overwrite: bool = False) -> PipelineConfig:
    """The :class:`~nni_harp.pipeline.PipelineConfig` of one trial, built and checked by
    :meth:`PipelineConfig.from_dict <nni_harp.pipeline.PipelineConfig.from_dict>` (parameters
    missing from ``params`` take :data:`DEFAULTS`).

    ``sparsity`` is the target in both modes: the fraction of weights removed (unstructured) or
    of FLOPs removed (structured, ``flops_target = 1 - sparsity``); with ``budget='latency'``
    (structured) the target is ``latency_target``, the fraction of the dense latency kept. Every
    other setting of :class:`~nni_harp.pipeline.PipelineConfig` but :data:`SET_BY_TRIAL` is a
    trial parameter of the same name. Evaluation (per epoch and at the end) attacks the first
    ``eval_batches x batch_size`` test images with PGD; AutoAttack, ONNX and latency runs are
    left out, a trial compares pruners on robust accuracy.
    """
    from .pipeline import ConfigError

    settings = {**DEFAULTS, **params}
    eval_batches = _typed("eval_batches", settings.pop("eval_batches"))
    if eval_batches < 1:
        raise ConfigError("eval_batches", f"must be at least 1, got {eval_batches}")
    samples = eval_batches * _typed("batch_size", settings["batch_size"])
    trial_set = {"flops_target": 1.0 - _typed("sparsity", settings["sparsity"]), "output_dir": str(output_dir),
                 "resume": resume, "overwrite": overwrite, "eval_samples": samples, "epoch_eval_samples": samples}
    return PipelineConfig.from_dict({**settings, **trial_set, **FIXED}, coerce=True)


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
        "latency_budget": report.latency_budget,
    }


def _default_output_dir() -> tuple[Path, bool]:
    """The trial's own folder: NNI's ``NNI_OUTPUT_DIR`` in an experiment, else a fresh temp dir;
    and whether it was made just now (the temp dir: empty, nothing of the user's)."""
    base = os.environ.get("NNI_OUTPUT_DIR")
    if base:
        return Path(base) / "nni-harp", False
    import tempfile

    return Path(tempfile.mkdtemp(prefix="nni-harp-trial-")), True


def run_trial(params: Mapping[str, Any], report: Any = None, output_dir: str | os.PathLike[str] | None = None,
              resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run one trial through :func:`nni_harp.pipeline.run`; ``report`` has
    ``report_intermediate_result`` / ``report_final_result`` (the ``nni`` module in an
    experiment). Returns the final result dict. Under torchrun only rank 0 reports. The output
    folder follows the pipeline's rules (``resume``, ``overwrite``: see the module docstring)."""
    from . import distributed as hd
    from .pipeline import run

    start = time.perf_counter()
    out, made = (Path(output_dir), False) if output_dir is not None else _default_output_dir()
    try:
        config = config_for(params, out, resume=resume, overwrite=overwrite)
    except BaseException:
        if made:  # rejected parameters: leave no empty folder behind (rmdir removes only an empty one)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    main_rank = hd.env_rank() == 0
    reporter = NNIReporter(report if main_rank else None)
    result_report = run(config, callbacks=[reporter])
    result = final_result(result_report, params, time.perf_counter() - start)
    if report is not None and main_rank:
        report.report_final_result(result)
    return result


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    from .pipeline import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--param", f"expects key=value, got {item!r}")
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
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir (same parameters) from its last finished epoch")
    group.add_argument("--overwrite", action="store_true",
                       help="start again in an --output-dir that is not empty (replaces only the files a run writes)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    from ._cli_guard import guarded, resume_command
    from ._heap import keep_freed_memory

    keep_freed_memory()  # this process's allocator: see nni_harp._heap

    def trial() -> int:
        import warnings

        import nni

        with warnings.catch_warnings():  # outside an experiment NNI warns on stderr; the defaults apply (see above)
            warnings.filterwarnings("ignore", message=".*Running trial code without runtime", category=RuntimeWarning)
            received = nni.get_next_parameter()
        params = resolve_params(received, _parse_overrides(args.param))
        logger.info("trial parameters: %s", params)
        result = run_trial(params, nni, args.output_dir, resume=args.resume, overwrite=args.overwrite)
        print(json.dumps(result, sort_keys=True))
        if args.json_out:
            from ._io import atomic_write_text

            atomic_write_text(args.json_out, json.dumps(result, indent=2, sort_keys=True))
        return 0

    # without --output-dir (and outside an experiment) a fresh folder is made each time: nothing to resume
    resume = resume_command("python -m nni_harp.trial", argv) if args.output_dir or os.environ.get("NNI_OUTPUT_DIR") else None
    return guarded(trial, prog="nni_harp.trial", resume=resume)


if __name__ == "__main__":
    raise SystemExit(main())
