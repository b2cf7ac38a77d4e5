"""Analytic Hessians, Jacobians, norm bounds and stability thresholds from the papers.

Every formula is verified against autograd in ``tests/test_formulas*.py``.

Pure functions of tensors (no models). Submodules:

* :mod:`.attention` — self-attention Jacobians and Hessian blocks ([O] Thm 3.1-3.2), matrix-free products and
  norms, and the [P] Thm 1 bounds (printed and corrected).
* :mod:`.layernorm` — LayerNorm Jacobian, second derivative, norms and bounds ([P] Thm 2-3 and lemma),
  ``γ``/``β`` Hessian.
* :mod:`.ffn` — FFN and whole post-norm block Jacobians and Hessians ([P] Thm 4-5), the Thm 6 bound.
* :mod:`.block_bound` — [P] Thm 6 for a whole post-norm block, matrix-free (``L = 128, d = 64``).
* :mod:`.flat_norms` — exact flat norms of the block's second derivatives (LayerNorm, FFN stage, attention).
* :mod:`.gauss_newton` — the exact Gauss-Newton norm ``c λ_max(mean_s J_s^T J_s)`` of a multi-head layer's
  mean-squared error over many sequences (the theory's normaliser).
* :mod:`.convergence` — [P] Thm 7 and the loss-difference identity.
* :mod:`.stabilization` — [KG] curvature-aligned stabilisation criterion: closed form, Monte Carlo.
* :mod:`.stability` — ``2/η``, Adam's ``(2 + 2β_1)/((1 - β_1) η)`` and preconditioner, block heterogeneity.

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, arXiv:2410.10986 (ICLR 2025).
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, arXiv:2510.16927.
    [K] N. Kiselev, A. Grabovoy, arXiv:2409.11995.
    [KG] N. Kiselev, A. Grabovoy, arXiv:2604.14870.
"""

from . import (
    attention,
    block_bound,
    convergence,
    ffn,
    flat_norms,
    gauss_newton,
    layernorm,
    stability,
    stabilization,
)
from ._linalg import HessianBlock

__all__ = [
    "HessianBlock",
    "attention",
    "block_bound",
    "convergence",
    "ffn",
    "flat_norms",
    "gauss_newton",
    "layernorm",
    "stability",
    "stabilization",
]
