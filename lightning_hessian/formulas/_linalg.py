"""Shared linear-algebra helpers of :mod:`lightning_hessian.formulas` (private).

Conventions (docs/formulas.md §1): ``vec_r`` is row-major vectorisation (``M.reshape(-1)``), so that
``vec_r(A X B) = (A ⊗ B^T) vec_r(X)``. A Jacobian is ``d vec_r(N) / d vec_r(W)^T`` and a second derivative is
``d vec_r(dN/dW_i) / d vec_r(W_j)^T``, a ``(n_N * n_i) x n_j`` matrix. Internally second derivatives are often
kept as 3-tensors ``H[o, i, j] = d^2 N_o / dW_i dW_j``; ``H.reshape(n_N * n_i, n_j)`` is the flattened form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

from lightning_hessian.estimators import lanczos

__all__ = ["HessianBlock"]


@dataclass(frozen=True, eq=False)
class HessianBlock:
    """One block ``H(W_a, W_b)`` of a loss Hessian, split as ``H = H_o + H_f``.

    Attributes:
        outer: The outer-product (Gauss-Newton) part ``H_o = J_a^T (d^2 l / dF^2) J_b``.
        functional: The functional part ``H_f = (dl/dF ⊗ I) d^2 F / dW_a dW_b``.
    """

    outer: Tensor
    functional: Tensor

    @property
    def total(self) -> Tensor:
        """The whole block ``H_o + H_f``."""
        return self.outer + self.functional


def eye(n: int, like: Tensor) -> Tensor:
    """Identity matrix of size ``n`` with the dtype and device of ``like``."""
    return torch.eye(n, dtype=like.dtype, device=like.device)


def kron(*mats: Tensor) -> Tensor:
    """Kronecker product of two or more matrices, left to right."""
    # torch.kron needs contiguous inputs (it views), and transposes are common here.
    return reduce(lambda x, y: torch.kron(x.contiguous(), y.contiguous()), mats)


def commutation(m: int, n: int, like: Tensor) -> Tensor:
    """Commutation matrix ``K_{m,n}`` (size ``mn x mn``).

    ``K_{m,n} vec_r(B) = vec_r(B^T)`` for ``B`` of shape ``n x m``; in code ``K[i*n + j, j*m + i] = 1``.
    This is the convention of [P] (its Definition of the commutation matrix, stated for column-major
    ``vec``).
    """
    k = torch.zeros(m * n, m * n, dtype=like.dtype, device=like.device)
    i = torch.arange(m, device=like.device).repeat_interleave(n)
    j = torch.arange(n, device=like.device).repeat(m)
    k[i * n + j, j * m + i] = 1
    return k


def vec_r_col(mat: Tensor) -> Tensor:
    """``vec_r(mat)`` as a column vector (``numel x 1``)."""
    return mat.reshape(-1, 1)


def diag_embedding_jacobian(n: int, like: Tensor) -> Tensor:
    """``d vec_r(diag(u)) / du^T = [e_1 ⊗ e_1, ..., e_n ⊗ e_n]`` (size ``n^2 x n``), [P] Prop. on ``diag``."""
    e = torch.zeros(n * n, n, dtype=like.dtype, device=like.device)
    idx = torch.arange(n, device=like.device)
    e[idx * n + idx, idx] = 1
    return e


def spectral_norm(mat: Tensor) -> Tensor:
    """Largest singular value of the trailing two dimensions (batched)."""
    if mat.numel() == 0:
        return mat.new_zeros(mat.shape[:-2])
    return torch.linalg.matrix_norm(mat, ord=2)


# ==========================================================================================================
# Row-wise softmax and its derivatives ([O] Lemma C.1)
# ==========================================================================================================


def softmax_jvp(a: Tensor, dt: Tensor) -> Tensor:
    """Row-wise softmax Jacobian applied to ``dt``: row ``i`` is ``(diag(a_i) - a_i a_i^T) dt_i``.

    The per-row Jacobian is symmetric, so the same expression is the vector-Jacobian product. Broadcasts.
    """
    return a * (dt - (a * dt).sum(-1, keepdim=True))


def softmax_jacobian(a: Tensor) -> Tensor:
    """Dense ``dA/dT = blockdiag_i(diag(a_i) - a_i a_i^T)`` (``L^2 x L^2``) of a row-softmax ``A``."""
    blocks = torch.diag_embed(a) - a.unsqueeze(-1) * a.unsqueeze(-2)
    return torch.block_diag(*blocks)


def softmax_hessian(a: Tensor) -> Tensor:
    """Dense ``d^2 A / dT^2 = d vec_r(dA/dT) / d vec_r(T)^T`` (``L^4 x L^2``) of a row-softmax ``A``.

    Per row ``i`` ([O] Lemma C.1): ``d^2 a_j / dt_k dt_l = a_j (δ_jk δ_jl - δ_jk a_l - δ_jl a_k + 2 a_k a_l -
    δ_kl a_k)``; rows do not interact, so the entry ``[(i, j), (i', k)], (i'', l)`` is zero unless
    ``i = i' = i''``.
    """
    n = a.shape[-1]
    d = eye(n, a)
    # t3[i, j, k, l] = d J_i[j, k] / d t_{i, l}
    t3 = (
        torch.einsum("ij,jk,jl->ijkl", a, d, d)
        - torch.einsum("ij,jk,il->ijkl", a, d, a)
        - torch.einsum("ij,jl,ik->ijkl", a, d, a)
        + 2 * torch.einsum("ij,ik,il->ijkl", a, a, a)
        - torch.einsum("ij,kl,ik->ijkl", a, d, a)
    )
    full = torch.zeros(n, n, n, n, n, n, dtype=a.dtype, device=a.device)
    idx = torch.arange(n, device=a.device)
    full[idx, :, idx, :, idx, :] = t3
    return full.reshape(n**4, n**2)


def softmax_jacobian_row_norms(a: Tensor) -> Tensor:
    """Per-row spectral norms ``s_i = ||diag(a_i) - a_i a_i^T||_2`` (shape ``(..., L)``); ``s_i <= 1/2``."""
    blocks = torch.diag_embed(a) - a.unsqueeze(-1) * a.unsqueeze(-2)
    # The blocks are positive semi-definite, so the norm is the largest eigenvalue.
    return torch.linalg.eigvalsh(blocks)[..., -1].clamp_min(0)


# ==========================================================================================================
# Second-order chain rule on dense 3-tensors
# ==========================================================================================================


def chain_second(j_out: Tensor, h_out: Tensor, j_in: Tensor, h_in: Tensor) -> Tensor:
    """Second derivative of ``g(p(θ))`` from the pieces of ``g`` and ``p``.

    With ``J_g = dg/dp`` (``n_g x n_p``), ``H_g[o, p, q]``, ``J_p = dp/dθ`` (``n_p x n_θ``) and
    ``H_p[p, i, j]``:
    ``H[o, i, j] = sum_p J_g[o, p] H_p[p, i, j] + sum_{p,q} H_g[o, p, q] J_p[p, i] J_p[q, j]``, i.e. in
    flattened Kronecker form ``(J_g ⊗ I) H_p + (I ⊗ J_p^T) H_g J_p`` ([P] Thm 5 is this identity with
    g = LayerNorm).
    """
    return torch.einsum("op,pij->oij", j_out, h_in) + torch.einsum("opq,pi,qj->oij", h_out, j_in, j_in)


# ==========================================================================================================
# Matrix-free helpers
# ==========================================================================================================


class _MatvecOperator:
    """A single symmetric block given by a flat ``matvec``, as an estimators ``BlockOperator``."""

    def __init__(self, matvec: Callable[[Tensor], Tensor], n: int, like: Tensor) -> None:
        self.matvec, self.sizes, self.dtype, self.device = matvec, (n,), like.dtype, like.device

    def matmat(self, vectors: list[Tensor | None]) -> list[Tensor | None]:
        (columns,) = vectors
        return [None if columns is None else torch.stack([self.matvec(c) for c in columns.T], dim=1)]


def extreme_eigenvalues(
    matvec: Callable[[Tensor], Tensor], n: int, *, iters: int, like: Tensor, seed: int = 0
) -> tuple[float, float]:
    """``(λ_min, λ_max)`` of a symmetric operator by the package's Lanczos (:func:`lanczos`).

    At most ``min(iters, n)`` steps with full reorthogonalisation, stopped at a relative Ritz residual of
    1e-10; the Ritz values approach the extreme eigenvalues from inside and are exact (to rounding) once the
    Krylov space is invariant. Memory: ``iters`` vectors of length ``n``.

    Args:
        matvec: ``v -> H v`` on flat vectors of length ``n``.
        n: Dimension.
        iters: Maximum number of Lanczos steps.
        like: Tensor giving dtype and device.
        seed: Seed of the random start vector (reproducible across devices).
    """
    result = lanczos(_MatvecOperator(matvec, n, like), 1, tol=1e-10, max_iter=max(1, int(iters)), seed=seed)[
        0
    ]
    return float(result.min_eigenvalue), float(result.eigenvalues[0])


class _BatchedOperator:
    """A batch of same-sized symmetric operators, given by one batched ``matvec``, as the blocks of an
    estimators ``BlockOperator``: the package's Lanczos then runs all of them in one loop."""

    def __init__(
        self, matvec: Callable[[Tensor], Tensor], batch: tuple[int, ...], n: int, like: Tensor
    ) -> None:
        self.matvec, self.batch, self.n = matvec, batch, n
        self.count = math.prod(batch)
        self.sizes, self.dtype, self.device = (n,) * self.count, like.dtype, like.device

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        width = max((v.shape[1] for v in vectors if v is not None), default=0)
        stacked = torch.zeros(width, self.count, self.n, dtype=self.dtype, device=self.device)
        for b, v in enumerate(vectors):
            if v is not None:
                stacked[: v.shape[1], b] = v.T
        products = torch.stack(
            [self.matvec(c.reshape(*self.batch, self.n)).reshape(self.count, self.n) for c in stacked]
        )
        return [None if v is None else products[: v.shape[1], b].T for b, v in enumerate(vectors)]


def batched_top_eigenvalue(
    matvec: Callable[[Tensor], Tensor],
    batch: tuple[int, ...],
    n: int,
    *,
    iters: int,
    like: Tensor,
    seed: int = 0,
) -> Tensor:
    """Largest eigenvalue of each symmetric operator of a batch, by the package's Lanczos (:func:`lanczos`).

    ``matvec`` maps ``(*batch, n)`` to ``(*batch, n)``, one operator per batch index; every operator is a
    block of one block-diagonal operator, so each Lanczos step is one batched product. At most
    ``min(iters, n)`` steps, stopped per operator at a relative Ritz residual of 1e-10 (as
    :func:`extreme_eigenvalues`); the Ritz value approaches the top eigenvalue from below.

    Returns:
        A tensor of shape ``batch``.
    """
    op = _BatchedOperator(matvec, batch, n, like)
    results = lanczos(
        op, 1, smallest=False, tol=1e-10, max_iter=max(1, int(iters)), seed=seed, return_eigenvectors=False
    )
    return torch.tensor([float(r.eigenvalues[0]) for r in results], dtype=like.dtype).reshape(batch)


def symmetric_spectral_norm(
    matvec: Callable[[Tensor], Tensor], n: int, *, iters: int, like: Tensor, seed: int = 0
) -> float:
    """``||H||_2 = max |λ(H)|`` of a symmetric operator via Lanczos (see :func:`extreme_eigenvalues`)."""
    return max(abs(v) for v in extreme_eigenvalues(matvec, n, iters=iters, like=like, seed=seed))


def frobenius_from_matvec(
    matvec: Callable[[Tensor], Tensor], n: int, *, like: Tensor, chunk: int = 256
) -> float:
    """Frobenius norm of an operator from ``n`` matvecs with the basis vectors, ``chunk`` at a time.

    ``matvec`` maps a batch ``(b, n)`` of flat vectors to ``(b, m)``. Cost: ``n`` matvecs; memory: one chunk.
    """
    total = 0.0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        basis = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        total += float((matvec(basis) ** 2).sum())
    return math.sqrt(total)
