r"""LayerNorm: Jacobian, second derivative, their norms and bounds, and the ``γ``/``β`` Hessian blocks.

Row-wise over ``X`` (``L x d``): ``m_i = x_i - mean(x_i)``, ``σ_i = sqrt(||m_i||^2 / d + eps)`` (divisor
``d``, as in ``torch.nn.LayerNorm``), ``y_i = m_i / σ_i`` and ``LN(X)_i = γ ⊙ y_i + β``. In [P]'s notation
(eps = 0, no affine): ``M = X - X 1 1^T / d``, ``P = diag(1/σ)``, ``LN(X) = P M``.

Closed forms (docs/formulas.md §4, verified against autograd), with ``Q_i = I - 1 1^T/d - y_i y_i^T/d``:

* Jacobian per row: ``J_i = diag(γ) Q_i / σ_i``; rows do not interact, so the full Jacobian is
  ``blockdiag_i(J_i)`` and, without ``γ``, ``||J||_2 = max_i 1/σ_i`` (for ``d >= 3``).
* Second derivative per row, for directions ``a, b``:
  ``d^2 y / dx^2 [a, b] = -(1/(d σ^2)) [ (y^T a) Q b + (y^T b) Q a + y (a^T Q b) ]`` (times ``diag(γ)``).

Both hold with ``eps > 0`` as written (``||y_i||^2 = d var_i / (var_i + eps)`` is then below ``d``).

Norm conventions for the second derivative (``n = L d``): the *flat* norm is the spectral norm of the
``n^2 x n`` matrix ``d vec_r(J) / d vec_r(X)^T``, which is the matrix that enters [P] Thm 5
(``(I ⊗ B_i^T) H_Z B_j``) and Thm 6; the *bilinear* norm is ``sup_{||a||=||b||=1} ||H[a, b]||``. The bilinear
norm is at most the flat norm.

References:
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians
        and Their Implications for Scaling Laws", arXiv:2510.16927: Thm 2 (Jacobian of LayerNorm), Thm 3
        (Hessian of LayerNorm), and the appendix lemma "LayerNorm derivative and Hessian norm estimation".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._linalg import diag_embedding_jacobian, eye, kron, spectral_norm

__all__ = [
    "hessian",
    "hessian_norm",
    "hessian_norm_bound",
    "jacobian",
    "jacobian_norm",
    "jacobian_norm_bound",
    "layernorm",
    "param_hessian",
]


def _stats(X: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Centred rows ``M``, standard deviations ``σ`` (``(..., L, 1)``) and normalised rows ``Y = M / σ``."""
    m = X - X.mean(-1, keepdim=True)
    sigma = torch.sqrt((m * m).mean(-1, keepdim=True) + eps)
    return m, sigma, m / sigma


def _q_matrices(y: Tensor) -> Tensor:
    """``Q_i = I - 1 1^T/d - y_i y_i^T/d`` for every row (``(..., L, d, d)``)."""
    d = y.shape[-1]
    proj = eye(d, y) - torch.full((d, d), 1.0 / d, dtype=y.dtype, device=y.device)
    return proj - y.unsqueeze(-1) * y.unsqueeze(-2) / d


def _gamma_max(gamma: Tensor | None) -> Tensor | float:
    return 1.0 if gamma is None else gamma.abs().max()


