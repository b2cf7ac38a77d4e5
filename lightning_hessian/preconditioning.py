r"""Adaptive optimisers' preconditioned curvature: the operator :math:`P^{-1/2} A P^{-1/2}` and its diagonals.

Adam-family optimisers are stable while :math:`\lambda_{\max}(P^{-1} H)` stays below their threshold (Cohen
et al., "Adaptive Gradient Methods at the Edge of Stability", arXiv:2207.14484). :math:`P^{-1} H` is similar
to the symmetric :math:`P^{-1/2} H P^{-1/2}`, which Lanczos can run on. Reading :math:`P` off a live
optimiser is :func:`lightning_hessian.optimizers.adam_preconditioners`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_hessian.blocks import Block

__all__ = ["PreconditionedOperator", "block_diagonal"]


def block_diagonal(block: Block, preconditioner: Mapping[str, Tensor]) -> Tensor:
    """The diagonal of :math:`P` restricted to ``block``, as a block vector (detached).

    Raises:
        ValueError: when ``preconditioner`` lacks a parameter of the block, naming it.
    """
    missing = [n for n in block.params if n not in preconditioner]
    if missing:
        raise ValueError(f"preconditioner has no entry for {missing[:3]}; give one per trainable parameter.")
    return block.vector({n: preconditioner[n].detach() for n in block.params})


class PreconditionedOperator:
    r"""The symmetric :math:`P^{-1/2} A P^{-1/2}` of a block operator :math:`A` and a diagonal :math:`P > 0`.

    Its eigenvalues are those of :math:`P^{-1} A` (the two are similar), so Lanczos on it gives the
    preconditioned sharpness :math:`\lambda_{\max}(P^{-1} H)` of adaptive optimisers (Cohen et al.,
    "Adaptive Gradient Methods at the Edge of Stability", arXiv:2207.14484).

    Args:
        op: the operator (e.g. a :class:`CurvatureOperator`).
        diagonals: per block, the diagonal of :math:`P` as a block vector, or ``None`` to leave the block
            out (it must then never be asked for).
    """

    def __init__(self, op: Any, diagonals: Sequence[Tensor | None]) -> None:
        if len(diagonals) != len(op.sizes):
            raise ValueError(f"Expected {len(op.sizes)} diagonals (one per block), got {len(diagonals)}.")
        self.op, self.sizes, self.dtype, self.device = op, op.sizes, op.dtype, op.device
        self._scales = []
        for size, d in zip(op.sizes, diagonals):
            if d is not None:
                if d.shape != (size,) or not bool((d > 0).all()):
                    raise ValueError(f"A preconditioner diagonal must be positive, of shape ({size},).")
                d = d.to(device=op.device, dtype=op.dtype).rsqrt().unsqueeze(1)
            self._scales.append(d)

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """``P_b^{-1/2} A_b P_b^{-1/2} vectors[b]`` for every block (see :class:`BlockOperator`)."""
        scaled = [None if v is None else s * v.reshape(len(s), -1) for v, s in zip(vectors, self._scales)]
        return [None if r is None else s * r for r, s in zip(self.op.matmat(scaled), self._scales)]
