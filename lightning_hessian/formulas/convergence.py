r"""How the empirical loss landscape changes when one sample is added ([P] Thm 7, [K]).

``L_k(w) = (1/k) Σ_{i<=k} l_i(w)`` is the mean of the first ``k`` per-sample losses. Exactly,
``L_{k+1}(w) - L_k(w) = (l_{k+1}(w) - L_k(w)) / (k+1)``. Expanding every ``l_i`` to second order around ``w*``
with ``D = w - w*``, ``g_i = ∇l_i(w*)`` and ``H_i = ∇^2 l_i(w*)`` (docs/formulas.md §6):

    L_{k+1}(w) - L_k(w) = [l_{k+1}(w*) - L_k(w*)] / (k+1)                      (value term)
                        + [g_{k+1}^T D - mean_{i<=k} g_i^T D] / (k+1)            (gradient term)
                        + (1/2) [D^T H_{k+1} D - mean_{i<=k} D^T H_i D] / (k+1)   (curvature term)
                        + O(||D||^3).

[P] (Assumption 1) takes ``w*`` stationary for both ``L_k`` and ``L_{k+1}``, which makes the gradient term
vanish, and bounds the rest by Thm 7: ``|L_{k+1}(w) - L_k(w)| <= 2 l_max/(k+1) + M ||w - w*||^2 / (k+1)`` with
``0 <= l_i(w*) <= l_max`` and ``||H_i(w*)||_2 <= M`` for all ``i`` (for the self-attention layer ``M`` comes
from :func:`lightning_hessian.formulas.attention.hessian_bound`, for the block from
:func:`lightning_hessian.formulas.ffn.block_loss_hessian_bound`).

Caveat: evaluated at ``w = w*`` the curvature term vanishes and the identity is trivial; a faithful experiment
evaluates away from ``w*`` and reports the terms separately, which :func:`loss_difference_terms` does.

References:
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, arXiv:2510.16927, Thm 7 (convergence of
        self-attention and Transformer blocks).
    [K] N. Kiselev, A. Grabovoy, "Unraveling the Hessian: A Key to Smooth Convergence in Loss Function
        Landscapes", arXiv:2409.11995 (the same Taylor argument for fully connected networks).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["loss_difference_terms", "loss_differences", "theorem7_bound"]


def theorem7_bound(
    k: int | Tensor, loss_max: float | Tensor, hessian_bound: float | Tensor, distance: float | Tensor
) -> float | Tensor:
    """[P] Thm 7: ``2 l_max / (k+1) + M ||w - w*||^2 / (k+1)``.

    Args:
        k: Number of samples already included (``k >= 1``); a tensor gives the bound for every ``k``.
        loss_max: ``l_max >= l_i(w*)`` for all samples (the paper writes ``L``; renamed to avoid a clash with
            the sequence length).
        hessian_bound: ``M >= ||∇^2 l_i(w*)||_2`` for all samples.
        distance: ``||w - w*||_2`` (not squared).
    """
    return 2 * loss_max / (k + 1) + hessian_bound * distance**2 / (k + 1)


def loss_differences(losses: Tensor) -> Tensor:
    """``L_{k+1}(w) - L_k(w)`` for ``k = 1..n-1`` from per-sample losses ``l_1(w), ..., l_n(w)`` (data order).

    Computed as ``(l_{k+1} - L_k) / (k+1)`` from prefix means (exact, no Taylor expansion). Returns ``n - 1``
    signed values; take ``.abs()`` for the quantity that Thm 7 bounds.
    """
    losses = torch.as_tensor(losses)
    k = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)
    prefix = torch.cumsum(losses, 0) / k
    return (losses[1:] - prefix[:-1]) / k[1:]


def _prefix_term(values: Tensor) -> Tensor:
    """``(v_{k+1} - mean_{i<=k} v_i) / (k+1)`` for ``k = 1..n-1``."""
    return loss_differences(values)


def loss_difference_terms(
    losses: Tensor,
    losses_at_optimum: Tensor | None = None,
    directional_gradients: Tensor | None = None,
    quadratic_forms: Tensor | None = None,
) -> dict[str, Tensor]:
    """Estimate ``L_{k+1}(w) - L_k(w)`` and split it into the terms of the Taylor identity (module docstring).

    Args:
        losses: Per-sample losses ``l_i(w)`` at the evaluation point ``w`` (``(n,)``, data order).
        losses_at_optimum: ``l_i(w*)`` (``(n,)``), for the value term.
        directional_gradients: ``g_i^T D = ∇l_i(w*)^T (w - w*)`` (``(n,)``), for the gradient term (zero under
            [P]'s Assumption 1; supply it when ``w*`` is only stationary for the full data set).
        quadratic_forms: ``D^T ∇^2 l_i(w*) D`` (``(n,)``), for the curvature term (e.g. one Hessian-vector
            product per sample).

    Returns:
        ``"k"`` (``1..n-1``) and ``"observed"`` (``L_{k+1}(w) - L_k(w)``, exact) always; ``"value"``,
        ``"gradient"``, ``"curvature"`` when their inputs are given; ``"remainder"`` = observed minus the
        available terms when all three are given (``O(||D||^3)``; zero for quadratic losses). All signed,
        length ``n - 1``.
    """
    losses = torch.as_tensor(losses)
    out = {
        "k": torch.arange(1, losses.shape[0], device=losses.device),
        "observed": loss_differences(losses),
    }
    if losses_at_optimum is not None:
        out["value"] = _prefix_term(torch.as_tensor(losses_at_optimum))
    if directional_gradients is not None:
        out["gradient"] = _prefix_term(torch.as_tensor(directional_gradients))
    if quadratic_forms is not None:
        out["curvature"] = 0.5 * _prefix_term(torch.as_tensor(quadratic_forms))
    if all(name in out for name in ("value", "gradient", "curvature")):
        out["remainder"] = out["observed"] - out["value"] - out["gradient"] - out["curvature"]
    return out
