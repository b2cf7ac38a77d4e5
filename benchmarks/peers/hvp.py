"""Task 5: the cost of one Hessian-vector product in gradients, and each tool's agreement with float64.

Every operation (graph builds, products on a retained graph, products that rebuild the graph, a block of
30 columns) is timed in interleaved rounds with the gradient unit sampled between them. Agreement: one
product of each tool against plain autograd double backward on a float64 copy, for the whole vector and
for the worst parameter tensor.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _models import ModelSpec, loss_fn
from torch import Tensor, nn

from lightning_hessian import CurvatureOperator, model_block
from lightning_hessian._context import curvature_context

from . import common
from .adapters import curvlinops_operator, he, pyhessian_hessian, pyhessian_hvp

OURS_HVP = "ours: HVP on the retained graph"
PYHESSIAN_HVP = "PyHessian: HVP on the retained graph (utils.hessian_vector_product)"
BLOCK = "curvlinops: per column of H @ V, 30 columns (vmapped)"
COLUMNS = 30


@dataclass
class HvpResult:
    """Median milliseconds per operation and the agreement of one product per tool."""

    spec_name: str
    description: str
    rounds: int
    gradient: float  # seconds
    times: dict[str, list[float]]  # operation -> seconds per round (BLOCK: per column)
    errors: dict[str, float]  # tool -> relative error of the whole product
    worst: dict[str, tuple[float, str]]  # tool -> (relative error, name) of its worst parameter tensor

    def median(self, operation: str) -> float:
        return statistics.median(self.times[operation])


def measure_hvp(spec: ModelSpec, rounds: int) -> HvpResult:
    """Task 5 on ``spec``: ``rounds`` interleaved rounds of every operation, then one product per tool."""
    model, batch = common.build(spec)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(common.DEVICE, spec.dtype)
    unit = common.GradientUnit(model, batch)
    with curvature_context(model):
        ours = CurvatureOperator(model, loss_fn, batch, [model_block(model)])
    model.zero_grad(set_to_none=True)
    products = _products(model, batch, ours, v)
    columns = torch.randn(n, COLUMNS, generator=torch.Generator().manual_seed(1)).to(
        common.DEVICE, spec.dtype
    )
    ops = _operations(model, batch, products, columns)
    times: dict[str, list[float]] = {k: [] for k in ops}
    with curvature_context(model):  # entered once: its cost is per pass, not per product
        for fn in ops.values():
            fn()  # warm-up
        for _ in range(rounds):
            unit.sample(2)
            for name, fn in ops.items():
                times[name].append(common.timed(fn)[0])
        unit.sample(2)
    model.zero_grad(set_to_none=True)
    gradient = unit.seconds
    times[BLOCK] = [t / COLUMNS for t in times[BLOCK]]
    errors, worst = _agreement(model, batch, products, v)
    return HvpResult(spec.name, spec.describe(model), rounds, gradient, times, errors, worst)


def _products(
    model: nn.Module, batch: Any, ours: CurvatureOperator, v: Tensor
) -> dict[str, Callable[..., Tensor]]:
    """One product ``H v`` per tool, flat; the peers' operators built once (PyHessian's graph retained)."""
    params = list(model.parameters())
    v_list = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
    pyh = pyhessian_hessian(model, batch)
    he_op = he.HessianOperator(model, [batch], loss_fn)
    cl_op = curvlinops_operator(model, batch, params)

    def pyhessian_product() -> Tensor:
        return torch.cat([h.reshape(-1) for h in pyhessian_hvp(pyh.gradsH, pyh.params, v_list)])

    return {
        "ours": lambda: ours.matmat([v[:, None]])[0][:, 0],
        "PyHessian": pyhessian_product,
        "hessian-eigenthings": lambda: he_op.matvec(v),
        "curvlinops": lambda x=v: cl_op @ x,
    }


def _operations(
    model: nn.Module, batch: Any, products: dict[str, Callable[..., Tensor]], columns: Tensor
) -> dict[str, Callable[[], Any]]:
    """The timed operations, in the table's order."""

    def ours_build() -> None:
        with curvature_context(model):
            CurvatureOperator(model, loss_fn, batch, [model_block(model)])

    def pyhessian_build() -> None:
        model.zero_grad(set_to_none=True)  # else backward(create_graph=True) accumulates onto old graphs
        pyhessian_hessian(model, batch)

    return {
        "ours: graph build (forward + create_graph gradient), once per pass": ours_build,
        OURS_HVP: products["ours"],
        "PyHessian: graph build (hessian(...): forward + backward(create_graph))": pyhessian_build,
        PYHESSIAN_HVP: products["PyHessian"],
        "hessian-eigenthings: HVP (HessianOperator.matvec: forward + two backwards)": products[
            "hessian-eigenthings"
        ],
        "curvlinops: HVP (H @ v, one column: forward-over-reverse)": products["curvlinops"],
        BLOCK: lambda: products["curvlinops"](columns),
    }


def _agreement(
    model: nn.Module, batch: Any, products: dict[str, Callable[..., Tensor]], v: Tensor
) -> tuple[dict[str, float], dict[str, tuple[float, str]]]:
    """Each tool's product against plain autograd double backward on a float64 copy: whole, worst tensor."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    model64 = common.float64_copy(model)
    p64 = list(model64.parameters())
    g64 = torch.autograd.grad(loss_fn(model64, batch), p64, create_graph=True)
    v64 = [t.view_as(p).double() for t, p in zip(v.split(sizes), params)]
    exact = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g64, p64, v64)])
    with curvature_context(model):
        ours_product = products["ours"]()
    agreement = {"ours": ours_product, **{k: f() for k, f in products.items() if k != "ours"}}
    model.zero_grad(set_to_none=True)
    errors = {k: float((h.double() - exact).norm() / exact.norm()) for k, h in agreement.items()}
    names = common.params_of(model)
    worst = {}
    for k, h in agreement.items():
        pieces = zip(names, (h.double() - exact).split(sizes), exact.split(sizes))
        worst[k] = max((float(d.norm() / e.norm()), name) for name, d, e in pieces)
    return errors, worst
