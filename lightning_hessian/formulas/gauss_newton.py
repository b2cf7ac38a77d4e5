r"""The exact Gauss-Newton norm of a multi-sequence, multi-head attention layer's mean-squared error.

For sequences ``s = 1..S`` (inputs ``X_s``, ``L x d_V``) and one head's weights ``W_Q, W_K, W_V``, the
single-layer mean-squared error averaged over the sequences, ``l = (1/S) Σ_s ||F_s - T_s||_F^2 / (L d_O)``,
has the outer-product (Gauss-Newton) block ([O] Thm 3.1, [P] §3)

.. math::

    H_o(W_b, W_b) = c \, \frac{1}{S} \sum_s J_{b,s}^\top J_{b,s},\qquad c = \frac{2}{L d_O},\qquad
    J_{b,s} = \frac{\partial \operatorname{vec}_r F_s}{\partial \operatorname{vec}_r W_b^\top}.

It needs no target, and its spectral norm ``c λ_max((1/S) Σ_s J_s^T J_s)`` is what the measured curvature of
the block would be if the loss were this layer's mean-squared error with the residual's curvature left out.
It is *not* the mean of the per-sequence norms ``c ||J_s||_2^2`` (:func:`.attention.jacobian_norms`), which
only bounds it from above (``λ_max`` of a mean is at most the mean of the ``λ_max``): the per-sequence top
directions differ, and a mean over a few sampled sequences is noisy.

How it is computed:

* ``W_V``: ``J_{V,s} = (A_s X_s) ⊗ I`` (row-major), so the Gram matrix is ``M ⊗ I`` with the small
  ``d_V x d_V`` matrix ``M = (1/S) Σ_s (A_s X_s)^T (A_s X_s)``: formed and ``eigvalsh``'d, exact.
* ``W_Q``, ``W_K``: matrix-free Lanczos on the averaged Gram operator ``v -> (1/S) Σ_s J_s^T (J_s v)``,
  every head one block of one batched Lanczos loop. Dense would mean forming each ``J_s``
  (``L d_O x d_V d_K``) or the ``(d_V d_K)^2`` Gram matrix: at ``d_V = 768, d_K = 64`` that is 2.4e9 entries
  per head. One matrix-free product costs ``O(S (L^2 d_V + L d_V d_K))`` per head; the softmax is
  recomputed ``chunk`` sequences at a time, so memory is ``O(chunk H L^2)`` plus the Lanczos vectors,
  whatever ``S``. The Ritz value approaches ``λ_max`` from below and is exact (to rounding) once the Krylov
  space is exhausted (at most ``d_V d_K`` steps).

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, arXiv:2410.10986 (ICLR 2025), Thm 3.1.
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, arXiv:2510.16927, §3.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ._linalg import batched_top_eigenvalue
from .attention import NAMES, AttentionState

__all__ = ["gauss_newton_norms"]


def _check(X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor) -> None:
    if X.dim() != 3:
        raise ValueError(f"X must be (sequences, L, d_V), got shape {tuple(X.shape)}")
    for name, w in (("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V)):
        if w.dim() != 3 or w.shape[1] != X.shape[-1]:
            raise ValueError(f"{name} must be (heads, {X.shape[-1]}, d), got shape {tuple(w.shape)}")
    if not (W_Q.shape == W_K.shape and W_Q.shape[0] == W_V.shape[0]):
        raise ValueError(
            f"W_Q, W_K, W_V disagree: {tuple(W_Q.shape)}, {tuple(W_K.shape)}, {tuple(W_V.shape)}"
        )


def gauss_newton_norms(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    *,
    c: float | None = None,
    tau: float | None = None,
    mask: Tensor | None = None,
    iters: int = 100,
    seed: int = 0,
    chunk: int = 32,
) -> dict[str, Tensor]:
    r"""Per head, ``c λ_max((1/S) Σ_s J_s^T J_s)`` for the query, key and value weights.

    Args:
        X: The sequences, ``(S, L, d_V)`` (append a ones column to include biases, as in
            :mod:`.attention`).
        W_Q, W_K: ``(H, d_V, d_K)``, one slice per head.
        W_V: ``(H, d_V, d_O)``.
        c: The loss's ``d^2 l / dF^2`` factor; default ``2 / (L d_O)`` (one head's own mean-squared error).
            For a layer whose loss is the mean-squared error of the heads' concatenation (width ``d``) pass
            ``2 / (L d)``.
        tau: Temperature replacing ``sqrt(d_K)``.
        mask: Optional bool ``(L, L)`` attention mask, as in :func:`.attention.forward`.
        iters: Lanczos steps for ``W_Q`` and ``W_K`` (at most ``d_V d_K`` are useful).
        seed: Seed of the Lanczos start vectors.
        chunk: Sequences per batched product (memory ``chunk x H x L^2``).

    Returns:
        ``{"Q", "K", "V"}`` -> tensor of shape ``(H,)``.
    """
    _check(X, W_Q, W_K, W_V)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    n_seq, length = X.shape[0], X.shape[1]
    scale = 2.0 / (length * W_V.shape[-1]) if c is None else float(c)

    def states() -> Iterator[AttentionState]:
        # Sequences x heads broadcast, a chunk of sequences at a time; recomputed at every product so that
        # memory stays at one chunk's softmax whatever the number of sequences.
        for s in range(0, n_seq, chunk):
            yield AttentionState(X[s : s + chunk, None], W_Q[None], W_K[None], W_V[None], None, tau, mask)

    heads = W_Q.shape[0]
    gram_v = sum(torch.einsum("shli,shlj->hij", st.a @ st.X, st.a @ st.X) for st in states()) / n_seq
    out = {"V": scale * torch.linalg.eigvalsh(gram_v)[:, -1]}
    for name in ("Q", "K"):
        shape = tuple(W_Q.shape[1:])

        def gram(v: Tensor, name: str = name, shape: tuple[int, ...] = shape) -> Tensor:
            u = v.reshape(heads, *shape)
            total = sum(st.vjp(name, st.jvp(name, u)).sum(0) for st in states())
            return (total / n_seq).reshape(heads, -1)

        n = shape[0] * shape[1]
        out[name] = scale * batched_top_eigenvalue(gram, (heads,), n, iters=iters, like=X, seed=seed)
    return {k: out[k] for k in NAMES}
