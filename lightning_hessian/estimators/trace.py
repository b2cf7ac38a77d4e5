"""Trace of every block by Hutchinson's estimator and by Hutch++."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.estimators import draws
from lightning_hessian.estimators._operator import BlockOperator

_DISTRIBUTIONS = {"rademacher": draws.rademacher, "gaussian": draws.gaussian}


@dataclass
class TraceResult:
    """A trace estimate of one block.

    Attributes:
        trace: The estimate of ``tr(A)``.
        stderr: Its standard error (0 when exact, NaN when it cannot be estimated from one probe).
        matvecs: Products with the block.
    """

    trace: float
    stderr: float
    matvecs: int


def hutchinson(
    op: BlockOperator,
    *,
    probes: int = 32,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk: int | None = None,
) -> list[TraceResult]:
    """Trace of every block by Hutchinson's estimator (Hutchinson 1989).

    ``tr(A) ~= (1/N) sum_{j=1}^N z_j^T A z_j`` with i.i.d. probes of zero mean and identity covariance
    (``E[z^T A z] = tr(A)``), reported with the standard error ``std(z_j^T A z_j) / sqrt(N)``. Rademacher
    probes give the smallest variance, ``2 sum_{i != j} A_ij^2`` per probe (Avron & Toledo 2011).

    Probe j of block b is drawn from its own seeded generator, so the result does not depend on ``chunk``.

    Args:
        op: The block-diagonal symmetric operator.
        probes: Number of probes ``N`` per block.
        seed: Seed of the probes (drawn on the CPU in float64).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        chunk: Maximum number of probes per block in one ``op.matmat`` call (default: all at once).

    Returns:
        One :class:`TraceResult` per block.
    """
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {sorted(_DISTRIBUTIONS)}, got {distribution!r}.")
    if probes < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"Need probes >= 1 and chunk >= 1; got probes={probes}, chunk={chunk}.")
    draw = _DISTRIBUTIONS[distribution]
    chunk = probes if chunk is None else chunk
    samples: list[list[Tensor]] = [[] for _ in op.sizes]
    for first in range(0, probes, chunk):
        columns = range(first, min(first + chunk, probes))
        vectors = [
            draws.to_operator(_probe_matrix(draw, n, seed, b, columns), op) for b, n in enumerate(op.sizes)
        ]
        products = op.matmat(vectors)
        for b, z in enumerate(vectors):
            samples[b].append(draws.column_dots(z, products[b]))
    results = []
    for per_chunk in samples:
        estimates = torch.cat(per_chunk)
        results.append(TraceResult(float(estimates.mean()), draws.sample_stderr(estimates), probes))
    return results


def _probe_matrix(draw: Callable[..., Tensor], n: int, seed: int, block: int, columns: range) -> Tensor:
    """``(n, len(columns))`` probes; probe j of a block has its own generator, so chunking changes nothing."""
    probes = [draw((n,), draws.generator(seed, draws.HUTCHINSON, block, j)) for j in columns]
    return torch.stack(probes, dim=1)


def hutchpp(
    op: BlockOperator, *, matvecs: int = 33, seed: int = 0, blocks: Sequence[int] | None = None
) -> list[TraceResult | None]:
    """Trace of every block by Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

    With ``s = matvecs // 3`` and ``g = matvecs - 2 s``: a Rademacher sketch ``S`` (n x s) gives an
    orthonormal basis ``Q = orth(A S)`` of the dominant range of ``A``; the trace splits into an exact part
    and a Hutchinson estimate of the small remainder::

        tr(A) ~= tr(Q^T A Q) + (1/g) sum_j g_j^T (I - Q Q^T) A (I - Q Q^T) g_j,

    with Rademacher ``g_j``. The error falls as ``1/matvecs`` instead of Hutchinson's ``1/sqrt(matvecs)`` on
    spectra that decay.

    ``stderr`` bounds the standard deviation of the estimate rather than estimating it from the few
    remainder probes (10 for ``matvecs=30``, whose sample standard deviation is itself so noisy that the
    error exceeded 3 of them in 1.6% and 5 in 0.2% of seeded runs, relative errors of several 100% on
    blocks whose trace is near zero): with ``M = (I - Q Q^T) A (I - Q Q^T)`` a Rademacher probe's variance
    is ``2 (||M||_F^2 - sum_i M_ii^2) <= 2 ||M||_F^2``, and ``||M g_j||^2`` is an unbiased estimate of
    ``||M||_F^2`` from the same products, far steadier than the probes' spread. The reported value is the
    larger of ``sqrt(2 mean_j ||M g_j||^2 / g)`` and the sample standard error, so the error stays within
    ``k`` of them at least as often as Chebyshev's ``1 - 1/k^2`` promises (and, the estimate being a mean,
    close to Gaussian rates in practice). A block with
    ``n <= s`` is computed exactly as ``sum_i e_i^T A e_i`` (``n`` matvecs, ``stderr = 0``), and a block of
    rank ``<= s`` is exact up to rounding because ``Q`` spans its range.

    The selected blocks run together in two ``op.matmat`` calls: ``A S``, then ``[A Q, A (I - Q Q^T) G]``.
    Every block draws from its own generator, so a block's result does not depend on which others run.

    Args:
        op: The block-diagonal symmetric operator.
        matvecs: Total products per block (at least 3).
        seed: Seed of the sketch and the probes (drawn per block on the CPU in float64).
        blocks: Indices of the blocks to run; the others get ``None``. Default: all.

    Returns:
        One :class:`TraceResult` per block (``None`` for blocks not selected).
    """
    if matvecs < 3:
        raise ValueError(f"Hutch++ needs matvecs >= 3, got {matvecs}.")
    selected = draws.selected_blocks(blocks, len(op.sizes))
    sketch, probes = matvecs // 3, matvecs - 2 * (matvecs // 3)
    generators = {b: draws.generator(seed, draws.HUTCHPP, b) for b in selected}
    exact = {b: op.sizes[b] <= sketch for b in selected}

    first: list[Tensor | None] = [None] * len(op.sizes)
    for b in selected:
        n = op.sizes[b]
        first[b] = (
            torch.eye(n, dtype=op.dtype, device=op.device)
            if exact[b]
            else draws.to_operator(draws.rademacher((n, sketch), generators[b]), op)
        )
    sketched = op.matmat(first)

    bases: list[Tensor | None] = [None] * len(op.sizes)
    second: list[Tensor | None] = [None] * len(op.sizes)
    for b in selected:
        if exact[b]:
            continue
        q = torch.linalg.qr(sketched[b]).Q
        g = draws.to_operator(draws.rademacher((op.sizes[b], probes), generators[b]), op)
        g = g - q @ (q.T @ g)
        bases[b], second[b] = q, torch.cat([q, g], dim=1)
    products = second if all(exact.values()) else op.matmat(second)

    results: list[TraceResult | None] = [None] * len(op.sizes)
    for b in selected:
        if exact[b]:
            results[b] = TraceResult(float(torch.diagonal(sketched[b]).double().sum()), 0.0, op.sizes[b])
            continue
        columns = draws.column_dots(second[b], products[b])
        head, tail = columns[:sketch].sum(), columns[sketch:]
        q, remainder = bases[b], products[b][:, sketch:]
        deflated = (remainder - q @ (q.T @ remainder)).to(torch.float64)  # M g_j
        frobenius = float(deflated.square().sum(0).mean().cpu())  # unbiased for ||M||_F^2
        stderr = max((2 * frobenius / probes) ** 0.5, draws.sample_stderr(tail))
        results[b] = TraceResult(float(head + tail.mean()), stderr, matvecs)
    return results