def layernorm(X: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """``LN(X) = γ ⊙ (X - mean) / sqrt(var + eps) + β`` row-wise (as ``torch.nn.functional.layer_norm``)."""
    out = _stats(X, eps)[2]
    if gamma is not None:
        out = out * gamma
    if beta is not None:
        out = out + beta
    return out


def _block_diag_rows(blocks: Tensor) -> Tensor:
    return torch.block_diag(*blocks)


def jacobian(
    X: Tensor, gamma: Tensor | None = None, eps: float = 0.0, dense: bool = False, variant: str = "corrected"
) -> Tensor:
    """Jacobian of LayerNorm, per row or dense.

    ``variant="corrected"``: the closed form ``J_i = diag(γ) (I - 1 1^T/d - y_i y_i^T/d) / σ_i`` (eps and
    ``γ`` supported). ``variant="paper"``: [P] Thm 2 as printed (no eps, no affine), built literally:
    ``(P ⊗ I_d)(I_{Ld} - (1/d) I_L ⊗ 1 1^T) + (I_L ⊗ M^T) dP/dX`` with
    ``dP/dX = d^{-1/2} (-D^{-1} ⊗ D^{-1}) [e_1 ⊗ e_1, ..., e_L ⊗ e_L] diag^{-1}(sqrt(M^{∘2} 1)) (I_L ⊗ 1^T)
    diag(vec_r M) dM/dX`` and ``D = diag(σ)``. Both agree (the paper's Theorem 2 is correct); the paper form
    is always dense.

    Args:
        X: Input ``L x d`` (per-row form also accepts leading batch dimensions).
        gamma: Optional affine scale ``(d,)``.
        eps: The ``eps`` added to the variance.
        dense: Return the ``Ld x Ld`` matrix ``d vec_r(LN(X)) / d vec_r(X)^T`` instead of ``(L, d, d)``.
        variant: ``"corrected"`` (closed form) or ``"paper"`` (printed Kronecker form).

    Returns:
        ``(..., L, d, d)`` with ``[i, k, a] = d LN(X)_{ik} / d X_{ia}``, or the dense ``Ld x Ld`` matrix.
    """
    if variant == "paper":
        if gamma is not None or eps != 0.0:
            raise ValueError("the printed form of [P] Thm 2 has no eps and no affine weights")
        return _jacobian_paper(X)
    if variant != "corrected":
        raise ValueError(f"variant must be 'corrected' or 'paper', got {variant!r}")
    _, sigma, y = _stats(X, eps)
    jac = _q_matrices(y) / sigma.unsqueeze(-1)
    if gamma is not None:
        jac = gamma.unsqueeze(-1) * jac
    return _block_diag_rows(jac) if dense else jac


def _jacobian_paper(X: Tensor) -> Tensor:
    n, d = X.shape
    i_l = eye(n, X)
    ones_d = torch.ones(d, d, dtype=X.dtype, device=X.device)
    m, sigma, _ = _stats(X, 0.0)
    sigma = sigma.reshape(-1)
    d_m = eye(n * d, X) - kron(i_l, ones_d) / d  # dM/dX
    p = torch.diag(1 / sigma)
    d_inv = torch.diag(1 / sigma)
    row_norms = torch.sqrt((m * m).sum(-1))
    d_p = (
        -kron(d_inv, d_inv)
        @ diag_embedding_jacobian(n, X)
        @ torch.diag(1 / row_norms)
        @ kron(i_l, torch.ones(1, d, dtype=X.dtype, device=X.device))
        @ torch.diag(m.reshape(-1))
        @ d_m
        / math.sqrt(d)
    )
    return kron(p, eye(d, X)) @ d_m + kron(i_l, m.T) @ d_p


def hessian(X: Tensor, gamma: Tensor | None = None, eps: float = 0.0, dense: bool = False) -> Tensor:
    """Second derivative of LayerNorm.

    Per row (``[P]`` Thm 3 in closed form; docs/formulas.md §4):
    ``H_i[k, a, b] = d^2 LN_{ik} / dX_{ia} dX_{ib} = -(γ_k / (d σ_i^2)) (y_a Q_kb + y_b Q_ka + y_k Q_ab)``.
    Rows do not interact. [P]'s printed Theorem 3 composes ``∂(P ⊗ I)/∂X`` etc. with factors whose sizes do
    not match (e.g. ``I_L`` where ``I_{d}`` is needed) and is not evaluated here.

    Args:
        X: Input ``L x d`` (per-row form accepts leading batch dimensions).
        gamma: Optional affine scale ``(d,)``.
        eps: The ``eps`` added to the variance.
        dense: Return the flattened ``(Ld)^2 x Ld`` matrix ``d vec_r(J) / d vec_r(X)^T`` (memory ``(Ld)^3``).

    Returns:
        ``(..., L, d, d, d)`` indexed ``[i, k, a, b]``, or the dense ``(Ld)^2 x Ld`` matrix.
    """
    _, sigma, y = _stats(X, eps)
    d = X.shape[-1]
    q = _q_matrices(y)
    h = y.unsqueeze(-2).unsqueeze(-1) * q.unsqueeze(-2)  # [k, a, b] = y_a Q_kb
    h = h + h.transpose(-1, -2)  # + y_b Q_ka
    h = h + y.unsqueeze(-1).unsqueeze(-1) * q.unsqueeze(-3)  # + y_k Q_ab
    h = -h / (d * sigma.unsqueeze(-1).unsqueeze(-1) ** 2)
    if gamma is not None:
        h = gamma.reshape(-1, 1, 1) * h
    if not dense:
        return h
    n = X.shape[0]
    full = X.new_zeros(n, d, n, d, n, d)
    idx = torch.arange(n, device=X.device)
    full[idx, :, idx, :, idx, :] = h
    return full.reshape((n * d) ** 2, n * d)


def jacobian_norm(X: Tensor, gamma: Tensor | None = None, eps: float = 0.0) -> float:
    """Exact ``||d LN(X) / dX||_2 = max_i ||J_i||_2`` (per-row SVDs).

    Without ``γ`` and for ``d >= 3`` this equals ``max_i 1/σ_i``.
    """
    return float(spectral_norm(jacobian(X, gamma, eps)).max())


def hessian_norm(X: Tensor, gamma: Tensor | None = None, eps: float = 0.0, chunk: int = 64) -> float:
    """Exact flat norm ``||d vec_r(J) / d vec_r(X)^T||_2 = max_i ||H_i||_2`` (``H_i`` as ``d^2 x d``).

    Rows are processed ``chunk`` at a time (memory ``chunk * d^3``).
    """
    best = 0.0
    d = X.shape[-1]
    rows = X.reshape(-1, d)
    for start in range(0, rows.shape[0], chunk):
        h = hessian(rows[start : start + chunk], gamma, eps)
        best = max(best, float(spectral_norm(h.reshape(h.shape[0], d * d, d)).max()))
    return best


def jacobian_norm_bound(
    X: Tensor, gamma: Tensor | None = None, eps: float = 0.0, variant: str = "corrected"
) -> float:
    """Upper bound on ``||J_LN||_2``.

    ``variant="corrected"``: ``max|γ| / σ_min`` (each ``Q_i`` has norm at most 1; equality for ``d >= 3``).
    ``variant="paper"``: [P]'s appendix lemma, ``1/σ_min + ||X||_2^2 / (sqrt(d) σ_min^3)``, times ``max|γ|``
    (valid but about 10x loose; the first term alone is already the exact norm). ``σ_min`` is the smallest row
    standard deviation (the lemma's statement says ``min_i ||M_i||`` but its proof uses ``||D^{-1}|| =
    1/σ_min`` with ``D = diag(σ)``; we follow the proof).
    """
    _, sigma, _ = _stats(X, eps)
    s_min = sigma.min()
    g = _gamma_max(gamma)
    if variant == "corrected":
        return float(g / s_min)
    if variant == "paper":
        x = spectral_norm(X)
        return float(g * (1 / s_min + x**2 / (math.sqrt(X.shape[-1]) * s_min**3)))
    raise ValueError(f"variant must be 'corrected' or 'paper', got {variant!r}")


def hessian_norm_bound(
    X: Tensor,
    gamma: Tensor | None = None,
    eps: float = 0.0,
    variant: str = "corrected",
    kind: str = "flat",
) -> float:
    """Upper bound on the norm of the LayerNorm second derivative.

    ``variant="corrected"``, with ``ρ_i = ||y_i|| <= sqrt(d)`` and
    ``||Q_i||_F = sqrt(d - 2 + (1 - ρ_i^2/d)^2)``:

    * ``kind="bilinear"``: ``max_i max|γ| 3 ρ_i / (d σ_i^2) <= 3 max|γ| / (sqrt(d) σ_min^2)`` (each of the
      three terms is at most ``||y|| ||Q||_2 <= ρ`` for unit directions), docs/formulas.md §4;
    * ``kind="flat"``: ``max_i max|γ| ρ_i (2 + ||Q_i||_F) / (d σ_i^2)`` (~ ``1/σ^2`` for large ``d``): the
      flat norm takes the Frobenius norm over one input direction, which turns one ``||Q||_2`` into
      ``||Q||_F``.
      ``3/(sqrt(d) σ^2)`` is *not* a bound on the flat norm for ``d > 9``.

    ``variant="paper"`` ([P]'s appendix lemma, for the flat norm, ``γ`` factored out, ``m = L``, ``n = d``):
    ``||X|| (1 + sqrt(m/n)) / σ_min^3 + ||X||^2 / (sqrt(n) σ_min^3) + 3 ||X||^3 / (n σ_min^5)`` with ``X`` the
    (uncentred) input; valid here but far from tight, and not scale-consistent (the true norm scales as
    ``1/σ^2``). ``kind`` is ignored for the paper variant.
    """
    _, sigma, y = _stats(X, eps)
    g = _gamma_max(gamma)
    d = X.shape[-1]
    sigma = sigma.squeeze(-1)
    if variant == "paper":
        s_min = sigma.min()
        x = spectral_norm(X)
        n_rows = X.shape[-2]
        val = (
            x * (1 + math.sqrt(n_rows / d)) / s_min**3
            + x**2 / (math.sqrt(d) * s_min**3)
            + 3 * x**3 / (d * s_min**5)
        )
        return float(g * val)
    if variant != "corrected":
        raise ValueError(f"variant must be 'corrected' or 'paper', got {variant!r}")
    rho = y.norm(dim=-1)
    if kind == "bilinear":
        return float(g * (3 * rho / (d * sigma**2)).max())
    if kind == "flat":
        q_fro = torch.sqrt(max(d - 2, 0) + (1 - rho**2 / d) ** 2)
        return float(g * (rho * (2 + q_fro) / (d * sigma**2)).max())
    raise ValueError(f"kind must be 'flat' or 'bilinear', got {kind!r}")


def param_hessian(X: Tensor, eps: float = 0.0, c: float | None = None) -> dict[tuple[str, str], Tensor]:
    """Hessian of ``l = (c/2) ||γ ⊙ Y + β - Target||_F^2`` in the affine weights of a final LayerNorm.

    The output is linear in ``(γ, β)``, so there is no functional part and the target drops out
    (derived here, not in [O] or [P]; docs/formulas.md §4): ``H_γγ = c diag(sum_i y_i^{∘2})``,
    ``H_ββ = c L I``, ``H_γβ = H_βγ = c diag(sum_i y_i)``, with ``y_i`` the normalised rows.

    Args:
        X: LayerNorm input ``L x d``. (The Hessian does not depend on ``γ``, ``β`` or the target.)
        eps: The ``eps`` added to the variance.
        c: Curvature of the loss in the output; default ``2/(L d)`` (MSE ``||Z - Target||^2 / (L d)``).

    Returns:
        ``{("gamma","gamma"), ("gamma","beta"), ("beta","gamma"), ("beta","beta")}``, each ``d x d``.
    """
    n, d = X.shape[-2:]
    c = 2.0 / (n * d) if c is None else c
    y = _stats(X, eps)[2]
    g_b = c * torch.diag(y.sum(-2))
    return {
        ("gamma", "gamma"): c * torch.diag((y * y).sum(-2)),
        ("gamma", "beta"): g_b,
        ("beta", "gamma"): g_b,
        ("beta", "beta"): c * n * eye(d, X),
    }
