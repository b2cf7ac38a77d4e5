"""Names of the scalars a curvature pass produces, shared by the callback, the dashboards and the alerts.

Block statistics are ``curvature/<block name>/<statistic>`` (the first path segment groups TensorBoard's
sections; the whole model is the block ``model``). The papers' theory evaluated on the model's attention
layers (:mod:`lightning_hessian.theory`) is ``theory/<block or layer>/<statistic>``, statistics in
:data:`THEORY_STATS`. Everything else has a fixed tag below.
"""

from __future__ import annotations

__all__ = [
    "ALERT_COUNT",
    "BLOCK_STATS",
    "CRITICAL_RATIO",
    "CRITICAL_SHARPNESS",
    "GRADIENT_ALIGNMENT",
    "HETEROGENEITY",
    "LEARNING_RATE",
    "MONITOR_OVERHEAD",
    "MONITOR_ROTATION",
    "MONITOR_SECONDS",
    "PASS_LOSS",
    "PASS_MATVECS",
    "PASS_SECONDS",
    "PRECONDITIONED_GRADIENT_CURVATURE",
    "PRECONDITIONED_GRADIENT_RATIO",
    "PRECONDITIONED_RATIO",
    "PRECONDITIONED_SHARPNESS",
    "PRECONDITIONED_THRESHOLD",
    "SHARPNESS",
    "SHARPNESS_RATIO",
    "STABILIZATION_CRITERION",
    "STABILIZATION_REFERENCE",
    "STABILIZATION_SAMPLES",
    "STABILIZATION_VALUE_VARIANCE",
    "STABILIZATION_VARIANCE",
    "THEORY_STATS",
    "THRESHOLD",
    "UPDATE_ALIGNMENT",
    "UPDATE_CURVATURE",
    "block_tag",
    "parse_block_tag",
    "theory_tag",
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
    "top_share",  # |v_b|^2: the block's share of the whole model's top eigenvector v (whole-model tier)
    "top_rayleigh",  # v_b' H_bb v_b / |v_b|^2: the block's own curvature along its piece of v
    "trace_stderr",  # standard error of the trace estimate
)

THEORY = "theory"

#: Theory statistics: per query/key/value block, per attention layer (``input_norm``, ``qk_over_v``) and per
#: head (``<layer>/head_<h>/jacobian_q`` ...). See :mod:`lightning_hessian.theory`.
THEORY_STATS = (
    # the primary theory-vs-measured number: measured λ_max / gauss_newton
    "gauss_newton_ratio",
    # c λ_max(mean_s J_s^T J_s), c = 2/(L d): exact single-layer Gauss-Newton norm, every sequence
    "gauss_newton",
    "jacobian_norm",  # max over heads of ||G||_2, the block's Jacobian of the layer output ([O] Thm 3.1)
    "outer_bound",  # corrected [P] Thm 1 bound on the block's outer (Gauss-Newton) part, single-layer MSE
    "outer_ratio",  # measured λ_max / outer_bound: a normaliser, not bounded outside the papers' setting
    "bound",  # corrected [P] Thm 1 bound on the whole block (needs the target)
    "bound_ratio",  # measured ||H_bb|| / bound, only where proven (<= 1, else the bound_violation alert)
    "input_norm",  # mean ||X||_2 of the layer's input: the input scale of [O]'s growth laws
    "qk_over_v",  # max(||G_Q||, ||G_K||) / ||G_V||: [O]'s query/key versus value sensitivity
    "jacobian_q",
    "jacobian_k",
    "jacobian_v",
    "gauss_newton_q",  # per head: c λ_max(mean_s J_s^T J_s) of the head's query (key, value) weights
    "gauss_newton_k",
    "gauss_newton_v",
    # [P] Thm 6 on a whole post-norm layer (lightning_hessian.block_theory): theory/<layer>/<stat>, and the
    # proven ratio as theory/<layer>/block/bound_ratio
    "block_bound",  # M_tr, mean over sequences
    "block_measured",  # the layer's measured ||H|| (whole model = layer) or its largest block's
    "block_ratio",  # block_measured / block_bound where not proven (a normaliser)
)

