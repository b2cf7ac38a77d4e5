"""Why a curvature pass stops: errors a caller may want to catch, each saying what to do."""

from __future__ import annotations

__all__ = ["REENTRANT_MESSAGE", "NonFiniteLossError", "PassFailedElsewhere", "ReentrantCheckpointError"]

REENTRANT_MESSAGE = (
    "The model uses activation checkpointing with torch.utils.checkpoint.checkpoint(..., "
    "use_reentrant=True), which has no double backward: a Hessian cannot be computed through it (and "
    "parameters inside it can silently drop out of the graph). Pass use_reentrant=False to checkpoint "
    "(Hugging Face models: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    '{"use_reentrant": False})); the results are the same.'
)


class NonFiniteLossError(ValueError):
    """The loss on a curvature batch is NaN or infinite, so its curvature is undefined."""


class PassFailedElsewhere(RuntimeError):
    """With data split over processes: the pass failed on another process, so it is abandoned here too."""


class ReentrantCheckpointError(RuntimeError):
    """The model runs ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` during a pass."""
