"""The stages of a prune run, one module each, as functions over the run's shared
:class:`~nni_harp.pipeline.context.Context`, in the order :func:`nni_harp.pipeline.run` calls them:

- :mod:`.pretrain`: adversarial pretraining, or the weights of ``--checkpoint``;
- :mod:`.evaluate`: ``evaluate-dense`` (and, at the end, ``evaluate-pruned``);
- :mod:`.prune`: the pruner of ``config.pruner`` learns or computes the masks
  (:class:`~nni_harp.pruning.HARPPruner` by default);
- :mod:`.finetune`: adversarial fine-tuning with the masks fixed;
- :mod:`.speedup`: the masked channels removed (structured only);
- :mod:`.export`: ONNX export.

Each stage's body runs inside :func:`~nni_harp.pipeline.context.stage`, which times it, tells the
callbacks and records it in the :class:`~nni_harp.pipeline.checkpoint.RunStore`'s progress
record; training stages checkpoint every epoch there. A stage marked finished is skipped on
``--resume`` and its saved result reused.

The helpers the stages share live beside them: :mod:`..context` (context, model, the stage
wrapper), :mod:`..training` (optimizers, adversarial loss, per-epoch validation),
:mod:`..measure` (evaluation) and :mod:`..artefacts` (run-folder file names, reading weights);
they are re-exported here under the names this module always had.
"""
from __future__ import annotations

from ..artefacts import DENSE_MODEL_FILE, ONNX_FILE, read_source_weights
from ..context import Context, StageRun, make_context, new_model, stage
from ..measure import eval_attack, eval_loader, measure_model
from ..training import adversarial_loss, cosine, epoch_evaluator, make_training_step, sgd
from .evaluate import dense_onnx, stage_evaluate
from .export import stage_export
from .finetune import stage_finetune
from .pretrain import stage_pretrain
from .prune import stage_prune
from .speedup import model_meta, stage_speedup

__all__ = [
    "STAGES",
    "Context",
    "StageRun",
    "stage",
    "make_context",
    "new_model",
    "adversarial_loss",
    "make_training_step",
    "sgd",
    "cosine",
    "eval_attack",
    "eval_loader",
    "epoch_evaluator",
    "measure_model",
    "read_source_weights",
    "model_meta",
    "dense_onnx",
    "DENSE_MODEL_FILE",
    "ONNX_FILE",
    "stage_pretrain",
    "stage_evaluate",
    "stage_prune",
    "stage_finetune",
    "stage_speedup",
    "stage_export",
]

STAGES = ("pretrain", "evaluate-dense", "prune", "finetune", "speedup", "export", "evaluate-pruned")
