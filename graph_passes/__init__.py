"""graph_passes: torch.fx passes that find coupled channels in any traced model, count its cost
as a function of the kept channels, and physically remove channels. No NNI dependency."""
from __future__ import annotations

from .cost_model import CostModel, Factor, LayerCost, TensorCost
from .dependency import Analysis, Traceable, analysis_for, analysis_of, analyze, channel_groups
from .errors import GraphPassError, MissingAnalysisError, PlanError, SpeedupError, TraceError
from .groups import ChannelGroup, Member, channel_norms, grid_step, group_masks, keep_from_masks, random_keep
from .tracing import HarpTracer, register_leaf_function, register_leaf_type, trace, trace_once

__all__ = [
    "Analysis", "ChannelGroup", "CostModel", "Factor", "GraphPassError", "HarpTracer", "LayerCost", "Member", "TensorCost",
    "MissingAnalysisError", "PlanError", "SpeedupError", "TraceError", "Traceable", "analysis_for", "analysis_of", "analyze",
    "channel_groups", "channel_norms", "grid_step", "group_masks", "keep_from_masks", "random_keep", "register_leaf_function",
    "register_leaf_type", "trace", "trace_once",
]

from ._masks import masked_copy  # noqa: E402
from .model_speedup import ModelSpeedup, SpeedupWarning  # noqa: E402
from .modules import ChannelsFirstNorm, ExactStatsNorm, KeptStatsNorm, exact_stats_norm, kept_stats_norm  # noqa: E402
from .kept_norms import kept_stats_norms, plain_norm  # noqa: E402  (registers KeptStatsNorm, ChannelsFirstNorm)
from .speedup import apply_keep  # noqa: E402

__all__ += ["ChannelsFirstNorm", "ExactStatsNorm", "KeptStatsNorm", "ModelSpeedup", "SpeedupWarning", "apply_keep",
            "exact_stats_norm", "kept_stats_norm", "kept_stats_norms", "masked_copy", "plain_norm"]
from .cost import cost, count_flops, flop_counter  # noqa: E402

__all__ += ["cost", "count_flops", "flop_counter"]
from .plan import PruningPlan  # noqa: E402

__all__ += ["PruningPlan"]
from .onnx_export import OnnxExportError, export_onnx, onnx_runner, run_onnx  # noqa: E402

__all__ += ["OnnxExportError", "export_onnx", "onnx_runner", "run_onnx"]
from .nni_config import auto_set_denpendency_group_ids, auto_set_dependency_group_ids  # noqa: E402

__all__ += ["auto_set_denpendency_group_ids", "auto_set_dependency_group_ids"]
from .latency import BACKENDS as LATENCY_BACKENDS  # noqa: E402
from .latency import LatencyError, LatencyModel, fit_latency, refine_latency  # noqa: E402

__all__ += ["LATENCY_BACKENDS", "LatencyError", "LatencyModel", "fit_latency", "refine_latency"]
