"""Extreme eigenvalues of every block by the Lanczos method with full reorthogonalisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.estimators import draws
from lightning_hessian.estimators._lanczos_core import LanczosChains, ritz_error_estimates, run_lanczos
from lightning_hessian.estimators._operator import BlockOperator

_WARM_START_NOISE = 1e-3
STOPPING_RULES = ("residual", "gap")


@dataclass
class ErrorEstimates:
    """Gap-based error estimates ``min(r, r^2 / gap)`` of one block's Ritz values (float64, CPU; see
    :func:`~lightning_hessian.estimators._lanczos_core.ritz_error_estimates`), at least ``eps * scale``; 0
    where the Krylov space was exhausted. ``top`` matches ``LanczosResult.eigenvalues``, ``smallest`` its
    ``min_eigenvalue``."""

    top: Tensor
    smallest: float | None


@dataclass
class LanczosResult:
    """Ritz approximations of one block's extreme eigenpairs.

    Attributes:
        eigenvalues: The top-k Ritz values, descending (float64, CPU); fewer than k only if ``max_iter < k``.
        residuals: Their residual norms ``||A x - theta x||`` (float64, CPU), at least ``eps * scale``.
        converged: Whether all top-k values met the stopping rule (or the Krylov space was exhausted).
        min_eigenvalue: The smallest Ritz value (``smallest=True`` only).
        min_residual: Its residual norm.
        min_converged: Whether it met the stopping rule.
        eigenvectors: ``(n, k)`` unit Ritz vectors matching ``eigenvalues``, in the operator's dtype, on the
            device of the Lanczos basis (the operator's unless ``basis_device`` says otherwise).
        min_eigenvector: ``(n,)`` unit Ritz vector of ``min_eigenvalue``.
        steps: Lanczos steps taken (the size of ``T``).
        matvecs: Products with the block (one per step).
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: bool
    min_eigenvalue: float | None
    min_residual: float | None
    min_converged: bool | None
    eigenvectors: Tensor | None
    min_eigenvector: Tensor | None
    steps: int
    matvecs: int


def lanczos(
    op: BlockOperator,
    k: int = 1,
    *,
    smallest: bool = True,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: Sequence[Tensor | None] | Mapping[int, Tensor | None] | None = None,
    seed: int = 0,
    return_eigenvectors: bool = True,
    blocks: Sequence[int] | None = None,
    basis_device: torch.device | str | None = None,
) -> list[LanczosResult | None]:
    """The k largest (and the smallest) eigenvalues of every block, by single-vector Lanczos.

    Each block runs the Lanczos recurrence ``A Q_L = Q_L T_L + beta_L q_{L+1} e_L^T`` (Lanczos 1950) with full
    reorthogonalisation (classical Gram-Schmidt twice); the eigenvalues ``theta`` of the float64 tridiagonal
    ``T_L`` are the Ritz values. With ``T_L = S diag(theta) S^T``, the Ritz pair ``(theta_i, Q_L s_i)`` has
    residual norm ``r_i = beta_L |s_{L,i}|`` (Parlett 1998, Sec. 13.1) and its Ritz value lies within ``r_i``
    of an eigenvalue of the block (within ``r_i^2 / gap`` if every other eigenvalue is at least ``gap`` away:
    Kato-Temple). A block stops when each of its top-k (and, with ``smallest``, its smallest) Ritz pairs
    satisfies ``r_i <= tol * max(|theta_i|, f * scale)``, at ``max_iter`` steps, or when the Krylov space is
    invariant (breakdown, or ``L = n``), where the Ritz values are exact. Here ``scale = max_i |theta_i|``
    and ``f = min(1, max(tol, 10 eps / tol))``, which is ``tol`` unless ``tol`` nears the rounding level
    ``eps`` of ``op.dtype``.
    A breakdown with fewer than k Ritz values restarts from a random vector orthogonal to the basis.

    What ``converged`` guarantees, each value on its own:

    * top values: an eigenvalue lies within ``tol * |theta_i|`` of ``theta_i``, a relative error
      ``<= tol / (1 - tol)``, whatever the rest of the spectrum; only a value below ``f * scale`` in
      magnitude is held to the absolute ``tol * f * scale`` (``tol^2 * scale`` for ``f = tol``) instead.
      So ``lambda_max`` of a LayerNorm block, whose ``|lambda_min|`` is often 40 times larger, is right to
      ``tol`` relative: a rule relative to ``max|theta|`` only would let it be off by ``40 tol``.
    * the smallest value: an eigenvalue within ``tol * max(|theta_0|, f * scale)`` of ``theta_0``: relative
      ``tol`` when ``|theta_0| >= f * scale``, absolute ``tol * f * scale`` when it is near 0 (the common
      case of a nearly positive semi-definite block, ``|theta_0| << lambda_max``).

    The relative rule costs more products where the smallest value sits near the dense part of the spectrum
    (about 1.6x over all blocks of a trained 2-layer GPT at ``tol=1e-3``); the floor keeps a value near 0
    from running to ``max_iter``.

    All blocks run together: every step makes one ``op.matmat`` call carrying the current vector of every
    block still running (``None`` for the others).

    Memory: each block's basis holds one vector of the block's size per step (up to ``max_iter + 1``), on
    the operator's device unless ``basis_device`` puts it elsewhere, e.g. ``"cpu"`` for a GPU whose memory
    is full. Each step then moves one vector to the operator's device and its product back, and the
    Gram-Schmidt passes run on ``basis_device``: the same arithmetic on another device, so the results agree
    to rounding (bitwise where both devices compute alike).

    The computed Lanczos relation holds only to the rounding level of the vectors' dtype, so reported
    residuals are floored at ``eps * scale`` (``eps`` of ``op.dtype``): in float32 a ``tol`` below about
    ``1e-7`` cannot be met (except where the Krylov space is invariant) and ``converged`` stays ``False``.

    Limitations: a single Krylov sequence sees an eigenvalue of multiplicity > 1 once (its copies show up,
    if at all, only through rounding or a restart), so exactly repeated eigenvalues among the top k may be
    missed. A start vector (nearly) orthogonal to the top eigenvector can converge to the wrong eigenvalue;
    random starts and the warm-start perturbation make this unlikely. Close but distinct top eigenvalues can
    also meet a loose ``tol`` with the second of them before the first is resolved (seen on attention
    blocks at ``tol=1e-3``: ``benchmarks/results/stopping.md``); stopping on the gap estimate instead
    (:func:`lanczos_with_error_estimates`, measured there) makes this much likelier.

    Args:
        op: The block-diagonal symmetric operator.
        k: Number of largest eigenvalues per block; truncated to the block size.
        smallest: Also compute the smallest eigenvalue (it then takes part in the stopping rule).
        tol: Tolerance of the stopping rule, relative to each Ritz value (see above).
        max_iter: Maximum number of steps (= matvecs) per block.
        init: Optional warm start per block (indexable by block): a ``(n,)`` or ``(n, j)`` tensor, e.g. the
            previous pass's Ritz vectors. The start vector is the normalised sum of its columns plus a seeded
            random unit vector times ``1e-3``, so it is never exactly deficient in any eigenvector.
        seed: Seed of the random start vectors (drawn per block on the CPU in float64).
        return_eigenvectors: Whether to form the Ritz vectors.
        blocks: Indices of the blocks to run; the others get ``None``. Default: all.
        basis_device: Where to keep the Lanczos basis (and the Ritz vectors); ``None``: the operator's device.

    Returns:
        One :class:`LanczosResult` per block (``None`` for blocks not selected).
    """
    return lanczos_with_error_estimates(
        op,
        k,
        smallest=smallest,
        tol=tol,
        max_iter=max_iter,
        init=init,
        seed=seed,
        return_eigenvectors=return_eigenvectors,
        blocks=blocks,
        basis_device=basis_device,
    )[0]


def lanczos_with_error_estimates(
    op: BlockOperator,
    k: int = 1,
    *,
    stop: str = "residual",
    smallest: bool = True,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: Sequence[Tensor | None] | Mapping[int, Tensor | None] | None = None,
    seed: int = 0,
    return_eigenvectors: bool = True,
    blocks: Sequence[int] | None = None,
    basis_device: torch.device | str | None = None,
) -> tuple[list[LanczosResult | None], list[ErrorEstimates | None]]:
    """:func:`lanczos` with gap-based error estimates, and a choice of what stops it: for
    ``benchmarks/bench_stopping.py``, which measured the two rules; not exported.

    ``stop="residual"`` is :func:`lanczos`. ``stop="gap"`` stops when the gap estimate
    ``min(r_i, r_i^2 / gap_i)`` is below the same threshold: fewer steps, but not a guarantee: an eigenvalue
    that the Krylov space has not resolved yet (a close cluster) can make the error exceed it.
    """
    if k < 1 or max_iter < 1 or tol < 0:
        raise ValueError(f"Need k >= 1, max_iter >= 1, tol >= 0; got k={k}, max_iter={max_iter}, tol={tol}.")
    if stop not in STOPPING_RULES:
        raise ValueError(f"stop must be one of {STOPPING_RULES}, got {stop!r}.")
    num_blocks = len(op.sizes)
    selected = draws.selected_blocks(blocks, num_blocks)

    generators = {b: draws.generator(seed, draws.LANCZOS, b) for b in selected}
    starts = {b: start_vector(op, b, _warm_start(init, b), generators[b]) for b in selected}
    chains = {
        b: LanczosChains(starts[b][None], capacity=min(max_iter + 1, 33), basis_device=basis_device)
        for b in selected
    }
    results: list[LanczosResult | None] = [None] * num_blocks
    errors: list[ErrorEstimates | None] = [None] * num_blocks
    rounding = torch.finfo(op.dtype).eps

    def on_step(b: int, chain: LanczosChains) -> None:
        n, steps = op.sizes[b], chain.lengths[0]
        top_k = min(k, n)
        if chain.broken[0] and steps < top_k and steps < max_iter:
            if chain.restart(0, draws.to_operator(draws.unit(n, generators[b]), op)):
                return
        theta, s, residuals = chain.ritz(0)
        scale = float(theta.abs().max())
        residuals = residuals.clamp(min=rounding * scale)
        invariant = chain.broken[0]  # the Krylov space is invariant: the Ritz pairs are exact
        floor = rounding * scale
        estimates = None if stop == "residual" else _error_estimates(theta, residuals, invariant, floor)
        measure = residuals if estimates is None else estimates
        threshold = _thresholds(theta, tol, rounding)
        top = torch.arange(steps - 1, steps - 1 - min(top_k, steps), -1)
        top_converged = steps >= top_k and (invariant or bool((measure[top] <= threshold[top]).all()))
        min_converged = invariant or bool(measure[0] <= threshold[0])
        done = top_converged and (min_converged or not smallest)
        if not (done or steps >= max_iter or not chain.running):
            return
        chain.stop()
        if estimates is None:
            estimates = _error_estimates(theta, residuals, invariant, floor)
        vectors = chain.ritz_vectors(0, torch.cat([s[:, top], s[:, :1]], 1)) if return_eigenvectors else None
        results[b] = LanczosResult(
            eigenvalues=theta[top],
            residuals=residuals[top],
            converged=top_converged,
            min_eigenvalue=float(theta[0]) if smallest else None,
            min_residual=float(residuals[0]) if smallest else None,
            min_converged=min_converged if smallest else None,
            eigenvectors=None if vectors is None else vectors[:, :-1],
            min_eigenvector=None if vectors is None or not smallest else vectors[:, -1],
            steps=steps,
            matvecs=steps,
        )
        errors[b] = ErrorEstimates(estimates[top], float(estimates[0]) if smallest else None)

    run_lanczos(op, chains, on_step)
    return results, errors


def _thresholds(theta: Tensor, tol: float, eps: float) -> Tensor:
    """Per Ritz value, the residual (or gap estimate) below which it counts as converged.

    ``tol * max(|theta_i|, f * scale)`` with ``scale = max_j |theta_j|`` (a lower bound of ``||A||``) and the
    floor ``f = min(1, max(tol, 10 eps / tol))``: relative to the value itself above ``f * scale``, absolute
    below. Without a floor a value near 0 would need a residual near 0 and run to ``max_iter`` for nothing:
    with ``f = tol`` such a value is still pinned to ``tol^2 * scale``, and ``10 eps / tol`` keeps the
    threshold at least ten times the rounding level ``eps * scale`` of the products (float32 at small
    ``tol``). The cap ``f <= 1`` leaves a ``tol`` below the rounding level as unreachable as before.

    Args:
        theta: ``(L,)`` Ritz values.
        tol: The relative tolerance.
        eps: The machine epsilon of the operator's dtype.

    Returns:
        ``(L,)`` thresholds (float64).
    """
    scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
    return tol * theta.abs().clamp(min=_floor_fraction(tol, eps) * scale)


def _floor_fraction(tol: float, eps: float) -> float:
    """``f = min(1, max(tol, 10 eps / tol))``: below ``f * max|theta|`` the stopping rule is absolute."""
    return min(1.0, max(tol, 10 * eps / max(tol, torch.finfo(torch.float64).tiny)))


def _error_estimates(theta: Tensor, residuals: Tensor, invariant: bool, floor: float) -> Tensor:
    """Gap-based error estimates: 0 on an invariant Krylov space, else at least the rounding floor."""
    if invariant:
        return torch.zeros_like(residuals)
    return ritz_error_estimates(theta, residuals).clamp(min=floor)


def _warm_start(init: Sequence[Tensor | None] | Mapping[int, Tensor | None] | None, b: int) -> Tensor | None:
    if init is None:
        return None
    return init.get(b) if isinstance(init, Mapping) else init[b]


def start_vector(op: BlockOperator, b: int, guess: Tensor | None, gen: torch.Generator) -> Tensor:
    """A unit start vector: random, or the normalised column sum of ``guess`` plus a ``1e-3`` random part."""
    n = op.sizes[b]
    noise = draws.unit(n, gen)
    if guess is None:
        return draws.to_operator(noise, op)
    if guess.shape[0] != n or guess.ndim not in (1, 2):
        raise ValueError(f"init[{b}] must have shape ({n},) or ({n}, j); got {tuple(guess.shape)}.")
    direction = guess.detach().to(device="cpu", dtype=torch.float64).reshape(n, -1).sum(1)
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        return draws.to_operator(noise, op)
    start = direction / norm + _WARM_START_NOISE * noise
    return draws.to_operator(start / start.norm(), op)
