"""Seeded random vectors, drawn on the CPU in float64 so that results do not depend on the device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_hessian.estimators._operator import BlockOperator

# One stream per estimator, so that e.g. Lanczos and SLQ with the same seed draw unrelated vectors.
LANCZOS, POWER, SLQ, HUTCHINSON, HUTCHPP = range(1, 6)


def selected_blocks(blocks: Sequence[int] | None, count: int) -> list[int]:
    """The sorted, distinct block indices an estimator's ``blocks=`` names (all ``count`` when ``None``).

    Raises:
        ValueError: when an index is outside ``[0, count)``.
    """
    selected = list(range(count)) if blocks is None else sorted({int(b) for b in blocks})
    if any(not 0 <= b < count for b in selected):
        raise ValueError(f"Block indices must lie in [0, {count}); got {selected}.")
    return selected


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator whose state is derived from ``seed`` and ``keys`` (stream, block index, ...).

    The keys are mixed with :class:`numpy.random.SeedSequence`, so nearby seeds and block indices give
    independent streams.
    """
    entropy = [int(seed) % 2**64, *(int(k) for k in keys)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def rademacher(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Independent +-1 entries with equal probability (float64, CPU)."""
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.float64).mul_(2).sub_(1)


def gaussian(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Independent standard normal entries (float64, CPU)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def unit(n: int, gen: torch.Generator) -> Tensor:
    """A vector drawn uniformly from the unit sphere of ``R^n`` (float64, CPU)."""
    v = gaussian((n,), gen)
    return v / v.norm()


def to_operator(x: Tensor, op: BlockOperator) -> Tensor:
    """``x`` in the operator's dtype and on its device."""
    return x.to(device=op.device, dtype=op.dtype)


def column_dots(x: Tensor, y: Tensor) -> Tensor:
    """``x[:, j] . y[:, j]`` for every column j, accumulated in float64, on the CPU."""
    return (x.to(torch.float64) * y.to(torch.float64)).sum(0).cpu()


def sample_stderr(samples: Tensor) -> float:
    """Standard error of the mean of ``samples``: sample standard deviation / sqrt(count); NaN for one."""
    if samples.numel() < 2:
        return float("nan")
    return float(samples.std(unbiased=True) / samples.numel() ** 0.5)
