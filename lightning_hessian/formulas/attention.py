r"""Analytic Jacobians, Hessians and Hessian-norm bounds of one self-attention layer.

Single head, no output projection, no biases ([O] §3, [P] §3):

    T = X W_Q W_K^T X^T / τ,   A = softmax_rows(T),   F = A X W_V,   l = ||F - Target||_F^2 / (L d_V),

with ``X`` of shape ``L x d_V``, ``W_Q, W_K`` of shape ``d_V x d_K``, ``W_V`` of shape ``d_V x d_V`` and the
temperature ``τ = sqrt(d_K)`` unless given. ``c = 2 / (L d_V)`` is ``d^2 l / dF^2`` (times ``I``) and
``dl/dF = c vec_r(F - Target)``.

Beyond the papers' setting, the matrix-free products, Jacobian norms and bounds also accept

* a rectangular ``W_V`` of shape ``d_V x d_O`` (one head of a multi-head layer: ``d_O = d_head``), with
  ``F``, ``Target`` of shape ``L x d_O`` and ``c = 2 / (L d_O)``; none of the derivations uses a square
  ``W_V`` (tests/test_formulas_attention.py checks products, norms and bounds against autograd). The dense
  Kronecker routes (:func:`jacobians`, :func:`hessian_blocks`) keep the square form;
* an attention ``mask`` (bool ``L x L``, True where a query may attend a key; e.g. causal): masked scores
  are ``-inf`` before the softmax, so masked entries of ``A`` are 0 and ``dA/dT`` keeps the form
  ``diag(a_i) - a_i a_i^T`` on the kept entries; every bound's chain of inequalities is unchanged;
* biases, by augmentation: ``X W + 1 b^T = [X, 1] [W; b^T]``, exactly.

Vectorisation is row-major (``vec_r``, torch ``.reshape(-1)``) and every Jacobian is
``d vec_r(F) / d vec_r(W)^T``.

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, "What Does It Mean to Be a Transformer? Insights from a
        Theoretical Hessian Analysis", ICLR 2025, arXiv:2410.10986 (Thm 3.1 outer part, Thm 3.2 functional
        part, Lemma C.1 softmax second derivative).
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians
        and Their Implications for Scaling Laws", arXiv:2510.16927 (Thm 1: norm bound of the self-attention
        Hessian; Appendix lemma on the attention second derivatives Φ).

Three ways in, by cost:

* Dense (:func:`jacobians`, :func:`second_derivatives`, :func:`hessian_blocks`): the papers' Kronecker
  formulas literally. ``Z_2`` alone has ``L d_V^3 x d_V^2`` entries and is built from an ``L^4 x L^2`` softmax
  second derivative, so this is for small sizes only (``L, d <~ 8``).
* Matrix-free (:func:`hessian_matvec`, :func:`hessian_block_norm`, :func:`jacobian_norms`): Hessian-block
  products evaluated from the same identities without forming any Kronecker product; one product costs
  ``O(L^2 d + L d^2)`` time and memory per vector, so ``L = 128, d = 64`` is cheap.
* Bounds (:func:`block_bounds`, :func:`hessian_bound`, :func:`jacobian_bounds`): [P] Thm 1, in the printed
  form (``variant="paper"``) and corrected (``variant="corrected"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._linalg import (
    HessianBlock,
    batched_top_eigenvalue,
    commutation,
    extreme_eigenvalues,
    eye,
    frobenius_from_matvec,
    kron,
    softmax_hessian,
    softmax_jacobian,
    softmax_jacobian_row_norms,
    softmax_jvp,
    spectral_norm,
    vec_r_col,
)

__all__ = [
    "NAMES",
    "HessianBlock",
    "block_bounds",
    "forward",
    "hessian_block_norm",
    "hessian_blocks",
    "hessian_bound",
    "hessian_matvec",
    "jacobian_bounds",
    "jacobian_norms",
    "jacobians",
    "second_derivatives",
    "shuffle_matrix",
    "softmax_hessian_norm_bound",
    "softmax_jacobian_norm",
    "z1",
    "z2",
]

#: Parameter names, in the order used for the full Hessian.
NAMES: tuple[str, str, str] = ("Q", "K", "V")
_PARTS = ("outer", "functional", "total")


def _tau(w_q: Tensor, tau: float | None) -> float:
    return math.sqrt(w_q.shape[-1]) if tau is None else float(tau)


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"parameter name must be one of {NAMES}, got {name!r}")
    return name


def _softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1)


def forward(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, tau: float | None = None, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Forward pass ``T = X W_Q W_K^T X^T / τ``, ``A = softmax_rows(T)``, ``F = A X W_V``.

    Args:
        X: Input ``(..., L, d_V)``; leading dimensions broadcast against the weights.
        W_Q: Query weights ``(..., d_V, d_K)``.
        W_K: Key weights ``(..., d_V, d_K)``.
        W_V: Value weights ``(..., d_V, d_O)`` (``d_O = d_V`` in the papers).
        tau: Temperature replacing ``sqrt(d_K)``.
        mask: Optional bool ``(..., L, L)``: True where query ``i`` may attend key ``j`` (every row needs
            one True); masked scores are ``-inf`` before the softmax.

    Returns:
        ``{"T", "A", "F"}``.
    """
    t = _tau(W_Q, tau)
    scores = (X @ W_Q) @ (X @ W_K).transpose(-1, -2) / t
    a = _softmax(scores, mask)
    return {"T": scores, "A": a, "F": a @ (X @ W_V)}


