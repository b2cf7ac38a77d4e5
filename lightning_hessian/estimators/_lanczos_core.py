"""Batched Lanczos with full reorthogonalisation, written once and shared by :func:`lanczos` and :func:`slq`.

A :class:`LanczosChains` holds ``m`` independent Lanczos recurrences on one block (one for eigenvalues, one
per probe for quadrature); :func:`run_lanczos` advances the chains of all blocks together, one
:meth:`~lightning_hessian.estimators.BlockOperator.matmat` call per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_hessian.estimators._operator import BlockOperator


class LanczosChains:
    """``m`` independent Lanczos chains on one symmetric block ``A`` of size ``n``, advanced in lockstep.

    Chain c builds an orthonormal basis ``Q = [q_0, ..., q_{L-1}]`` of the Krylov space
    ``K_L(A, q_0) = span{q_0, A q_0, ..., A^{L-1} q_0}`` and the tridiagonal ``T = Q^T A Q`` (diagonal
    ``alpha``, off-diagonal ``beta``) through the Lanczos relation (Lanczos 1950; Golub & Van Loan, *Matrix
    Computations*, 4th ed., Sec. 10.1)::

        A Q = Q T + beta_{L-1} q_L e_L^T.

    The new direction ``A q_j`` is orthogonalised against the whole basis with classical Gram-Schmidt applied
    twice ("twice is enough": Giraud, Langou, Rozloznik & van den Eshof 2005), so the basis stays orthogonal
    to working precision and no spurious copies of converged Ritz values appear. ``alpha_j`` is the sum of the
    two passes' coefficients on ``q_j``; ``beta_j`` is the norm of what remains. ``T`` is kept in float64.

    Breakdown: when ``beta_j <= max(1e-12, 10 eps) * scale`` (``eps`` of the vectors' dtype, ``scale`` the
    largest ``|alpha|`` or ``beta`` seen, a lower bound of ``||T||``), or when ``L == n``, the Krylov space is
    invariant, ``beta_j`` is set to 0 and the chain stops: its Ritz values are then exact eigenvalues.
    :meth:`restart` continues a stopped chain with a new direction orthogonal to the basis (``T`` then becomes
    block diagonal, and the relation above still holds).

    The basis can live on another device than the operator (``basis_device``, e.g. host memory when the
    accelerator's is full): each step then moves the current vectors to the operator's device and their
    products back, one vector each way per chain, and the Gram-Schmidt passes run where the basis is.

    Attributes:
        size: The block dimension ``n``.
        basis: ``(m, capacity, n)`` Lanczos vectors on ``basis_device``; rows past a chain's current vector
            are zero.
        device, basis_device: Where the operator works (the start vectors' device) and where the basis is.
        moves: Vectors moved between the two devices so far (0 when they are the same).
        alphas, betas: Per chain, the diagonal and the off-diagonal of ``T`` plus the last ``beta``.
        lengths: Per chain, the number of steps taken ``L`` (= matvecs = size of ``T``).
        active: Per chain, whether it takes part in the next step.
        broken: Per chain, whether it stopped at breakdown (its Krylov space is invariant).
    """

    def __init__(
        self, start: Tensor, *, capacity: int = 32, basis_device: torch.device | str | None = None
    ) -> None:
        """Starts ``m = start.shape[0]`` chains from the rows of ``start`` (normalised here).

        Args:
            start: ``(m, n)`` nonzero start vectors in the operator's dtype and on its device.
            capacity: Initial number of basis slots; the basis grows by doubling when more are needed.
            basis_device: Where to keep the basis; ``None``: the operator's device (``start.device``).
        """
        m, n = start.shape
        self.size = n
        self.device = start.device
        self.basis_device = start.device if basis_device is None else torch.device(basis_device)
        self.moves = 0
        start = self._move(start, self.basis_device)
        self.basis = start.new_zeros(m, max(1, min(capacity, n)), n)
        self.basis[:, 0] = start / start.norm(dim=1, keepdim=True)
        self.alphas: list[list[float]] = [[] for _ in range(m)]
        self.betas: list[list[float]] = [[] for _ in range(m)]
        self.lengths = [0] * m
        self.active = [True] * m
        self.broken = [False] * m
        self._scale = [0.0] * m
        self._breakdown_tol = max(1e-12, 10 * torch.finfo(start.dtype).eps)
        self._pending: list[int] | None = None

    @property
    def running(self) -> bool:
        return any(self.active)

    def current(self) -> Tensor:
        """The active chains' current vectors ``q_L`` as an ``(n, m_active)`` matrix to multiply by ``A``."""
        self._pending = [c for c, a in enumerate(self.active) if a]
        rows = self.basis[self._pending, [self.lengths[c] for c in self._pending]]
        return self._move(rows, self.device).T.contiguous()

    def advance(self, products: Tensor) -> None:
        """One Lanczos step of the chains handed out by :meth:`current`; ``products = A @ current()``."""
        chains, self._pending = self._pending, None
        if chains is None:
            raise RuntimeError("advance() must follow current().")
        w = self._move(products.T, self.basis_device).to(self.basis.dtype)
        width = max(self.lengths[c] for c in chains) + 1
        basis = self.basis[:, :width] if len(chains) == len(self.active) else self.basis[chains, :width]
        coeffs = torch.zeros_like(w[:, :width])
        for _ in range(2):  # classical Gram-Schmidt, twice
            h = torch.bmm(basis, w.unsqueeze(-1)).squeeze(-1)
            w = w - torch.bmm(h.unsqueeze(1), basis).squeeze(1)
            coeffs += h
        positions = torch.tensor([self.lengths[c] for c in chains], device=coeffs.device)
        alphas = coeffs[torch.arange(len(chains), device=coeffs.device), positions].double().cpu().tolist()
        betas = w.norm(dim=1).double().cpu().tolist()
        for i, c in enumerate(chains):
            length = self.lengths[c] + 1
            self.lengths[c] = length
            self.alphas[c].append(alphas[i])
            self._scale[c] = max(self._scale[c], abs(alphas[i]))
            if length >= self.size or betas[i] <= self._breakdown_tol * self._scale[c]:
                self.betas[c].append(0.0)
                self.active[c], self.broken[c] = False, True
            else:
                self.betas[c].append(betas[i])
                self._scale[c] = max(self._scale[c], betas[i])
                self._reserve(length + 1)
                self.basis[c, length] = w[i] / betas[i]

    def restart(self, chain: int, vector: Tensor) -> bool:
        """Continues a stopped chain from ``vector`` orthogonalised against its basis (``beta`` stays 0).

        Returns:
            Whether it could: ``False`` when ``vector`` lies in the span of the basis.
        """
        length = self.lengths[chain]
        basis = self.basis[chain, :length]
        v = self._move(vector, self.basis_device).to(self.basis.dtype)
        for _ in range(2):
            v = v - basis.T @ (basis @ v)
        norm = float(v.norm())
        if norm <= self._breakdown_tol * float(vector.norm()):
            return False
        self._reserve(length + 1)
        self.basis[chain, length] = v / norm
        self.active[chain], self.broken[chain] = True, False
        return True

    def stop(self) -> None:
        """Takes every chain out of the next steps."""
        self.active = [False] * len(self.active)

    def tridiagonal(self, chain: int) -> Tensor:
        """The chain's ``(L, L)`` tridiagonal ``T = Q^T A Q`` in float64 on the CPU."""
        alpha = torch.tensor(self.alphas[chain], dtype=torch.float64)
        beta = torch.tensor(self.betas[chain][:-1], dtype=torch.float64)
        return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)

    def ritz(self, chain: int) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values, ``T``'s eigenvectors and Ritz residual norms of one chain (float64, CPU).

        With ``T = S diag(theta) S^T`` (``theta`` ascending), the Ritz pair ``(theta_i, Q s_i)`` has residual
        ``||A Q s_i - theta_i Q s_i|| = beta_{L-1} |s_{L-1,i}|`` (Parlett, *The Symmetric Eigenvalue Problem*,
        Sec. 13.1), computed without any matvec.

        Returns:
            ``(theta, S, residuals)`` with shapes ``(L,)``, ``(L, L)``, ``(L,)``.
        """
        theta, s = torch.linalg.eigh(self.tridiagonal(chain))
        residuals = self.betas[chain][-1] * s[-1].abs()
        return theta, s, residuals

    def ritz_vectors(self, chain: int, coefficients: Tensor) -> Tensor:
        """``Q @ coefficients``: Ritz vectors from ``(L, r)`` coefficients, ``(n, r)`` in the basis dtype, on
        the basis device."""
        basis = self.basis[chain, : self.lengths[chain]]
        return basis.T @ coefficients.to(device=basis.device, dtype=basis.dtype)

    def _move(self, tensor: Tensor, device: torch.device) -> Tensor:
        """``tensor`` on ``device``, counting the vectors (rows of a matrix) that crossed devices."""
        if tensor.device == device:
            return tensor
        self.moves += 1 if tensor.ndim == 1 else tensor.shape[0]
        return tensor.to(device)

    def _reserve(self, slots: int) -> None:
        capacity = self.basis.shape[1]
        if capacity >= slots:
            return
        grown = self.basis.new_zeros(self.basis.shape[0], min(max(slots, 2 * capacity), self.size), self.size)
        grown[:, :capacity] = self.basis
        self.basis = grown


def ritz_error_estimates(theta: Tensor, residuals: Tensor) -> Tensor:
    """Gap-based error estimates ``min(r_i, r_i^2 / gap_i)`` of Ritz values, with a residual-discounted gap.

    For a unit ``y`` with Rayleigh quotient ``theta`` and residual ``r = ||A y - theta y||``, some eigenvalue
    of a symmetric ``A`` lies within ``r`` of ``theta``; if ``lambda`` is the eigenvalue nearest ``theta`` and
    every other eigenvalue is at least ``gap > r`` away from ``theta``, then ``|lambda - theta| <= r^2 / gap``
    (the Kato-Temple inequality: Temple 1928, Kato 1949; Parlett, *The Symmetric Eigenvalue Problem*, 1998,
    Ch. 4 and 11). ``gap_i`` is estimated from the other Ritz values, each moved towards ``theta_i`` by its
    own residual (``[theta_j - r_j, theta_j + r_j]`` holds an eigenvalue)::

        gap_i = min_{j != i} (|theta_j - theta_i| - r_j),

    and the estimate falls back to ``r_i`` where ``gap_i <= r_i`` (or ``L = 1``).

    This is an estimate, not a guarantee. No Ritz value stands for an eigenvalue that the Krylov space has
    not resolved yet, such as the second member of a close cluster ``{lambda, lambda - eps}``: it can lie
    nearer to ``theta_i`` than ``gap_i``, the Ritz value is then a mixture of the two, and its error can
    reach ``r_i`` (``eps / 2`` for an even mixture) while the estimate is orders of magnitude smaller. One
    Krylov sequence cannot see this, so only ``r_i`` bounds the distance to an eigenvalue without
    assumptions. Transformer blocks do have such clusters (attention heads): see the tests and
    ``benchmarks/bench_stopping.py``.

    Args:
        theta: ``(L,)`` Ritz values (any order).
        residuals: ``(L,)`` their residual norms.

    Returns:
        ``(L,)`` estimates, each ``<= residuals``.
    """
    length = theta.numel()
    if length < 2:
        return residuals.clone()
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(float("inf"))
    gap = distance.min(dim=1).values
    quadratic = residuals**2 / gap.clamp(min=torch.finfo(gap.dtype).tiny)
    return torch.where(gap > residuals, torch.minimum(residuals, quadratic), residuals)


def run_lanczos(
    op: BlockOperator,
    chains: dict[int, LanczosChains],
    on_step: Callable[[int, LanczosChains], None],
) -> None:
    """Advances every block's chains until none is active, with one ``op.matmat`` call per step.

    Each call carries the current vectors of every block that still has active chains (``None`` for the
    others). After each step ``on_step(block, chains)`` decides what happens next: it may
    :meth:`~LanczosChains.stop` or :meth:`~LanczosChains.restart` chains.
    """
    while True:
        running = [b for b, c in chains.items() if c.running]
        if not running:
            return
        vectors: list[Tensor | None] = [None] * len(op.sizes)
        for b in running:
            vectors[b] = chains[b].current()
        products = op.matmat(vectors)
        for b in running:
            product = products[b]
            if product is None:
                raise RuntimeError(f"The operator returned no product for block {b}.")
            chains[b].advance(product)
            on_step(b, chains[b])
