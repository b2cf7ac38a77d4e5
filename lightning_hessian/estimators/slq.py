"""Spectral density of every block by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.estimators import draws
from lightning_hessian.estimators._lanczos_core import LanczosChains, run_lanczos
from lightning_hessian.estimators._operator import BlockOperator


@dataclass
class SpectralDensity:
    """Gauss quadrature of a block's spectral measure, one rule per probe.

    For a unit probe ``q`` the spectral measure ``mu_q = sum_j (q^T u_j)^2 delta_{lambda_j}`` satisfies
    ``q^T f(A) q = integral f d mu_q``; its m-point Gauss rule has the Ritz values of ``T_m`` as nodes and the
    squared first components of ``T_m``'s eigenvectors as weights, and is exact for polynomials of degree
    ``2m - 1`` (Golub & Meurant 2010). Averaging over random probes estimates the empirical spectral density
    ``(1/n) sum_j delta_{lambda_j}``.

    Attributes:
        nodes: ``(probes, m)`` quadrature nodes (float64, CPU). A probe whose Krylov space was exhausted
            before ``m`` steps is padded with zero-weight copies of its largest node.
        weights: ``(probes, m)`` quadrature weights; every row sums to 1.
        size: The block dimension ``n``.
    """

    nodes: Tensor
    weights: Tensor
    size: int

    @property
    def probes(self) -> int:
        return self.nodes.shape[0]

    @property
    def _probe_traces(self) -> Tensor:
        """``n * sum_i w_i theta_i`` per probe: with ``||z||^2 = n``, each equals ``z^T A z`` (Hutchinson)."""
        return self.size * (self.weights * self.nodes).sum(1)

    @property
    def trace(self) -> float:
        """``tr(A) ~= n * mean_probes sum_i w_i theta_i``."""
        return float(self._probe_traces.mean())

    @property
    def trace_stderr(self) -> float:
        """Standard error of :attr:`trace` over the probes (NaN for a single probe)."""
        return draws.sample_stderr(self._probe_traces)

    def atoms(self) -> tuple[Tensor, Tensor]:
        """The probe-averaged quadrature measure as flat ``(nodes, masses)`` with total mass 1."""
        masses = self.weights.flatten()
        return self.nodes.flatten(), masses / masses.sum()

    def smoothed(
        self, num: int = 256, width: float = 0.02, grid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The quadrature measure convolved with a Gaussian: a smooth density estimate.

        ``rho(x) = sum_{p,i} (w_{p,i} / P) N(x; theta_{p,i}, sigma^2)`` (Ghorbani, Krishnan & Xiao 2019), with
        ``sigma = width * (max theta - min theta)``: the width is relative to the spectral range of the nodes
        (``width * max(|theta|, 1e-12)`` when all nodes coincide). ``rho`` integrates to 1 over the real line.

        Args:
            num: Number of grid points when ``grid`` is not given.
            width: Gaussian width relative to the spectral range.
            grid: Points to evaluate at; default ``num`` points spanning
                ``[min theta - 4 sigma, max theta + 4 sigma]``.

        Returns:
            ``(grid, values)`` float64 CPU tensors.
        """
        nodes, masses = self.atoms()
        low, high = float(nodes.min()), float(nodes.max())
        spread = high - low if high > low else max(abs(high), abs(low), 1e-12)
        sigma = width * spread
        if grid is None:
            grid = torch.linspace(low - 4 * sigma, high + 4 * sigma, num, dtype=torch.float64)
        grid = torch.as_tensor(grid, dtype=torch.float64)
        z = (grid.reshape(-1, 1) - nodes) / sigma
        values = (masses * torch.exp(-0.5 * z**2)).sum(1) / (sigma * math.sqrt(2 * math.pi))
        return grid, values.reshape(grid.shape)


def slq(
    op: BlockOperator,
    *,
    probes: int = 4,
    steps: int = 40,
    seed: int = 0,
    blocks: Sequence[int] | None = None,
    basis_device: torch.device | str | None = None,
) -> list[SpectralDensity | None]:
    """Spectral density of every block by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

    For each block, ``probes`` Rademacher vectors ``z`` (normalised) start ``m = min(steps, n)`` Lanczos steps
    with full reorthogonalisation; the Gauss rule of each tridiagonal ``T_m = S diag(theta) S^T`` gives nodes
    ``theta`` and weights ``S_{0,i}^2`` (see :class:`SpectralDensity`). This is the density estimator of
    Ghorbani, Krishnan & Xiao (2019) and PyHessian. A probe whose Krylov space becomes invariant before ``m``
    steps (always the case for ``n <= steps``) stops there, and its rule is then exact: ``mu_z`` itself.

    All probes of the selected blocks are batched: every step makes one ``op.matmat`` call with ``probes``
    columns per block still running. Every block draws from its own generator, so a block's result does not
    depend on which others run.

    Args:
        op: The block-diagonal symmetric operator.
        probes: Number of random probes per block.
        steps: Lanczos steps per probe (quadrature nodes).
        seed: Seed of the probes (drawn per block on the CPU in float64).
        blocks: Indices of the blocks to run; the others get ``None``. Default: all.
        basis_device: Where to keep the ``probes`` Lanczos bases (``probes * (steps + 1)`` vectors of the
            block's size); ``None``: the operator's device (see :func:`lanczos`).

    Returns:
        One :class:`SpectralDensity` per block (``None`` for blocks not selected).
    """
    if probes < 1 or steps < 1:
        raise ValueError(f"Need probes >= 1 and steps >= 1; got probes={probes}, steps={steps}.")
    lengths = [min(steps, n) for n in op.sizes]
    chains = {}
    for b in draws.selected_blocks(blocks, len(op.sizes)):
        z = draws.rademacher((probes, op.sizes[b]), draws.generator(seed, draws.SLQ, b))
        start = draws.to_operator(z, op)
        chains[b] = LanczosChains(start, capacity=lengths[b] + 1, basis_device=basis_device)

    def on_step(b: int, chain: LanczosChains) -> None:
        if max(chain.lengths) >= lengths[b]:
            chain.stop()

    run_lanczos(op, chains, on_step)
    return [_gauss_rule(chains[b], lengths[b], n) if b in chains else None for b, n in enumerate(op.sizes)]


def _gauss_rule(chain: LanczosChains, length: int, size: int) -> SpectralDensity:
    """Nodes and weights of every probe's tridiagonal, padded to ``length`` columns with zero weights."""
    nodes = torch.zeros(len(chain.lengths), length, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    for p in range(len(chain.lengths)):
        theta, s, _ = chain.ritz(p)
        used = theta.numel()
        nodes[p, :used] = theta
        nodes[p, used:] = theta[-1]
        weights[p, :used] = s[0] ** 2
    return SpectralDensity(nodes=nodes, weights=weights, size=size)
