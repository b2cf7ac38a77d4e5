r"""[P] Thm 5/6 for a whole post-norm Transformer block, matrix-free: the bound at ``L = 128, d = 64``.

The block of [P] eq. (4) (:func:`~lightning_hessian.formulas.ffn.block_forward`): ``U = X + F(θ_att)``,
``Y = LN(U)``, ``S = σ(Y W_1) W_2 + Y``, ``Z = LN(S)``, loss ``l = ||Z - Target||_F^2 / (L d)``,
``c = 2/(L d)``. [P] Thm 6 (docs/formulas.md §5), per pair of weights ``i, j`` in ``(Q, K, V, W1, W2)``:

.. math::

    \|H_{tr}^{(i,j)}\| \le \|J_Z\|\,\|\xi_{ij}\| + \|B_i\|\,\|H_Z\|\,\|B_j\|,\qquad
    \|H\|_2 \le M_{tr} = 5 \max_{i,j} \big(c \|\partial Z/\partial W_i\| \|\partial Z/\partial W_j\|
    + c \|Z - T\|_F\, b_{ij}\big),

with ``B_i = dS/dW_i``, ``ξ_ij = d vec_r(B_i) / d vec_r(W_j)^T`` (flat norm) and ``b_ij`` the right-hand side
of the first line. :func:`~lightning_hessian.formulas.ffn.block_loss_hessian_bound` evaluates it with dense
factors (memory ``O(L d (Σ n_i)^2)``: ``L = d = 4`` at most); here no matrix of the size of a Jacobian is
formed (memory ``O(iters Σ n_i + L d d_ff + L^2 d)``):

* ``||J_Z||``, ``||H_Z||`` and the first LayerNorm's: closed form, per row (:func:`.layernorm.jacobian_norm`,
  :func:`.flat_norms.layernorm_hessian_norm`); exact.
* ``||B_i||``, ``||dZ/dW_i||``, ``||dY/dθ_k||``, ``||G_k|| = ||dF/dθ_k||``: Lanczos on the Gram operator
  ``J^T J v`` from ``torch.func.jvp`` / ``vjp``; exact once converged (from below).
* ``ξ`` of the FFN pairs and the FFN stage's second derivatives ``d J_SY / dW_f``, ``d B_f / dY``
  (:mod:`.flat_norms`): flat norms as ``sqrt(λ_max)`` of their quadratic forms ``||ξ δ||_F^2``, written per
  row in closed form (``σ' = D``, ``σ''`` for GELU); exact.
* ``ξ`` of a pair with an attention weight: [P] Thm 5 one stage down, ``ξ = (J_SY ⊗ I) d^2Y + (I ⊗ J_{Y,k}^T)
  H_C J_{Y,l}`` through ``p = (Y, W_1, W_2) -> S``, bounded by the triangle inequality, and ``d^2 Y / dθ_k
  dθ_l`` once more through ``Y = LN(U)``: ``||J_LN|| ||Φ_kl|| + ||G_k|| ||H_LN|| ||G_l||``, with the
  attention second derivatives' flat norms ``||Φ_kl||`` exact (per row, Lanczos on their quadratic forms).
  Every factor is exact; these ``ξ`` are upper bounds (the chain's triangle inequalities), so the result is at
  least the dense value (equal on the FFN pairs) and still bounds ``||H||``.

Reference:
    E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians and
    Their Implications for Scaling Laws", arXiv:2510.16927, Thm 5-6 and the appendix lemmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import attention, ffn, layernorm
from .flat_norms import (
    attention_second_derivative_norms,
    ffn_stage_norms,
    gram_norm,
    layernorm_hessian_norm,
)

__all__ = ["BlockBound", "block_bound"]

_ATT, _FFN = ("Q", "K", "V"), ("W1", "W2")


@dataclass(frozen=True)
class BlockBound:
    """[P] Thm 6 for one sequence, with its factors.

    Attributes:
        bound: ``M_tr >= ||H||_2`` of the loss Hessian in all five weights.
        pairs: per ``(i, j)``, the bound ``b_ij`` on ``||H_tr^{(i,j)}||``.
        factors: ``J_Z``, ``H_Z``, ``B_<i>``, ``dZ_<i>``, ``xi_<i>_<j>``, ``resid`` (``||Z - T||_F``).
        exact_xi: pairs whose ``ξ`` norm is exact (the others are upper bounds).
    """

    bound: float
    pairs: dict[tuple[str, str], float]
    factors: dict[str, float]
    exact_xi: frozenset[tuple[str, str]] = field(default_factory=frozenset)


def block_bound(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    target: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
    iters: int = 100,
    seed: int = 0,
) -> BlockBound:
    """[P] Thm 6, ``M_tr >= ||H||_2`` for one sequence, matrix-free (module docstring).

    Args:
        X: Block input ``L x d``.
        W_Q, W_K: ``d x d_K``. W_V: ``d x d``. W_1: ``d x d_ff``. W_2: ``d_ff x d``.
        target: ``L x d``, the target of ``l = ||Z - Target||_F^2 / (L d)``.
        activation: ``"relu"`` or ``"gelu"``.
        eps: LayerNorm ``eps`` (both LayerNorms, no affine weights).
        tau: Attention temperature (default ``sqrt(d_K)``).
        iters: Lanczos steps per norm (stopped at a relative residual of 1e-10).
        seed: Seed of the Lanczos start vectors.

    Returns:
        A :class:`BlockBound`; memory ``O(iters Σ n_i + L d d_ff + L^2 d)``, nothing of size ``(L d)^2``.
    """
    if X.dim() != 2 or target.shape != X.shape:
        raise ValueError(
            f"X and target must both be L x d matrices, got {tuple(X.shape)}, {tuple(target.shape)}"
        )
    d, d_k, d_ff = X.shape[1], W_Q.shape[-1], W_1.shape[-1]
    expected = [(d, d_k), (d, d_k), (d, d), (d, d_ff), (d_ff, d)]
    got = [tuple(w.shape) for w in (W_Q, W_K, W_V, W_1, W_2)]
    if got != expected:
        raise ValueError(
            f"weights of shapes {got} do not fit X of width {d}: W_Q, W_K d x d_K, W_V d x d, W_1 d x d_ff, "
            "W_2 d_ff x d (the papers' orientation; an nn.Linear weight is its transpose)"
        )
    t = math.sqrt(W_Q.shape[-1]) if tau is None else float(tau)
    weights = {"Q": W_Q, "K": W_K, "V": W_V, "W1": W_1, "W2": W_2}
    fw = ffn.block_forward(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, t)

    def stage(name: str, out: str) -> Callable[[Tensor], Tensor]:
        def fn(w: Tensor) -> Tensor:
            args = {**weights, name: w}
            return ffn.block_forward(X, *(args[k] for k in ffn.BLOCK_NAMES), activation, eps, t)[out]

        return fn

    f: dict[str, float] = {
        "J_Z": layernorm.jacobian_norm(fw["S"], eps=eps),
        "H_Z": layernorm_hessian_norm(fw["S"], eps),
        "J_LN1": layernorm.jacobian_norm(fw["U"], eps=eps),
        "H_LN1": layernorm_hessian_norm(fw["U"], eps),
        "resid": float(torch.linalg.matrix_norm(fw["Z"] - target)),
    }
    stage_factors, xi = ffn_stage_norms(fw["Y"], W_1, W_2, activation, iters, seed)
    f.update(stage_factors)
    for i, name in enumerate(ffn.BLOCK_NAMES):
        if name != "W2":  # B_W2 = σ(U) ⊗ I: closed form above
            f[f"B_{name}"] = gram_norm(stage(name, "S"), weights[name], iters, seed + i)
        f[f"dZ_{name}"] = gram_norm(stage(name, "Z"), weights[name], iters, seed + i)
    g_norms = attention.jacobian_norms(X, W_Q, W_K, W_V, t, iters=iters, seed=seed)
    for name in _ATT:
        f[f"dY_{name}"] = gram_norm(stage(name, "Y"), weights[name], iters, seed)
        f[f"G_{name}"] = float(g_norms[name])
    phi = attention_second_derivative_norms(X, W_Q, W_K, W_V, t, iters, seed)
    for k in _ATT:
        for j in _ATT:
            d2y = f["J_LN1"] * phi[(k, j)] + f[f"G_{k}"] * f["H_LN1"] * f[f"G_{j}"]
            xi[(k, j)] = f["J_SY"] * d2y + f[f"dY_{k}"] * f["H_SY"] * f[f"dY_{j}"]
        for w in _FFN:
            xi[(k, w)] = f[f"dJSY_{w}"] * f[f"dY_{k}"]  # (I ⊗ J_{Y,k}^T) d vec(J_SY) / dW_f
            xi[(w, k)] = f[f"dB{w}_Y"] * f[f"dY_{k}"]  # d vec(B_f) / dY  J_{Y,k}
    pairs: dict[tuple[str, str], float] = {}
    for (i, j), value in xi.items():
        f[f"xi_{i}_{j}"] = value
        pairs[(i, j)] = f["J_Z"] * value + f[f"B_{i}"] * f["H_Z"] * f[f"B_{j}"]
    c = 2.0 / X.numel()
    bound = 5 * max(c * f[f"dZ_{i}"] * f[f"dZ_{j}"] + c * f["resid"] * b for (i, j), b in pairs.items())
    exact = frozenset((i, j) for i in _FFN for j in _FFN)
    return BlockBound(bound=bound, pairs=pairs, factors=f, exact_xi=exact)