# ==========================================================================================================
# Dense formulas ([O] Thm 3.1-3.2 as restated in [P]); small sizes only
# ==========================================================================================================


def z1(X: Tensor, A: Tensor) -> Tensor:
    """``Z_1 = (I_L ⊗ X^T) (dA/dT) (X ⊗ X)`` (``L d_V x d_V^2``), [O] Thm 3.1.

    Row block ``i`` equals ``x_i^T ⊗ C_i`` with ``C_i = X^T diag(a_i) X - (X^T a_i)(a_i^T X)``, the
    covariance of the tokens under attention row ``i``. Dense: memory ``O(L^4)`` for ``dA/dT``.
    """
    n = X.shape[0]
    return kron(eye(n, X), X.T) @ softmax_jacobian(A) @ kron(X, X)


def z2(X: Tensor, A: Tensor) -> Tensor:
    """``Z_2 = (I_L ⊗ X^T ⊗ X^T ⊗ X^T) (d^2 A / dT^2) (X ⊗ X)`` (``L d_V^3 x d_V^2``), [O] Thm 3.2.

    Dense: memory ``O(L^6)`` for ``d^2 A / dT^2``, so keep ``L`` small.
    """
    n = X.shape[0]
    return kron(eye(n, X), X.T, X.T, X.T) @ softmax_hessian(A) @ kron(X, X)


def shuffle_matrix(d: int, like: Tensor) -> Tensor:
    """``S = (I_d ⊗ K_{d,d})(vec_r(I_d) ⊗ I_d)``, shape ``d^3 x d`` ([O] Thm 3.2).

    The paper's text gives the shape as ``d^2 x d``; the product has ``d^3`` rows. ``(I_L ⊗ S)`` maps
    ``vec_r(M)`` to ``vec_r(M ⊗ I_d)`` for ``M`` of shape ``L x d``.
    """
    i_d = eye(d, like)
    return kron(i_d, commutation(d, d, like)) @ kron(vec_r_col(i_d), i_d)


def _embeddings(W_Q: Tensor, W_K: Tensor) -> dict[str, Tensor]:
    """``E_Q = I ⊗ W_K`` and ``E_K = (W_Q ⊗ I) K_{d_K,d_V}``: ``d vec_r(X W_Q W_K^T X^T) = (X ⊗ X) E dW``."""
    d_v, d_k = W_Q.shape
    i_d = eye(d_v, W_Q)
    return {"Q": kron(i_d, W_K), "K": kron(W_Q, i_d) @ commutation(d_k, d_v, W_Q)}


def jacobians(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, tau: float | None = None
) -> dict[str, Tensor]:
    """Dense Jacobians ``G_W = d vec_r(F) / d vec_r(W)^T`` ([O] Thm 3.1; [P] Thm 4).

    ``G_V = (A X) ⊗ I_{d_V}``, ``G_Q = τ^{-1} (I_L ⊗ W_V^T) Z_1 (I_{d_V} ⊗ W_K)``,
    ``G_K = τ^{-1} (I_L ⊗ W_V^T) Z_1 (W_Q ⊗ I_{d_V}) K_{d_K,d_V}``.

    Returns:
        ``{"Q": (L d_V) x (d_V d_K), "K": same, "V": (L d_V) x d_V^2}``.
    """
    t = _tau(W_Q, tau)
    a = forward(X, W_Q, W_K, W_V, tau)["A"]
    n, d_v = X.shape
    z = z1(X, a)
    emb = _embeddings(W_Q, W_K)
    left = kron(eye(n, X), W_V.T)
    return {
        "Q": left @ z @ emb["Q"] / t,
        "K": left @ z @ emb["K"] / t,
        "V": kron(a @ X, eye(d_v, X)),
    }


