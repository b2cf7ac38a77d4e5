"""Names of the scalars a curvature pass produces, shared by the callback, the dashboards and the alerts.

Block statistics are ``curvature/<block name>/<statistic>`` (the first path segment groups TensorBoard's
sections; the whole model is the block ``model``). Everything else has a fixed tag below.
"""

from __future__ import annotations

__all__ = [
    "ALERT_COUNT",
    "BLOCK_STATS",
    "HETEROGENEITY",
    "LEARNING_RATE",
    "PASS_LOSS",
    "PASS_MATVECS",
    "PASS_SECONDS",
    "PRECONDITIONED_RATIO",
    "PRECONDITIONED_SHARPNESS",
    "PRECONDITIONED_THRESHOLD",
    "SHARPNESS",
    "SHARPNESS_RATIO",
    "THRESHOLD",
    "block_tag",
    "parse_block_tag",
]

CURVATURE = "curvature"

#: Statistics of one block (``top_eigenvalue_<i>`` for the i-th largest, i >= 2, when ``top_k > 1``).
BLOCK_STATS = (
    "top_eigenvalue",
    "min_eigenvalue",
    "negative_ratio",  # max(0, -λ_min) / λ_max: how much negative curvature, relative to the top
    "trace",
    "gauss_newton_top",
    "functional_top",
    "functional_min",
    "preconditioned_top",  # λ_max(P^-1 H) with an optimiser's diagonal preconditioner P (whole model)
)

SHARPNESS = "stability/sharpness"  # the whole model's λ_max
LEARNING_RATE = "stability/lr"
THRESHOLD = "stability/threshold"  # 2 / lr (Cohen et al., ICLR 2021)
SHARPNESS_RATIO = "stability/sharpness_ratio"  # λ_max / (2 / lr); > 1 means unstable for gradient descent
PRECONDITIONED_SHARPNESS = "stability/preconditioned_sharpness"  # λ_max(P^-1 H), Adam's preconditioner P
PRECONDITIONED_THRESHOLD = "stability/preconditioned_threshold"  # (2 + 2 β1) / ((1 - β1) lr)
PRECONDITIONED_RATIO = "stability/preconditioned_ratio"
HETEROGENEITY = "heterogeneity/js_distance"  # mean pairwise Jensen-Shannon distance of block densities
PASS_SECONDS = "curvature_pass/seconds"
PASS_MATVECS = "curvature_pass/matvecs"
PASS_LOSS = "curvature_pass/loss"  # the loss on the curvature batches
ALERT_COUNT = "alerts/count"


def block_tag(block: str, stat: str) -> str:
    """``curvature/<block>/<stat>``."""
    return f"{CURVATURE}/{block}/{stat}"


def parse_block_tag(tag: str) -> tuple[str, str] | None:
    """``(block, stat)`` of a block tag, ``None`` for any other tag."""
    head, _, rest = tag.partition("/")
    block, _, stat = rest.rpartition("/")
    if head != CURVATURE or not block or not stat:
        return None
    return block, stat
