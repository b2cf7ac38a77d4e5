r"""Curvature-aligned loss-landscape stabilisation ([KG], docs/formulas.md §6a).

The loss increment field: with ``L_k(w) = (1/k) Σ_{i<=k} l_i(w)`` the mean of the first ``k`` per-sample
losses, ``Δ_k(w) = L_{k+1}(w) - L_k(w) = (l_{k+1}(w) - L_k(w)) / (k+1)``. [KG]'s curvature-aligned criterion
averages its square over probes in the top-``D`` eigenspace of the empirical Hessian at ``w*``:

    Δ_2^(D)(k) = E_{z ~ N(0, σ² I_D)} [Δ_k(w* + U z)^2],      U = (u_1 .. u_D) orthonormal, P x D.

Closed form under the local quadratic model. Write every per-sample loss to second order in the subspace,
``l_i(w* + Uz) = l_i + β_i^T z + (1/2) z^T K_i z`` with ``l_i = l_i(w*)``, ``β_i = U^T ∇l_i(w*)`` and
``K_i = U^T ∇²l_i(w*) U`` (``D x D``). Then ``(k+1) Δ_k(w* + Uz) = a + b^T z + (1/2) z^T C z`` with the
sample-``(k+1)``-minus-prefix-mean differences ``a = l_{k+1} - mean_{i<=k} l_i``, ``b = β_{k+1} - mean β_i``,
``C = K_{k+1} - mean K_i``. Gaussian moments (odd ones vanish, ``E[z z^T] = σ² I``,
``E[(z^T C z)^2] = σ⁴ ((tr C)² + 2 tr C²)`` for symmetric ``C``) give

    Δ_2^(D)(k) = [ (a + σ²/2 tr C)^2 + σ² ||b||² + (σ⁴/2) ||C||_F² ] / (k+1)^2
               = [ (a + σ²/2 Σ_j μ_j)^2 + σ² Σ_j (b^T e_j)^2 + (σ⁴/2) Σ_j μ_j^2 ] / (k+1)^2,

the second line in the eigenpairs ``(μ_j, e_j)`` of ``C`` (the spectral form). The bracket is bounded when the
per-sample values, projected gradients and projected Hessians are, so ``Δ_2^(D) = O(k^-2)``, with constants
that depend on ``D`` (through ``tr C`` and ``||C||_F``), not on the number of parameters. The formula needs
no eigenvectors: it holds for any orthonormal ``U``; taking the top-``D`` eigenvectors is [KG]'s choice of
where to look. ``U = I`` gives the full-space criterion with isotropic probes.

Expected criterion for i.i.d. samples (what a training run can measure). If the samples are drawn i.i.d.,
``l_{k+1}(w)`` is independent of ``L_k(w)`` with the same mean, so ``E_data[Δ_k(w)^2] = Var(l(w)) (1 + 1/k) /
(k+1)^2 = Var(l(w)) / (k (k+1))``, and averaging over the probes

    E_data Δ_2^(D)(k) = S_D / (k (k+1)),     S_D = E_z Var_i[l_i(w* + Uz)].

From ``n`` samples, with ``a_i, b_i, C_i`` now sample-minus-batch-mean differences, the closed form above
applied per sample and summed with ``1/(n-1)`` is an unbiased estimate of ``S_D`` under the quadratic model
(for each fixed ``z`` the sample variance is unbiased, and the expectation over ``z`` is exact). ``S_D`` is
the landscape's information: the ``k``-dependence ``1/(k(k+1))`` is the running-mean identity and holds for
any bounded losses ([P] Thm 7's caveat, docs/formulas.md §6), so a live curve of ``S_D / (k(k+1))`` against
samples seen is ``O(k^-2)`` exactly when ``S_D`` stays bounded.

Direct Monte Carlo (no quadratic model): draw ``z_1..z_m``, evaluate every per-sample loss at
``w* + U z_j`` and average the squared increments, :func:`monte_carlo_criterion`.

References:
    [KG] N. Kiselev, A. Grabovoy, "Curvature-Aligned Probing for Local Loss-Landscape Stabilization",
        arXiv:2604.14870 (criterion Δ_2^(D), its closed-form spectral expression and estimators).
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, arXiv:2510.16927, Thm 7.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .convergence import loss_differences

__all__ = [
    "expected_criterion",
    "gaussian_probes",
    "monte_carlo_criterion",
    "probe_moment",
    "probe_variance",
    "subspace_criterion",
]


def _check(values: Tensor, gradients: Tensor, hessians: Tensor, sigma: float) -> tuple[Tensor, ...]:
    values, gradients, hessians = (torch.as_tensor(t) for t in (values, gradients, hessians))
    n = values.shape[0] if values.ndim == 1 else -1
    d = gradients.shape[-1] if gradients.ndim == 2 else -1
    if n < 2 or gradients.shape != (n, d) or hessians.shape != (n, d, d):
        raise ValueError(
            "Expected per-sample values (n,), projected gradients U^T g_i (n, D) and projected Hessians "
            f"U^T H_i U (n, D, D) with n >= 2; got shapes {tuple(values.shape)}, {tuple(gradients.shape)}, "
            f"{tuple(hessians.shape)}."
        )
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(
            f"sigma (the probe's standard deviation per subspace coordinate) must be >= 0, got {sigma!r}."
        )
    return values, gradients, hessians


def probe_moment(a: Tensor, b: Tensor, c: Tensor, sigma: float) -> Tensor:
    """``E_z[(a + b^T z + z^T C z / 2)^2]`` for ``z ~ N(0, σ² I_D)``, batched over leading dimensions.

    ``(a + σ²/2 tr C)^2 + σ² ||b||² + (σ⁴/2) ||C||_F²`` (module docstring); ``C`` is symmetrised first.

    Args:
        a: values ``(...)``. b: gradients ``(..., D)``. c: Hessians ``(..., D, D)``. sigma: probe scale.
    """
    c = 0.5 * (c + c.transpose(-1, -2))
    s2 = sigma * sigma
    trace = c.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (a + 0.5 * s2 * trace) ** 2 + s2 * b.square().sum(-1) + 0.5 * s2 * s2 * c.square().sum((-2, -1))


def _prefix_differences(x: Tensor) -> Tensor:
    """``x_{k+1} - mean_{i<=k} x_i`` for ``k = 1..n-1`` along the first dimension."""
    k = torch.arange(1, x.shape[0] + 1, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    prefix = torch.cumsum(x, 0) / k
    return x[1:] - prefix[:-1]


def subspace_criterion(values: Tensor, gradients: Tensor, hessians: Tensor, sigma: float) -> Tensor:
    """[KG]'s ``Δ_2^(D)(k)`` in closed form, for ``k = 1..n-1``, with the samples in data order.

    Args:
        values: ``l_i(w*)``, ``(n,)``.
        gradients: ``U^T ∇l_i(w*)``, ``(n, D)``.
        hessians: ``U^T ∇²l_i(w*) U``, ``(n, D, D)``.
        sigma: the probes' standard deviation per subspace coordinate (``E||Uz||² = D σ²``).

    Returns:
        ``(n-1,)``: ``E_z[(L_{k+1} - L_k)(w* + Uz)^2]`` under the local quadratic model.
    """
    values, gradients, hessians = _check(values, gradients, hessians, sigma)
    k = torch.arange(1, values.shape[0], dtype=values.dtype, device=values.device)
    moment = probe_moment(
        _prefix_differences(values), _prefix_differences(gradients), _prefix_differences(hessians), sigma
    )
    return moment / (k + 1) ** 2


def probe_variance(values: Tensor, gradients: Tensor, hessians: Tensor, sigma: float) -> Tensor:
    """``S_D = E_z Var_i[l_i(w* + Uz)]``, unbiased from ``n`` samples under the quadratic model (scalar).

    Args: as for :func:`subspace_criterion`, the samples in any order (e.g. one curvature batch).
    """
    values, gradients, hessians = _check(values, gradients, hessians, sigma)
    centred = [t - t.mean(0, keepdim=True) for t in (values, gradients, hessians)]
    return probe_moment(*centred, sigma).sum() / (values.shape[0] - 1)


def expected_criterion(k: int | Tensor, variance: float | Tensor) -> float | Tensor:
    """``E_data Δ_2^(D)(k) = S_D / (k (k+1))`` for i.i.d. samples, ``k >= 1`` samples seen."""
    if isinstance(k, int) and k < 1:
        raise ValueError(f"k (samples seen) must be >= 1, got {k}.")
    return variance / (k * (k + 1))


def monte_carlo_criterion(losses: Tensor) -> tuple[Tensor, Tensor]:
    """Direct Monte Carlo ``Δ_2(k)`` from per-sample losses at ``m`` probe points (no Taylor model).

    Args:
        losses: ``(m, n)``: row ``j`` holds ``l_1..l_n`` at ``w* + U z_j`` (data order), ``z_j`` i.i.d.
            from the probing distribution (e.g. :func:`gaussian_probes`).

    Returns:
        ``(mean, stderr)``, each ``(n-1,)``: the mean of ``Δ_k(w* + U z_j)^2`` over the probes and its
        standard error (NaN for one probe).
    """
    losses = torch.as_tensor(losses)
    if losses.ndim != 2 or losses.shape[1] < 2:
        raise ValueError(f"losses must be (probes, samples) with >= 2 samples, got {tuple(losses.shape)}.")
    squares = torch.stack([loss_differences(row) ** 2 for row in losses])
    m = squares.shape[0]
    stderr = squares.std(0) / math.sqrt(m) if m > 1 else torch.full_like(squares[0], math.nan)
    return squares.mean(0), stderr


def gaussian_probes(
    count: int,
    dim: int,
    sigma: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(count, dim)`` antithetic draws of ``z ~ N(0, σ² I_dim)`` (pairs ``z, -z``: the odd moments cancel
    exactly, which removes the gradient-times-curvature noise of the Monte Carlo estimate)."""
    if count < 2 or count % 2:
        raise ValueError(f"count must be an even number >= 2 (antithetic pairs), got {count}.")
    half = sigma * torch.randn(count // 2, dim, generator=generator, dtype=dtype)
    return torch.cat([half, -half])