def second_derivatives(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, tau: float | None = None
) -> dict[tuple[str, str], Tensor]:
    """Dense second derivatives ``Φ_ab = d vec_r(G_a) / d vec_r(W_b)^T`` (``(L d_V n_a) x n_b``) of ``F``.

    These are the uncontracted model-curvature blocks of [P]'s appendix lemma ("attention second derivatives
    Φ from the functional Hessian"); the loss functional part is ``H_f(a, b) = c R_{n_a} Φ_ab`` with
    ``R_m = vec_r(F - Target)^T ⊗ I_m``. Note that [P] prints ``Φ`` with the loss constant ``2/(L d_V)``
    included, which does not belong to a derivative of ``F``; it is not included here.

    * ``Φ_VV = 0``; ``Φ_Va = τ^{-1} (I_L ⊗ S) Z_1 E_a``;
    * ``Φ_ab = τ^{-2} (I_L ⊗ W_V^T ⊗ E_a^T) Z_2 E_b`` (+ for ``a ≠ b`` the term from ``dT/dW_a`` depending
      on ``W_b``: ``τ^{-1} (P (dA/dT) ⊗ I) d vec_r(dT/dW_a)/dW_b`` with ``P = I_L ⊗ W_V^T X^T``);
    * ``Φ_aV = (I_{L d_V} ⊗ (τ^{-1} Z_1 E_a)^T) (I_L ⊗ K_{d_V,L} ⊗ I_{d_V}) (vec_r(I_L) ⊗ I_{d_V^2})
      K_{d_V,d_V}``,

    with ``E_Q = I ⊗ W_K``, ``E_K = (W_Q ⊗ I) K_{d_K,d_V}`` (docs/formulas.md §2: the ``K`` blocks swap
    roles).
    """
    t = _tau(W_Q, tau)
    a = forward(X, W_Q, W_K, W_V, tau)["A"]
    n, d_v = X.shape
    d_k = W_Q.shape[1]
    i_l, i_d = eye(n, X), eye(d_v, X)
    z_1, z_2 = z1(X, a), z2(X, a)
    emb = _embeddings(W_Q, W_K)
    s_mat = shuffle_matrix(d_v, X)
    n_qk = d_v * d_k
    out: dict[tuple[str, str], Tensor] = {("V", "V"): X.new_zeros(n * d_v * d_v * d_v, d_v * d_v)}
    # d vec_r(I_L ⊗ W_V^T) / d vec_r(W_V)^T ([P] Kronecker-product and transpose derivatives)
    d_left = kron(i_l, commutation(d_v, n, X), i_d) @ kron(vec_r_col(i_l), eye(d_v * d_v, X))
    d_left = d_left @ commutation(d_v, d_v, X)
    for name in ("Q", "K"):
        out[("V", name)] = kron(i_l, s_mat) @ z_1 @ emb[name] / t
        g_inner = z_1 @ emb[name] / t  # G_a = (I_L ⊗ W_V^T) g_inner
        out[(name, "V")] = kron(eye(n * d_v, X), g_inner.T) @ d_left
        for other in ("Q", "K"):
            out[(name, other)] = kron(i_l, W_V.T, emb[name].T) @ z_2 @ emb[other] / t**2
    # Terms from dT/dW_Q depending on W_K (and vice versa): d vec_r(X ⊗ Y)/dY etc. ([P] Kronecker derivative).
    p_da = kron(i_l, W_V.T @ X.T) @ softmax_jacobian(a) / t  # L d_V x L^2
    x_id = kron(X, eye(d_k, X))  # d vec_r(X W) / d vec_r(W)^T
    d_xy = kron(i_l, commutation(n, d_v, X), eye(d_k, X)) @ kron(vec_r_col(X), eye(n * d_k, X))
    out[("Q", "K")] = out[("Q", "K")] + kron(p_da, eye(n_qk, X)) @ d_xy @ x_id
    d_yx = kron(i_l, commutation(n, d_k, X), i_d) @ kron(eye(n * d_k, X), vec_r_col(X))
    k_t = kron(eye(n * n, X), commutation(d_k, d_v, X).T)
    out[("K", "Q")] = out[("K", "Q")] + kron(p_da, eye(n_qk, X)) @ k_t @ d_yx @ x_id
    return out