SHARPNESS = "stability/sharpness"  # the whole model's λ_max
LEARNING_RATE = "stability/lr"
THRESHOLD = "stability/threshold"  # 2 / lr (Cohen et al., ICLR 2021)
SHARPNESS_RATIO = "stability/sharpness_ratio"  # λ_max / (2 / lr); > 1 means unstable for gradient descent
PRECONDITIONED_SHARPNESS = "stability/preconditioned_sharpness"  # λ_max(P^-1 H), Adam's preconditioner P
PRECONDITIONED_THRESHOLD = "stability/preconditioned_threshold"  # (2 + 2 β1) / ((1 - β1) lr)
PRECONDITIONED_RATIO = "stability/preconditioned_ratio"
HETEROGENEITY = "heterogeneity/js_distance"  # mean pairwise Jensen-Shannon distance of block densities
# Cheap tier: directions the optimiser actually takes, from a few forwards (lightning_hessian.directional).
UPDATE_CURVATURE = "stability/update_curvature"  # u'Hu / |u|^2 along the update u just taken
# 2 / η_c, η_c the largest step along the update that does not raise the loss (Kalra et al., arXiv:2601.16979)
CRITICAL_SHARPNESS = "stability/critical_sharpness"
CRITICAL_RATIO = "stability/critical_ratio"  # critical sharpness / (2 / lr) = lr / η_c; > 1: step overshoots
# (P^-1 g)'H(P^-1 g) / (g' P^-1 g): the curvature of P^-1/2 H P^-1/2 along the preconditioned gradient, and
# its ratio to 2 / lr (Bai et al., arXiv:2506.04805: crosses 1 when a loss spike happens)
PRECONDITIONED_GRADIENT_CURVATURE = "stability/preconditioned_gradient_curvature"
PRECONDITIONED_GRADIENT_RATIO = "stability/preconditioned_gradient_ratio"
# Whole-model tier: what the top eigenvector says for free.
GRADIENT_ALIGNMENT = "stability/gradient_alignment"  # |P_top g| / |g|: the gradient's share in the top space
UPDATE_ALIGNMENT = "stability/update_alignment"  # |P_top u| / |u| for the update u just taken
# The monitor's own cost (lightning_hessian.planner).
MONITOR_OVERHEAD = "monitor/overhead"  # monitor seconds / training seconds so far
MONITOR_SECONDS = "monitor/seconds"  # the monitor's seconds so far
MONITOR_ROTATION = "monitor/rotation_steps"  # optimizer steps one rotation over every block takes
PASS_SECONDS = "curvature_pass/seconds"
PASS_MATVECS = "curvature_pass/matvecs"
PASS_LOSS = "curvature_pass/loss"  # the loss on the curvature batches
ALERT_COUNT = "alerts/count"
# Live landscape stabilisation ([KG] arXiv:2604.14870, lightning_hessian.stabilization), against samples seen.
STABILIZATION_CRITERION = "stabilization/criterion"  # S_D / (k (k+1)): the expected Δ_2^(D)(k)
STABILIZATION_REFERENCE = "stabilization/reference"  # first S_D / (k (k+1)): the O(k^-2) line
STABILIZATION_VARIANCE = "stabilization/variance"  # S_D = E_z Var_i l_i(w + Uz), top-D probes
STABILIZATION_VALUE_VARIANCE = "stabilization/value_variance"  # S_0 = Var_i l_i(w): the probe-free part
STABILIZATION_SAMPLES = "stabilization/samples_seen"  # k: training samples seen so far


def block_tag(block: str, stat: str) -> str:
    """``curvature/<block>/<stat>``."""
    return f"{CURVATURE}/{block}/{stat}"


def theory_tag(name: str, stat: str) -> str:
    """``theory/<block or layer>/<stat>``."""
    return f"{THEORY}/{name}/{stat}"


def parse_block_tag(tag: str) -> tuple[str, str] | None:
    """``(block, stat)`` of a block tag, ``None`` for any other tag."""
    head, _, rest = tag.partition("/")
    block, _, stat = rest.rpartition("/")
    if head != CURVATURE or not block or not stat:
        return None
    return block, stat
