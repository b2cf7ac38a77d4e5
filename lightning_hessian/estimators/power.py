"""Largest-magnitude eigenvalues by power iteration with deflation (for comparison with PyHessian)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_hessian.estimators import draws
from lightning_hessian.estimators._operator import BlockOperator


@dataclass
class PowerResult:
    """Eigenpairs of one block found by power iteration.

    Attributes:
        eigenvalues: Rayleigh quotients in the order found (decreasing magnitude, float64, CPU).
        residuals: Their residual norms on the deflated operator.
        converged: Whether every eigenvalue met the tolerance within ``max_iter`` iterations.
        eigenvectors: ``(n, k)`` unit vectors, in the operator's dtype/device.
        matvecs: Products with the block.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: bool
    eigenvectors: Tensor
    matvecs: int


@dataclass
class _Deflation:
    """Power-iteration state of one block: the eigenpairs found so far and the current iterate."""

    vector: Tensor
    generator: torch.Generator
    values: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    vectors: list[Tensor] = field(default_factory=list)
    iterations: int = 0
    matvecs: int = 0

    def project_out(self, v: Tensor) -> Tensor:
        """``(I - U U^T) v`` against the eigenvectors found so far (twice, for orthogonality)."""
        if not self.vectors:
            return v
        u = torch.stack(self.vectors, dim=1)
        for _ in range(2):
            v = v - u @ (u.T @ v)
        return v


def power_iteration(
    op: BlockOperator,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
    seed: int = 0,
) -> list[PowerResult]:
    """The k eigenvalues of largest magnitude of every block, by power iteration with deflation.

    This is the method PyHessian uses (Yao, Gholami, Keutzer & Mahoney 2020), provided for comparison only:
    it finds eigenvalues of largest *magnitude* (a large negative one comes before a small positive one) and
    converges at the rate ``|lambda_{i+1} / lambda_i|`` per matvec, far slower than :func:`lanczos`.

    Eigenvalue i iterates ``v <- P A v / ||P A v||`` with ``P = I - U U^T`` the projection against the
    eigenvectors ``U`` found before it (deflation; ``v`` stays orthogonal to ``U``). It is accepted when the
    residual ``||P A v - lambda v|| <= tol * |lambda|``, ``lambda = v^T A v`` (or when that residual is at the
    rounding level ``10 eps`` of the largest magnitude found), or after ``max_iter`` iterations, unconverged.

    All blocks run together: every iteration makes one ``op.matmat`` call with one vector per block still
    running.

    Args:
        op: The block-diagonal symmetric operator.
        k: Number of eigenvalues per block; truncated to the block size.
        tol: Relative residual tolerance.
        max_iter: Maximum number of iterations per eigenvalue.
        seed: Seed of the random start vectors (drawn per block on the CPU in float64).

    Returns:
        One :class:`PowerResult` per block.
    """
    if k < 1 or max_iter < 1 or tol < 0:
        raise ValueError(f"Need k >= 1, max_iter >= 1, tol >= 0; got k={k}, max_iter={max_iter}, tol={tol}.")
    floor = 10 * torch.finfo(op.dtype).eps
    states = []
    for b, n in enumerate(op.sizes):
        gen = draws.generator(seed, draws.POWER, b)
        states.append(_Deflation(draws.to_operator(draws.unit(n, gen), op), gen))

    running = set(range(len(op.sizes)))
    while running:
        products = op.matmat([s.vector[:, None] if b in running else None for b, s in enumerate(states)])
        for b in sorted(running):
            state, v = states[b], states[b].vector
            w = state.project_out(products[b][:, 0])
            value = float(torch.dot(v.double(), w.double()))
            residual = float((w - value * v).norm())
            state.iterations += 1
            state.matvecs += 1
            scale = max([abs(value), *(abs(x) for x in state.values)])
            ok = residual <= max(tol * abs(value), floor * scale)
            if not ok and state.iterations < max_iter:
                state.vector = w / w.norm()
                continue
            state.values.append(value)
            state.residuals.append(residual)
            state.converged.append(ok)
            state.vectors.append(v)
            if len(state.values) == min(k, op.sizes[b]):
                running.discard(b)
                continue
            fresh = state.project_out(draws.to_operator(draws.unit(op.sizes[b], state.generator), op))
            state.vector, state.iterations = fresh / fresh.norm(), 0

    return [
        PowerResult(
            eigenvalues=torch.tensor(s.values, dtype=torch.float64),
            residuals=torch.tensor(s.residuals, dtype=torch.float64),
            converged=all(s.converged),
            eigenvectors=torch.stack(s.vectors, dim=1),
            matvecs=s.matvecs,
        )
        for s in states
    ]
