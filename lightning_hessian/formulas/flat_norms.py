r"""Exact flat norms of the second derivatives inside a post-norm Transformer block, matrix-free, per row.

The factors of [P] Thm 5/6 (:mod:`.block_bound`) that are norms of 3-tensors unfolded as matrices
(``||T||_flat = ||d vec_r(J) / d vec_r(W)^T||_2``, the norm [P]'s Thm 6 uses), evaluated without forming
them: each is ``sqrt(λ_max)`` of the quadratic form ``δ -> ||T δ||_F^2``, in closed form where the form
reduces to small per-row (or per-hidden-unit) matrices, else by the package's Lanczos on its gradient.

* LayerNorm (docs/formulas.md §4): :func:`layernorm_hessian_norm`, closed form (eigenvalues of ``Q_i``).
* FFN stage ``S = σ(Y W_1) W_2 + Y`` (§5): :func:`ffn_stage_norms`.
* Attention ``F = softmax(X W_Q W_K^T X^T / τ) X W_V`` (§2): :func:`attention_second_derivative_norms`, the
  flat norms of ``Φ_kl = d vec_r(dF/dW_k) / d vec_r(W_l)^T``, exact, per row.
* Jacobian norms from ``torch.func.jvp`` / ``vjp``: :func:`gram_norm`.

Each is tested in float64 against the dense matrices of :mod:`.ffn`, :mod:`.attention` and autograd.

Reference:
    E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians and
    Their Implications for Scaling Laws", arXiv:2510.16927, Thm 2-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import attention, ffn
from ._linalg import batched_top_eigenvalue

__all__ = [
    "attention_second_derivative_norms",
    "ffn_stage_norms",
    "gram_norm",
    "layernorm_hessian_norm",
    "quadratic_norm",
    "top_eigenvalue",
]


def top_eigenvalue(
    matvec: Callable[[Tensor], Tensor], n: int, like: Tensor, iters: int = 100, seed: int = 0
) -> float:
    """``λ_max`` of a symmetric operator by Lanczos (top value only: the smallest of a Gram operator sits near
    0 and would take many more steps)."""
    top = batched_top_eigenvalue(lambda v: matvec(v[0])[None], (1,), n, iters=iters, like=like, seed=seed)
    return float(top[0])


def gram_norm(fn: Callable[[Tensor], Tensor], w: Tensor, iters: int = 100, seed: int = 0) -> float:
    """``||d fn / d w||_2`` by Lanczos on ``J^T J`` (``torch.func`` products; nothing dense)."""
    _, vjp_fn = torch.func.vjp(fn, w)

    def gram(v: Tensor) -> Tensor:
        jv = torch.func.jvp(fn, (w,), (v.reshape(w.shape),))[1]
        return vjp_fn(jv)[0].reshape(-1)

    return math.sqrt(max(top_eigenvalue(gram, w.numel(), w, iters, seed), 0.0))


def quadratic_norm(
    q: Callable[[Tensor], Tensor], shape: tuple[int, ...], like: Tensor, iters: int, seed: int
) -> float:
    """``sqrt(λ_max(A))`` for a quadratic form ``q(δ) = δ^T A δ = ||ξ δ||_F^2`` (``A δ = ∇q / 2``)."""
    n = math.prod(shape)
    grad = torch.func.grad(lambda v: q(v.reshape(shape)))
    return math.sqrt(max(top_eigenvalue(lambda v: grad(v) / 2, n, like, iters, seed), 0.0))


def attention_second_derivative_norms(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, tau: float, iters: int = 100, seed: int = 0
) -> dict[tuple[str, str], float]:
    """Exact flat norms ``||Φ_kl|| = ||d vec_r(G_k) / d vec_r(W_l)^T||`` of attention, per row, matrix-free.

    Row ``i`` of ``F`` depends on ``W_Q`` through ``q_i = x_i W_Q`` and on ``W_K`` through the logits
    ``t_i = q_i K^T / τ`` (``K = X W_K``, ``V = X W_V``, ``J_i = diag(a_i) - a_i a_i^T``), so
    ``G_Q`` row ``i`` is ``V^T J_i (x_i ⊗ K) / τ`` (Frobenius ``||x_i|| ||V^T J_i K|| / τ``), ``G_K``
    row ``i`` is ``V^T J_i (X ⊗ q_i) / τ`` (Frobenius ``||q_i|| ||V^T J_i X|| / τ``) and ``G_V = (A X) ⊗ I``.
    Their derivatives along ``δ`` change ``J_i`` by ``diag(g_i) - g_i a_i^T - a_i g_i^T`` (``g_i = J_i r_i``,
    ``r_i`` the logits' change) and the explicit ``K``, ``q_i`` or ``V``; ``||Φ δ||_F^2`` is the sum over
    rows and
    ``||Φ|| = sqrt(λ_max)`` of that quadratic form (Lanczos on its gradient).
    """
    a = attention.forward(X, W_Q, W_K, W_V, tau)["A"]
    kx, qx, v = X @ W_K, X @ W_Q, X @ W_V
    x2, q2 = (X * X).sum(-1), (qx * qx).sum(-1)
    d = W_V.shape[-1]

    def jprod(left: Tensor, b: Tensor) -> Tensor:  # rows i: left^T J_i b
        return torch.einsum("jd,ij,jm->idm", left, a, b) - (a @ left)[:, :, None] * (a @ b)[:, None, :]

    def djprod(r: Tensor, b: Tensor) -> Tensor:  # rows i: V^T (diag(g_i) - g_i a_i^T - a_i g_i^T) b
        g = a * (r - (a * r).sum(-1, keepdim=True))
        out = torch.einsum("jd,ij,jm->idm", v, g, b) - (g @ v)[:, :, None] * (a @ b)[:, None, :]
        return out - (a @ v)[:, :, None] * (g @ b)[:, None, :]

    def frob(m: Tensor, w: Tensor) -> Tensor:
        return (w * (m * m).sum((-1, -2))).sum() / tau**2

    def logits_q(delta: Tensor) -> Tensor:  # change of the logits along δ in W_Q
        return (X @ delta) @ kx.T / tau

    def logits_k(delta: Tensor) -> Tensor:
        return qx @ (X @ delta).T / tau

    def kq(delta: Tensor) -> Tensor:
        n1, n2, p = djprod(logits_q(delta), X), jprod(v, X), X @ delta
        cross = (n1 * n2).sum((-1, -2)) * (qx * p).sum(-1)
        return (
            q2 * (n1 * n1).sum((-1, -2)) + (p * p).sum(-1) * (n2 * n2).sum((-1, -2)) + 2 * cross
        ).sum() / tau**2

    forms = {
        ("Q", "Q"): lambda dl: frob(djprod(logits_q(dl), kx), x2),
        ("K", "K"): lambda dl: frob(djprod(logits_k(dl), X), q2),
        ("Q", "K"): lambda dl: frob(djprod(logits_k(dl), kx) + jprod(v, X @ dl), x2),
        ("K", "Q"): kq,
        ("V", "Q"): lambda dl: (
            d * ((a * (logits_q(dl) - (a * logits_q(dl)).sum(-1, keepdim=True))) @ X).square().sum()
        ),
        ("V", "K"): lambda dl: (
            d * ((a * (logits_k(dl) - (a * logits_k(dl)).sum(-1, keepdim=True))) @ X).square().sum()
        ),
        ("Q", "V"): lambda dl: frob(jprod(X @ dl, kx), x2),
        ("K", "V"): lambda dl: frob(jprod(X @ dl, X), q2),
    }
    shapes = {"Q": tuple(W_Q.shape), "K": tuple(W_K.shape), "V": tuple(W_V.shape)}
    out = {key: quadratic_norm(form, shapes[key[1]], X, iters, seed) for key, form in forms.items()}
    out[("V", "V")] = 0.0  # G_V = (A X) ⊗ I does not depend on W_V
    return out


def layernorm_hessian_norm(X: Tensor, eps: float) -> float:
    """Exact flat norm of the LayerNorm second derivative (no affine weights), in closed form.

    Per row (docs/formulas.md §4), ``H[a, b] u``-columns: ``d σ^2 H[:, :, u] = -(p y^T + (y^T u) Q + y p^T)``
    with ``p = Q u``; ``Q`` has eigenvalues ``0`` (on ``1``), ``κ = 1 - ρ^2/d`` (on ``y``, ``ρ = ||y||``) and
    ``1``, so ``||·||_F^2 = 2 ρ^2 ||Q u||^2 + (||Q||_F^2 + 6 κ^2) (y^T u)^2`` and the row's norm is
    ``ρ sqrt(max(2, d - 2 + 9 κ^2)) / (d σ^2)``; rows do not interact (maximum over rows).
    """
    d = X.shape[-1]
    m = X - X.mean(-1, keepdim=True)
    var = (m * m).mean(-1) + eps
    rho2 = (m * m).sum(-1) / var
    kappa = 1 - rho2 / d
    top = torch.clamp(d - 2 + 9 * kappa**2, min=2.0)
    return float((torch.sqrt(rho2 * top) / (d * var)).max())


def _top_eig(mats: Tensor) -> float:
    """Largest eigenvalue over a batch of symmetric matrices."""
    return float(torch.linalg.eigvalsh(mats)[..., -1].max())


def ffn_stage_norms(
    Y: Tensor, W_1: Tensor, W_2: Tensor, activation: str, iters: int = 100, seed: int = 0
) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Exact flat norms of the FFN stage ``S = σ(Y W_1) W_2 + Y``, in closed form (``U = Y W_1``).

    Returns the factors ``J_SY``, ``H_SY`` (``d J_SY / dY``), ``dJSY_W1``, ``dJSY_W2`` (``d J_SY / dW_f``),
    ``dBW1_Y``, ``dBW2_Y`` (``d B_f / dY``) and ``B_W2``, and the four FFN ``ξ``. Each is the square root
    of the top eigenvalue of its quadratic form ``||ξ δ||_F^2``; with ``s_1 = σ'(U)``, ``s_2 = σ''(U)``,
    ``w_f = ||W_2[f]||^2``, ``S_1 = s_1`` as an ``L x d_ff`` matrix:

    * ``J_SY,l = W_2^T diag(s_1l) W_1^T + I`` per row; ``||B_2|| = ||σ(U)||``;
    * ``d J_SY / dW_2``: ``λ_max((S_1^T S_1) ⊙ (W_1^T W_1))``; ``d J_SY / dW_1`` (ReLU):
      ``λ_max((S_1^T S_1) ⊙ (W_2 W_2^T))`` (GELU adds ``W_2^T diag(s_2l ⊙ Y_l δ) W_1^T``: Lanczos);
    * ``d B_1 / dY``: ``max_l λ_max(W_1 diag(w ⊙ s_2l^2) W_1^T ||Y_l||^2 + a_l Y_l^T + Y_l a_l^T +
      Σ_f w_f s_1lf^2 I)``, ``a_l = W_1 (w ⊙ s_1l ⊙ s_2l)``; ``d B_2 / dY``: ``d max_l λ_max(W_1 diag(s_1l^2)
      W_1^T)``;
    * ``ξ_21``: ``d max_f λ_max(Y^T diag(s_1f^2) Y)``; ``ξ_12``: ``max_f Σ_l s_1lf^2 ||Y_l||^2``;
      ``ξ_11``: ``max_f w_f λ_max(Y^T diag(s_2f^2 ||Y_l||^2) Y)``; ``ξ_22 = 0``.
    """
    d = Y.shape[-1]
    f: dict[str, float] = {}
    act, s1, s2 = ffn.activation_derivatives(Y @ W_1, activation)
    w2 = (W_2 * W_2).sum(-1)  # ||W_2[f]||^2
    y2 = (Y * Y).sum(-1)  # ||Y_l||^2
    eye = torch.eye(d, dtype=Y.dtype, device=Y.device)
    relu = activation == "relu"  # σ'' = 0: every term with s_2 vanishes
    f["J_SY"] = float(
        torch.linalg.matrix_norm(torch.einsum("fm,lf,af->lma", W_2, s1, W_1) + eye, ord=2).max()
    )
    f["H_SY"] = 0.0 if relu else _hsy_norm(W_1, W_2, s2)
    f["B_W2"] = float(torch.linalg.matrix_norm(act, ord=2))
    s1s1 = s1.T @ s1
    f["dJSY_W2"] = math.sqrt(max(_top_eig(s1s1 * (W_1.T @ W_1)), 0.0))
    if relu:
        f["dJSY_W1"] = math.sqrt(max(_top_eig(s1s1 * (W_2 @ W_2.T)), 0.0))
    else:

        def q_jsy_w1(delta: Tensor) -> Tensor:
            m = torch.einsum("fm,lf,af->lma", W_2, s1, delta)
            m = m + torch.einsum("fm,lf,af->lma", W_2, s2 * (Y @ delta), W_1)
            return (m * m).sum()

        f["dJSY_W1"] = quadratic_norm(q_jsy_w1, tuple(W_1.shape), Y, iters, seed)
    a_rows = (w2 * s1 * s2) @ W_1.T  # L x d
    b1 = torch.einsum("af,lf,bf->lab", W_1, w2 * s2 * s2 * y2[:, None], W_1)
    b1 = b1 + a_rows[:, :, None] * Y[:, None, :] + Y[:, :, None] * a_rows[:, None, :]
    b1 = b1 + (w2 * s1 * s1).sum(-1)[:, None, None] * eye
    f["dBW1_Y"] = math.sqrt(max(_top_eig(b1), 0.0))
    f["dBW2_Y"] = math.sqrt(max(d * _top_eig(torch.einsum("af,lf,bf->lab", W_1, s1 * s1, W_1)), 0.0))
    xi_21 = d * _top_eig(torch.einsum("la,lf,lb->fab", Y, s1 * s1, Y))
    xi_11 = (
        0.0
        if relu
        else _top_eig(torch.einsum("la,lf,lb->fab", Y, s2 * s2 * y2[:, None], Y) * w2[:, None, None])
    )
    return f, {
        ("W2", "W1"): math.sqrt(max(xi_21, 0.0)),
        ("W1", "W2"): math.sqrt(float((s1 * s1 * y2[:, None]).sum(0).max())),
        ("W1", "W1"): math.sqrt(max(xi_11, 0.0)),
        ("W2", "W2"): 0.0,
    }


def _hsy_norm(W_1: Tensor, W_2: Tensor, s2: Tensor, chunk: int = 16) -> float:
    """Flat norm of ``d J_SY / dY`` (GELU): rows do not interact, row ``l`` is ``Σ_f W_2[f,m] s_2lf W_1[a,f]
    W_1[b,f]`` as a ``d^2 x d`` matrix (the maximum over rows, ``chunk`` rows at a time)."""
    d = W_1.shape[0]
    best = 0.0
    for start in range(0, s2.shape[0], chunk):
        h = torch.einsum("fm,lf,af,bf->lmab", W_2, s2[start : start + chunk], W_1, W_1)
        best = max(best, float(torch.linalg.matrix_norm(h.reshape(h.shape[0], d * d, d), ord=2).max()))
    return best