def hessian_blocks(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, target: Tensor, tau: float | None = None
) -> dict[tuple[str, str], HessianBlock]:
    """All nine dense Hessian blocks of the MSE loss, split into outer and functional parts.

    Outer part ([O] Thm 3.1, with ``M_1 = A X`` and ``E_a`` as in :func:`second_derivatives`):

    * ``H_o(V,V) = c M_1^T M_1 ⊗ I_{d_V}``;
    * ``H_o(a,b) = (c/τ^2) E_a^T Z_1^T (I_L ⊗ W_V W_V^T) Z_1 E_b`` for ``a, b ∈ {Q, K}``
      (``E_Q = I ⊗ W_K`` gives the printed ``H_o(Q,Q)``; ``E_K = (W_Q ⊗ I) K_{d_K,d_V}`` the ``(Q,K)`` block);
    * ``H_o(V,a) = (c/τ) (M_1^T ⊗ W_V^T) Z_1 E_a``.

    Functional part ([O] Thm 3.2, ``R_m = vec_r(F - Target)^T ⊗ I_m``, ``S`` from :func:`shuffle_matrix`):

    * ``H_f(V,V) = 0``;
    * ``H_f(a,b) = (c/τ^2) R_{d_V d_K} (I_L ⊗ W_V^T ⊗ E_a^T) Z_2 E_b``, plus for the mixed blocks
      ``H_f(Q,K) += τ^{-1} (X^T Ψ X) ⊗ I_{d_K}`` and ``H_f(K,Q) += τ^{-1} (X^T Ψ^T X) ⊗ I_{d_K}`` where
      ``Ψ_i = (diag(a_i) - a_i a_i^T)(dl/dA)_i`` and ``dl/dA = c (F - Target)(X W_V)^T``. The second term of
      ``H_f(Q,K)`` as printed in [O]/[P] has inconsistent shapes; this is the corrected form
      (docs/formulas.md §2);
    * ``H_f(V,a) = (c/τ) R_{d_V^2} (I_L ⊗ S) Z_1 E_a``.

    Blocks ``(Q,V)`` and ``(K,V)`` are the transposes of ``(V,Q)`` and ``(V,K)``.

    Args:
        X: ``L x d_V`` input. W_Q, W_K: ``d_V x d_K``. W_V: ``d_V x d_V``. target: ``L x d_V``.
        tau: Temperature replacing ``sqrt(d_K)``.

    Returns:
        ``{(a, b): HessianBlock}`` for all ``a, b`` in ``("Q", "K", "V")``; block ``(a, b)`` has shape
        ``numel(W_a) x numel(W_b)``. Dense; for small sizes only (see :func:`z2`).
    """
    t = _tau(W_Q, tau)
    fw = forward(X, W_Q, W_K, W_V, tau)
    a, f = fw["A"], fw["F"]
    n, d_v = X.shape
    d_k = W_Q.shape[1]
    c = 2.0 / (n * d_v)
    i_l, i_d = eye(n, X), eye(d_v, X)
    z_1, z_2 = z1(X, a), z2(X, a)
    emb = _embeddings(W_Q, W_K)
    m_1 = a @ X
    resid = vec_r_col(f - target).T  # 1 x L d_V

    def r_mat(m: int) -> Tensor:
        return kron(resid, eye(m, X))

    out: dict[tuple[str, str], HessianBlock] = {}
    out[("V", "V")] = HessianBlock(c * kron(m_1.T @ m_1, i_d), X.new_zeros(d_v * d_v, d_v * d_v))
    s_mat = shuffle_matrix(d_v, X)
    for name in ("Q", "K"):
        outer = (c / t) * kron(m_1.T, W_V.T) @ z_1 @ emb[name]
        func = (c / t) * r_mat(d_v * d_v) @ kron(i_l, s_mat) @ z_1 @ emb[name]
        out[("V", name)] = HessianBlock(outer, func)
        out[(name, "V")] = HessianBlock(outer.T, func.T)
    psi = softmax_jvp(a, c * (f - target) @ (X @ W_V).T)
    gram = kron(i_l, W_V @ W_V.T)
    for name in ("Q", "K"):
        for other in ("Q", "K"):
            outer = (c / t**2) * emb[name].T @ z_1.T @ gram @ z_1 @ emb[other]
            func = (c / t**2) * r_mat(d_v * d_k) @ kron(i_l, W_V.T, emb[name].T) @ z_2 @ emb[other]
            if (name, other) == ("Q", "K"):
                func = func + kron(X.T @ psi @ X, eye(d_k, X)) / t
            elif (name, other) == ("K", "Q"):
                func = func + kron(X.T @ psi.T @ X, eye(d_k, X)) / t
            out[(name, other)] = HessianBlock(outer, func)
    return out


# ==========================================================================================================
# Matrix-free products
# ==========================================================================================================


class AttentionState:
    """Forward quantities shared by the matrix-free products (all tensors broadcast over leading dims)."""

    def __init__(
        self,
        X: Tensor,
        W_Q: Tensor,
        W_K: Tensor,
        W_V: Tensor,
        target: Tensor | None,
        tau: float | None,
        mask: Tensor | None = None,
    ) -> None:
        self.X, self.W_Q, self.W_K, self.W_V = X, W_Q, W_K, W_V
        self.t = _tau(W_Q, tau)
        self.xq, self.xk, self.xv = X @ W_Q, X @ W_K, X @ W_V
        self.a = _softmax(self.xq @ self.xk.transpose(-1, -2) / self.t, mask)
        self.f = self.a @ self.xv
        self.c = 2.0 / (X.shape[-2] * W_V.shape[-1])  # 2 / (L d_O)
        self.shapes = {"Q": tuple(W_Q.shape[-2:]), "K": tuple(W_K.shape[-2:]), "V": tuple(W_V.shape[-2:])}
        if target is not None:
            self.r = self.c * (self.f - target)  # dl/dF
            self.g = self.r @ self.xv.transpose(-1, -2)  # dl/dA
            self.psi = softmax_jvp(self.a, self.g)  # dl/dT

    def d_scores(self, b: str, u: Tensor) -> Tensor:
        xu = self.X @ u
        if b == "Q":
            return xu @ self.xk.transpose(-1, -2) / self.t
        return self.xq @ xu.transpose(-1, -2) / self.t

    def jvp(self, b: str, u: Tensor) -> Tensor:
        """``J_b u`` as an ``L x d_V`` matrix (directional derivative of ``F``)."""
        if b == "V":
            return self.a @ (self.X @ u)
        return softmax_jvp(self.a, self.d_scores(b, u)) @ self.xv

    def vjp(self, a: str, g: Tensor) -> Tensor:
        """``J_a^T vec_r(g)`` as a matrix shaped like ``W_a``."""
        xt = self.X.transpose(-1, -2)
        if a == "V":
            return (self.a @ self.X).transpose(-1, -2) @ g
        psi = softmax_jvp(self.a, g @ self.xv.transpose(-1, -2))
        if a == "Q":
            return xt @ psi @ self.xk / self.t
        return xt @ psi.transpose(-1, -2) @ self.xq / self.t

    def functional(self, a: str, b: str, u: Tensor) -> Tensor:
        """``H_f(a, b) u``: derivative of ``J_a^T r`` along ``u`` in ``W_b`` with ``r = dl/dF`` held fixed."""
        xt = self.X.transpose(-1, -2)
        xu = self.X @ u
        if a == "V":
            if b == "V":
                return torch.zeros_like(xt @ xu)
            d_a = softmax_jvp(self.a, self.d_scores(b, u))
            return (d_a @ self.X).transpose(-1, -2) @ self.r
        if b == "V":
            d_psi = softmax_jvp(self.a, self.r @ xu.transpose(-1, -2))
        else:
            # Second-order softmax term: d[A ⊙ (G - rowsum(A ⊙ G))] with G = dl/dA fixed.
            d_a = softmax_jvp(self.a, self.d_scores(b, u))
            s = (self.a * self.g).sum(-1, keepdim=True)
            d_psi = d_a * (self.g - s) - self.a * (d_a * self.g).sum(-1, keepdim=True)
        if a == "Q":
            out = xt @ d_psi @ self.xk / self.t
            if b == "K":
                out = out + xt @ self.psi @ xu / self.t
            return out
        out = xt @ d_psi.transpose(-1, -2) @ self.xq / self.t
        if b == "Q":
            out = out + xt @ self.psi.transpose(-1, -2) @ xu / self.t
        return out

    def apply(self, a: str, b: str, part: str, u: Tensor) -> Tensor:
        if part == "outer":
            return self.vjp(a, self.c * self.jvp(b, u))
        if part == "functional":
            return self.functional(a, b, u)
        if part == "total":
            return self.vjp(a, self.c * self.jvp(b, u)) + self.functional(a, b, u)
        raise ValueError(f"part must be one of {_PARTS}, got {part!r}")


