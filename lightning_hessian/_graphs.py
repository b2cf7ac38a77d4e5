r"""Retained autograd graphs that Hessian-vector and Gauss-Newton products are computed on.

A Hessian-vector product is one backward through the gradient's retained graph,
:math:`H v = \nabla_\theta \langle g, v\rangle`; a Gauss-Newton product
:math:`J^\top (\nabla^2_f \ell) J v` uses the same graph with :math:`J v` by the double-backward trick
(:math:`J v = \nabla_u \langle J^\top u, v\rangle` for a dummy :math:`u`). Ormaniec, Dangel & Singh
(arXiv:2410.10986) eq. (3) for the split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Graph", "grad"]


def grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    batched: bool = False,
) -> list[Tensor]:
    """``torch.autograd.grad`` that keeps graphs alive and gives zeros where an output has no graph."""
    pairs = [
        (o, g)
        for o, g in zip(outputs, grad_outputs if grad_outputs is not None else [None] * len(outputs))
        if o.requires_grad
    ]
    shape_of = (lambda t: (grad_outputs[0].shape[0], *t.shape)) if batched else (lambda t: t.shape)
    if not pairs:
        return [torch.zeros(shape_of(x), dtype=x.dtype, device=x.device) for x in inputs]
    outs, gouts = zip(*pairs)
    grads = torch.autograd.grad(
        outs,
        inputs,
        grad_outputs=None if grad_outputs is None else gouts,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=batched,
    )
    if batched:
        # Inputs the outputs do not reach come back as unbatched zeros: give them the batch dimension.
        grads = tuple(
            g if g.shape == shape_of(x) else g.new_zeros(shape_of(x)) for g, x in zip(grads, inputs)
        )
    return list(grads)


class Graph:
    """Retained graphs that products are computed on: all batches at once, or one chunk.

    ``grads``: the weighted gradient per needed parameter (with its graph); with the Gauss-Newton graphs,
    ``outputs`` / ``output_grads`` per batch and ``dummies`` / ``jtu`` for :math:`J v` products.
    """

    __slots__ = ("dummies", "grads", "jtu", "output_grads", "outputs")

    def __init__(self, grads: dict[str, Tensor]) -> None:
        self.grads = grads
        self.outputs: list[Tensor] = []
        self.output_grads: list[Tensor] = []
        self.dummies: list[Tensor] = []
        self.jtu: dict[str, Tensor] = {}

    def prepare_jacobian(self, names: Sequence[str], leaves: Sequence[Tensor]) -> None:
        """``J^T u`` for a dummy ``u``: linear in ``u``, so one graph serves every ``J v``."""
        self.dummies = [torch.zeros_like(o, requires_grad=True) for o in self.outputs]
        self.jtu = dict(zip(names, grad(self.outputs, leaves, self.dummies, create_graph=True)))
