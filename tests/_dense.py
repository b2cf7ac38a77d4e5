"""Dense float64 references for curvature tests: the exact block Hessian, Gauss-Newton and functional part.

Every block is turned into a flat vector ordered exactly as the operators order it (the block's parts in
order, each part row-major), and the loss is differentiated twice with ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from lightning_hessian.blocks import Block


class _Apply(nn.Module):
    """``fn(model, batch)`` as a module, so that ``functional_call`` can substitute the model's tensors."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def _call(
    model: nn.Module, fn: Callable[[nn.Module, Any], Any], batch: Any, tensors: dict[str, Tensor]
) -> Any:
    return functional_call(_Apply(model, fn), {f"model.{k}": v for k, v in tensors.items()}, (batch,))


def _rows(part: Any, length: int) -> list[int]:
    """The indices a part selects along its dim, from its ranges (independent of the library's select)."""
    return [i for start, stop in part.runs for i in range(start, stop) if i < length]


def block_vector(model: nn.Module, block: Block) -> Tensor:
    """The block's current entries as a flat vector (the operators' ordering)."""
    params = dict(model.named_parameters())
    pieces = []
    for part in block.parts:
        t = params[part.param].detach()
        if part.dim is not None:
            t = t.index_select(part.dim, torch.tensor(_rows(part, t.shape[part.dim])))
        pieces.append(t.reshape(-1))
    return torch.cat(pieces)


def _substitute(model: nn.Module, block: Block, theta: Tensor) -> dict[str, Tensor]:
    """The model's parameters and buffers with the block's entries replaced by ``theta``, differentiably."""
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    tensors.update({name: b.detach().clone() for name, b in model.named_buffers()})
    offset = 0
    for part in block.parts:
        t = tensors[part.param]
        if part.dim is None:
            n = t.numel()
            tensors[part.param] = theta[offset : offset + n].reshape(t.shape)
        else:
            rows = torch.tensor(_rows(part, t.shape[part.dim]))
            piece_shape = list(t.shape)
            piece_shape[part.dim] = len(rows)
            n = int(torch.Size(piece_shape).numel())
            piece = theta[offset : offset + n].reshape(piece_shape)
            tensors[part.param] = t.index_copy(part.dim, rows, piece)  # differentiable in the piece
        offset += n
    assert offset == theta.numel()
    return tensors


def dense_hessian(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any, block: Block
) -> Tensor:
    """Exact Hessian of ``loss_fn(model, batch)`` with respect to the block's entries."""

    def loss(theta: Tensor) -> Tensor:
        value = _call(model, loss_fn, batch, _substitute(model, block, theta))
        return value[0] if isinstance(value, tuple) else value

    matrix = hessian(loss)(block_vector(model, block))
    # torch.func's forward-over-reverse has been seen to give an asymmetric (wrong) Hessian through a
    # vectorised LayerNorm backward when a block spans a LayerNorm weight and parameters before it: refuse.
    asymmetry = (matrix - matrix.T).abs().max()
    assert asymmetry <= 1e-10 * matrix.abs().max().clamp_min(1e-300), f"asymmetric reference: {asymmetry:.1e}"
    return matrix


def dense_gauss_newton(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, Any], Tensor],
    criterion: Callable[[Tensor, Any], Tensor],
    batch: Any,
    block: Block,
) -> Tensor:
    """Exact Gauss-Newton block J^T (d2 loss / d output2) J, built from dense Jacobians."""
    theta = block_vector(model, block)

    def output(t: Tensor) -> Tensor:
        return _call(model, forward_fn, batch, _substitute(model, block, t))

    f0 = output(theta).detach()
    jac = jacrev(output)(theta).reshape(f0.numel(), theta.numel())
    h_out = hessian(lambda f: criterion(f.reshape(f0.shape), batch))(f0.reshape(-1))
    return jac.T @ h_out @ jac


def density_cdf(density: Any, x: float | Tensor) -> Tensor:
    """``F(x) = mu((-inf, x])`` of an SLQ density's probe-averaged quadrature measure, elementwise."""
    nodes, masses = density.atoms()
    x = torch.as_tensor(x, dtype=torch.float64)
    return ((nodes <= x.reshape(-1, 1)) * masses).sum(1).reshape(x.shape)


def wasserstein_to_spectrum(density: Any, eigenvalues: Tensor) -> float:
    """Wasserstein-1 distance of an SLQ density's measure to the uniform measure on ``eigenvalues``.

    ``W_1(mu, nu) = integral |F_mu(x) - F_nu(x)| dx``, integrated exactly over the sorted union of both
    supports, where the difference of the two step functions is constant between consecutive points.
    """
    nodes, masses = density.atoms()
    target = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().cpu()
    points = torch.cat([nodes, target])
    signed = torch.cat([masses, torch.full_like(target, -1.0 / target.numel())])
    order = torch.argsort(points)
    gap = torch.cumsum(signed[order], 0)[:-1]
    return float((gap.abs() * torch.diff(points[order])).sum())
