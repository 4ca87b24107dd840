"""Errors raised by the graph passes; each carries the node or module it is about."""
from __future__ import annotations

__all__ = ["GraphPassError", "TraceError", "MissingAnalysisError", "SpeedupError", "PlanError"]


class GraphPassError(RuntimeError):
    """Base class of every error raised by graph_passes."""


class TraceError(GraphPassError):
    """The model could not be traced by torch.fx; the message names what broke tracing."""

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class MissingAnalysisError(GraphPassError):
    """A pass read node metadata that the producing pass has not written."""


class SpeedupError(GraphPassError):
    """Physical channel removal failed; the message names the node or module."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class PlanError(GraphPassError):
    """A saved pruning plan does not fit the model it is applied to."""
