"""The end-to-end HARP pipeline: ``run(PipelineConfig) -> Report``; the command line wraps it.

    from nni_harp.pipeline import PipelineConfig, run
    report = run(PipelineConfig(model="resnet18", mode="structured", flops_target=0.3))
    print(report.table())

Stages: adversarial pretraining (unless ``checkpoint``), dense evaluation, HARP pruning,
adversarial fine-tuning with fixed masks, speedup (structured), ONNX export, pruned evaluation.
Everything lands in ``config.output_dir``: ``model.pt`` + ``model_meta.json`` (+ ``plan.json``)
for :func:`nni_harp.load_pruned`, ``model.onnx``, ``report.json``/``report.md``, the plots and
``checkpoints/`` (per-epoch checkpoints for ``resume=True``).

Layout: :mod:`.runner` runs the stages top to bottom; :mod:`.stages` holds one module per stage,
each a function over the shared :class:`~.context.Context` whose body runs inside
:func:`~.context.stage` (timing, callbacks, the progress record, reuse on resume); the helpers they
share are :mod:`.training`, :mod:`.measure`, :mod:`.artefacts` and :mod:`.export`.

``config.pruner`` picks the pruner from :mod:`nni_harp.registry` (HARP by default; HYDRA and
NNI's own pruners go through the same stages). Under ``torchrun --nproc_per_node=N`` the run
starts (and at the end destroys) a process group from torchrun's environment: nccl on GPUs, gloo
on the CPU. ``config.batch_size`` is then the global batch, split over the ranks; rank 0 alone
evaluates, writes files and calls the callbacks, and every rank returns the report.
"""
from __future__ import annotations

from .artefacts import PLOT_HISTORY, PLOT_RATES
from .callbacks import PipelineCallback
from .checkpoint import CheckpointWriteError, ResumeError, RunInterrupted
from .config import ConfigError, EvaluateConfig, PipelineConfig
from .report import ModelMetrics, Report
from .runner import evaluate, run

__all__ = [
    "run",
    "evaluate",
    "PipelineConfig",
    "EvaluateConfig",
    "ConfigError",
    "ResumeError",
    "CheckpointWriteError",
    "RunInterrupted",
    "PipelineCallback",
    "Report",
    "ModelMetrics",
    "PLOT_RATES",
    "PLOT_HISTORY",
]
