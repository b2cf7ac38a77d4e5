"""The operator protocol every estimator works on, and a dense implementation of it.

An estimator sees a block-diagonal symmetric operator ``diag(A_0, ..., A_{B-1})`` only through batched
products ``A_b @ X_b``: one :meth:`BlockOperator.matmat` call multiplies several vectors of several blocks at
once, which is what makes curvature passes over many parameter blocks cheap (one retained graph per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class BlockOperator(Protocol):
    """A block-diagonal symmetric operator ``diag(A_0, ..., A_{B-1})``; block b acts on ``R^{sizes[b]}``.

    Attributes:
        sizes: The dimension ``n_b`` of every block.
        dtype: The dtype the vectors are given in and the products are returned in.
        device: The device of the vectors and products.
    """

    sizes: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Multiplies every block by its own matrix of vectors.

        Args:
            vectors: ``vectors[b]`` is ``None`` (block b is not needed this call) or a ``(sizes[b], m_b)``
                tensor.

        Returns:
            ``A_b @ vectors[b]`` for every block, ``None`` where ``vectors[b]`` is ``None``.
        """
        ...


class DenseBlockOperator:
    """:class:`BlockOperator` made of explicit symmetric matrices (tests, small problems, references).

    Symmetry is assumed, not checked. Counters record the work the estimators asked for.

    Attributes:
        matrices: The blocks ``A_b``.
        matvecs: Total number of vectors (columns) multiplied so far, over all blocks.
        block_matvecs: The same per block.
        calls: Number of :meth:`matmat` calls.
    """

    def __init__(self, matrices: Sequence[Tensor]) -> None:
        if len(matrices) == 0:
            raise ValueError("DenseBlockOperator needs at least one matrix.")
        self.matrices = [torch.as_tensor(m) for m in matrices]
        for b, m in enumerate(self.matrices):
            if m.ndim != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(f"Block {b} is not a square matrix: shape {tuple(m.shape)}.")
        first = self.matrices[0]
        if any(m.dtype != first.dtype or m.device != first.device for m in self.matrices):
            raise ValueError("All blocks must share one dtype and one device.")
        self.sizes: tuple[int, ...] = tuple(m.shape[0] for m in self.matrices)
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.matvecs = 0
        self.block_matvecs = [0] * len(self.sizes)
        self.calls = 0

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """``A_b @ vectors[b]`` for every block whose entry is not ``None`` (see :class:`BlockOperator`)."""
        if len(vectors) != len(self.sizes):
            raise ValueError(f"Expected {len(self.sizes)} entries (one per block), got {len(vectors)}.")
        self.calls += 1
        products: list[Tensor | None] = []
        for b, (matrix, x) in enumerate(zip(self.matrices, vectors, strict=True)):
            if x is None:
                products.append(None)
                continue
            if x.ndim != 2 or x.shape[0] != self.sizes[b]:
                raise ValueError(f"Block {b} expects a ({self.sizes[b]}, m) tensor, got {tuple(x.shape)}.")
            products.append(matrix @ x)
            self.matvecs += x.shape[1]
            self.block_matvecs[b] += x.shape[1]
        return products