def _as_matrix(v: Tensor, shape: tuple[int, int]) -> tuple[Tensor, bool]:
    if v.dim() >= 2 and tuple(v.shape[-2:]) == shape:
        return v, False
    if v.shape[-1] == shape[0] * shape[1]:
        return v.reshape(*v.shape[:-1], *shape), True
    raise ValueError(f"v must end in shape {shape} or {shape[0] * shape[1]}, got {tuple(v.shape)}")


def hessian_matvec(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    target: Tensor,
    v: Tensor,
    block: tuple[str, str] = ("Q", "Q"),
    part: str = "total",
    tau: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Product ``H(W_a, W_b) v`` of one Hessian block (or its outer / functional part) with ``v``.

    Evaluated without Kronecker products: ``H_o v = c J_a^T (J_b v)`` with the Jacobian products written in
    terms of ``A``, and ``H_f v`` as the derivative of ``J_a^T dl/dF`` along ``v`` (the second-order softmax
    term of [O] Thm 3.2 plus the ``(X^T Ψ X) ⊗ I`` term for the mixed ``Q``-``K`` blocks). Time and memory
    ``O(L^2 d + L d^2)`` per vector, against ``O(L d^5)`` for the dense ``Z_2`` route.

    Args:
        X, W_Q, W_K, W_V, target: As in :func:`hessian_blocks`; leading dimensions broadcast.
        v: Direction(s) in ``W_b``: shape ``(..., *W_b.shape)`` or flattened ``(..., numel(W_b))``
            (row-major). Leading dimensions broadcast against those of ``X``.
        block: ``(a, b)`` with ``a, b`` in ``("Q", "K", "V")``.
        part: ``"outer"``, ``"functional"`` or ``"total"``.
        tau: Temperature replacing ``sqrt(d_K)``.
        mask: Optional attention mask, as in :func:`forward`.

    Returns:
        ``H(W_a, W_b) v`` shaped like ``W_a`` (or flattened, matching ``v``).
    """
    a_name, b_name = _check_name(block[0]), _check_name(block[1])
    state = AttentionState(X, W_Q, W_K, W_V, target, tau, mask)
    u, flat = _as_matrix(v, state.shapes[b_name])
    out = state.apply(a_name, b_name, part, u)
    return out.reshape(*out.shape[:-2], -1) if flat else out


def _block_operator(
    state: AttentionState, a: str, b: str, part: str
) -> tuple[Callable[[Tensor], Tensor], int, int]:
    sa, sb = state.shapes[a], state.shapes[b]

    def mv(v: Tensor) -> Tensor:
        out = state.apply(a, b, part, v.reshape(*v.shape[:-1], *sb))
        return out.reshape(*out.shape[:-2], -1)

    return mv, sa[0] * sa[1], sb[0] * sb[1]


def hessian_block_norm(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    target: Tensor,
    block: tuple[str, str] = ("Q", "Q"),
    part: str = "total",
    ord: int | str = 2,
    tau: float | None = None,
    iters: int = 100,
    seed: int = 0,
    mask: Tensor | None = None,
) -> float:
    """Spectral (``ord=2``) or Frobenius (``ord="fro"``) norm of one Hessian block, matrix-free.

    ``ord=2``: Lanczos with full reorthogonalisation on ``H`` (diagonal blocks, symmetric) or on ``H^T H =
    H(b,a) H(a,b)`` (off-diagonal blocks), ``min(iters, n)`` steps; the result approaches the norm from below
    and is exact (to rounding) once the Krylov space is exhausted. ``ord="fro"``: exact, from ``numel(W_b)``
    products with basis vectors, 256 per batch. Memory ``O(iters * n + 256 (L^2 + L d))``; nothing of size
    ``n^2`` is formed. Unbatched inputs only.

    Args:
        X, W_Q, W_K, W_V, target, block, part, tau: As in :func:`hessian_matvec`.
        ord: ``2`` or ``"fro"``.
        iters: Lanczos steps for ``ord=2``.
        seed: Seed of the Lanczos start vector.
        mask: Optional attention mask, as in :func:`forward`.
    """
    a, b = _check_name(block[0]), _check_name(block[1])
    state = AttentionState(X, W_Q, W_K, W_V, target, tau, mask)
    mv, n_a, n_b = _block_operator(state, a, b, part)
    if ord == "fro":
        return frobenius_from_matvec(mv, n_b, like=X)
    if ord != 2:
        raise ValueError(f"ord must be 2 or 'fro', got {ord!r}")
    if a == b:
        return max(abs(v) for v in extreme_eigenvalues(mv, n_a, iters=iters, like=X, seed=seed))
    mv_t, _, _ = _block_operator(state, b, a, part)  # H(b, a) = H(a, b)^T
    top = extreme_eigenvalues(lambda x: mv_t(mv(x)), n_b, iters=iters, like=X, seed=seed)[1]
    return math.sqrt(max(top, 0.0))


def jacobian_norms(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    tau: float | None = None,
    iters: int = 100,
    seed: int = 0,
    mask: Tensor | None = None,
) -> dict[str, float] | dict[str, Tensor]:
    """Spectral norms ``||G_Q||_2, ||G_K||_2, ||G_V||_2`` of the Jacobians without forming them.

    ``||G_V||_2 = ||(A X) ⊗ I||_2 = ||A X||_2`` exactly. For ``Q`` and ``K``, Lanczos on the Gram operator
    ``G^T G v = J^T (J v)`` (``min(iters, d_V d_K)`` steps, from below, exact once the Krylov space is
    exhausted). Memory ``O(iters d_V d_K + L^2 + L d)``. ``mask``: as in :func:`forward`.

    Leading batch dimensions of the inputs (they broadcast, e.g. sequences x heads) give tensors of the
    batch shape: the operators of the batch are the blocks of one Lanczos run (one batched product per
    step, at most ``min(iters, d_V d_K)`` steps, each stopped at a relative Ritz residual of 1e-10).
    """
    state = AttentionState(X, W_Q, W_K, W_V, None, tau, mask)
    batch = state.a.shape[:-2]
    if batch:
        out_b: dict[str, Tensor] = {"V": spectral_norm(state.a @ X)}
        for name in ("Q", "K"):
            shape = state.shapes[name]

            def gram_b(v: Tensor, name: str = name, shape: tuple[int, int] = shape) -> Tensor:
                u = v.reshape(*batch, *shape)
                return state.vjp(name, state.jvp(name, u)).reshape(*batch, -1)

            n = shape[0] * shape[1]
            top = batched_top_eigenvalue(gram_b, tuple(batch), n, iters=iters, like=X, seed=seed)
            out_b[name] = top.clamp_min(0).sqrt()
        return {k: out_b[k].expand(batch) for k in NAMES}  # type: ignore[return-value]
    out = {"V": float(spectral_norm(state.a @ X))}
    for name in ("Q", "K"):
        shape = state.shapes[name]
        n = shape[0] * shape[1]

        def gram(v: Tensor, name: str = name, shape: tuple[int, int] = shape) -> Tensor:
            return state.vjp(name, state.jvp(name, v.reshape(shape))).reshape(-1)

        out[name] = math.sqrt(max(extreme_eigenvalues(gram, n, iters=iters, like=X, seed=seed)[1], 0.0))
    return {k: out[k] for k in NAMES}


# ==========================================================================================================
# Bounds ([P] Thm 1) and their correction
# ==========================================================================================================


def softmax_jacobian_norm(A: Tensor) -> Tensor:
    """``s = ||dA/dT||_2 = max_i ||diag(a_i) - a_i a_i^T||_2`` computed from ``A`` (batched).

    ``s = 1/L`` only for uniform attention; in general ``s <= 1/2`` (attained by two-point rows). [P]'s proof
    of Thm 1 uses ``s <= 1/L``, which is false for peaked attention (docs/formulas.md §3).
    """
    return softmax_jacobian_row_norms(A).amax(-1)


def softmax_hessian_norm_bound(A: Tensor) -> Tensor:
    """Upper bound ``s_2 = max_i s_i (1 + 2 ||a_i||_2) <= 3/2`` on ``||d^2 A / dT^2||_2`` (batched).

    Derivation: for a direction ``u`` in row ``i`` and ``w = (diag(a) - a a^T) u``, the derivative of the row
    Jacobian is ``diag(w) - w a^T - a w^T``, whose Frobenius norm is at most ``||w|| (1 + 2||a||)`` and
    ``||w|| <= s_i ||u||``. Rows do not interact, so the norm of the whole ``L^4 x L^2`` matrix is the maximum
    over rows. [P] bounds the same norm by 6 (valid, looser).
    """
    s_rows = softmax_jacobian_row_norms(A)
    return (s_rows * (1 + 2 * A.norm(dim=-1))).amax(-1)


def _norms(X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor) -> dict[str, Tensor]:
    return {"x": spectral_norm(X), "q": spectral_norm(W_Q), "k": spectral_norm(W_K), "v": spectral_norm(W_V)}


def bound_terms(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    target: Tensor | None,
    variant: str,
    tau: float | None,
    mask: Tensor | None = None,
) -> dict[tuple[str, str], dict[str, Tensor]]:
    """Per-block bounds; with ``target=None`` (corrected only) the functional parts and totals are NaN."""
    if variant not in ("paper", "corrected"):
        raise ValueError(f"variant must be 'paper' or 'corrected', got {variant!r}")
    t = _tau(W_Q, tau)
    n, d_v = X.shape[-2:]
    c = 2.0 / (n * W_V.shape[-1])  # 2 / (L d_O)
    fw = forward(X, W_Q, W_K, W_V, tau, mask)
    if target is None:
        if variant == "paper":
            raise ValueError("the paper variant needs the target")
        target = torch.full_like(fw["F"], math.nan)
    nm = _norms(X, W_Q, W_K, W_V)
    x, q, k, v = nm["x"], nm["q"], nm["k"], nm["v"]
    if variant == "paper":
        # ||dA/dT|| <= 1/L, ||A|| <= L, ||d^2A/dT^2|| <= 6, ||F - Target||_F <= rho.
        rho = math.sqrt(min(n, d_v)) * (n * x * v + spectral_norm(target))
        z_1 = x**3 / n
        m_1 = n * x
        z_2 = 6 * x**5
        resid = rho
        extra = 2 * rho * v * x**3 / (n**2 * math.sqrt(d_v) * t)  # printed second term of f_QK
    else:
        s = softmax_jacobian_norm(fw["A"])
        z_1 = s * x**3
        m_1 = spectral_norm(fw["A"] @ X)
        z_2 = softmax_hessian_norm_bound(fw["A"]) * x**5
        resid = torch.linalg.matrix_norm(fw["F"] - target)
        # ||τ^{-1} (X^T Ψ X) ⊗ I|| <= τ^{-1} x^2 ||Ψ||_F <= τ^{-1} x^2 s c ||F - Target||_F x v
        extra = c * resid * v * s * x**3 / t
    w = {"Q": k, "K": q}  # the norm of E_Q = I ⊗ W_K is ||W_K||; of E_K it is ||W_Q||
    zero = torch.zeros_like(x)
    terms: dict[tuple[str, str], dict[str, Tensor]] = {}
    terms[("V", "V")] = {"outer": c * m_1**2, "functional": zero}
    for a in ("Q", "K"):
        terms[("V", a)] = {
            "outer": c / t * m_1 * v * z_1 * w[a],
            "functional": c / t * resid * math.sqrt(d_v) * z_1 * w[a],
        }
        terms[(a, "V")] = terms[("V", a)]
        for b in ("Q", "K"):
            func = c / t**2 * resid * v * w[a] * w[b] * z_2
            if a != b:
                func = func + extra
            terms[(a, b)] = {"outer": c / t**2 * w[a] * w[b] * v**2 * z_1**2, "functional": func}
    for val in terms.values():
        val["total"] = val["outer"] + val["functional"]
    return terms


def _out(value: Tensor) -> float | Tensor:
    return float(value) if value.dim() == 0 else value


def block_bounds(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    target: Tensor,
    variant: str = "corrected",
    tau: float | None = None,
    mask: Tensor | None = None,
) -> dict[tuple[str, str], dict[str, float | Tensor]]:
    r"""Upper bounds on the spectral norms of the nine Hessian blocks, per part ([P] Thm 1 and its proof).

    With ``x = ||X||_2``, ``q, k, v`` the spectral norms of ``W_Q, W_K, W_V``, ``c = 2/(L d_O)``
    (``d_O`` the width of ``W_V``; ``d_V`` in the papers):

    ``variant="paper"``: the appendix constants of [P]'s proof of Thm 1 (the main text prints different
    constants, 8 and 4 and no ``1/L``; these per-block forms are the ones the proof derives), with
    ``ρ = sqrt(min(L, d_V)) (L x v + ||Target||_2) >= ||F - Target||_F``:

        o_VV = 2 L x^2 / d_V,                     f_VV = 0,
        o_QQ = 2 k^2 v^2 x^6 / (L^3 d_V d_K),      f_QQ = 12 ρ v k^2 x^5 / (L d_V d_K),
        o_VQ = 2 v k x^4 / (L d_V sqrt(d_K)),       f_VQ = 2 ρ k x^3 / (L^2 sqrt(d_V d_K)),
        o_QK = 2 k q v^2 x^6 / (L^3 d_V d_K),
        f_QK = 12 ρ v k q x^5 / (L d_V d_K) + 2 ρ v x^3 / (L^2 sqrt(d_V d_K)),

    and the ``K`` blocks with ``q`` and ``k`` swapped. **These can be violated**: the proof uses
    ``||dA/dT||_2 <= 1/L`` (so ``||Z_1|| <= x^3/L``), true only for uniform attention; with peaked attention
    ``||dA/dT||`` reaches ``1/2`` and the true ``||H_o(Q,Q)||`` exceeds ``o_QQ`` by up to ``(L/2)^2``.

    ``variant="corrected"`` (valid in general): the same chain of inequalities with
    ``s = max_i ||diag(a_i) - a_i a_i^T||_2`` computed from ``A`` in place of ``1/L`` (``||Z_1|| <= s x^3``),
    ``||A X||_2`` in place of ``L x``, the exact ``||F - Target||_F`` in place of ``ρ``,
    ``||d^2 A/dT^2|| <= s_2 = max_i s_i (1 + 2||a_i||)`` in place of 6 (:func:`softmax_hessian_norm_bound`),
    and the corrected second term of ``H_f(Q,K)`` bounded by ``c ||F - Target||_F v s x^3 / τ``:

        o_VV = c ||AX||^2 (exact),  o_QQ = (c/τ^2) k^2 v^2 (s x^3)^2,  o_VQ = (c/τ) ||AX|| v k s x^3,
        f_QQ = (c/τ^2) ||F-T||_F v k^2 s_2 x^5,  f_VQ = (c/τ) ||F-T||_F sqrt(d_V) k s x^3, ...

    Args:
        X, W_Q, W_K, W_V, target: As in :func:`hessian_blocks`. Leading batch dimensions are allowed (they
            broadcast); the values are then tensors of the batch shape instead of floats.
        variant: ``"corrected"`` or ``"paper"``.
        tau: Temperature replacing ``sqrt(d_K)`` (both variants: ``d_K -> τ^2``).
        mask: Optional attention mask, as in :func:`forward` (the corrected variant holds with a mask; the
            paper variant's ``1/L`` assumption then fails even more easily).

    Returns:
        ``{(a, b): {"outer", "functional", "total"}}`` for all nine blocks (``total = outer + functional``).
    """
    terms = bound_terms(X, W_Q, W_K, W_V, target, variant, tau, mask)
    return {key: {part: _out(val) for part, val in parts.items()} for key, parts in terms.items()}


def hessian_bound(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    target: Tensor,
    variant: str = "corrected",
    tau: float | None = None,
    mask: Tensor | None = None,
) -> float | Tensor:
    """Overall bound ``M = 3 max_{a,b} (o_ab + f_ab) >= ||H||_2`` of the whole Hessian ([P] Thm 1).

    Uses the per-block bounds of :func:`block_bounds` and ``||H||_2 <= 3 max_ab ||H_ab||_2`` for a 3x3 block
    matrix. The constants printed in [P]'s main-text statement of ``M`` (8, 4, missing ``1/L``) differ from
    its proof; this uses the per-block forms. ``variant="paper"`` inherits the invalid ``||dA/dT|| <= 1/L``.
    """
    terms = bound_terms(X, W_Q, W_K, W_V, target, variant, tau, mask)
    totals = torch.stack([val["total"] for val in terms.values()])
    return _out(3 * totals.amax(0))


def jacobian_bounds(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    variant: str = "corrected",
    tau: float | None = None,
    mask: Tensor | None = None,
) -> dict[str, float | Tensor]:
    """Upper bounds on ``||G_Q||_2, ||G_K||_2, ||G_V||_2`` ([P] proof of Thm 6, eq. for ``G_k``).

    ``variant="paper"``: ``||G_V|| <= L x``, ``||G_Q|| <= v k x^3 / (L τ)``, ``||G_K|| <= v q x^3 / (L τ)``
    (uses ``||dA/dT|| <= 1/L``: can be violated by peaked attention). ``variant="corrected"``:
    ``||G_V|| = ||A X||_2`` (exact), ``||G_Q|| <= v k s x^3 / τ``, ``||G_K|| <= v q s x^3 / τ`` with ``s``
    from :func:`softmax_jacobian_norm`. Batched inputs give tensors.
    """
    if variant not in ("paper", "corrected"):
        raise ValueError(f"variant must be 'paper' or 'corrected', got {variant!r}")
    t = _tau(W_Q, tau)
    n = X.shape[-2]
    x, q, k, v = (spectral_norm(m) for m in (X, W_Q, W_K, W_V))
    if variant == "paper":
        z, g_v = x**3 / n, n * x
    else:
        a = forward(X, W_Q, W_K, W_V, tau, mask)["A"]
        z, g_v = softmax_jacobian_norm(a) * x**3, spectral_norm(a @ X)
    return {"Q": _out(v * k * z / t), "K": _out(v * q * z / t), "V": _out(g_v)}
