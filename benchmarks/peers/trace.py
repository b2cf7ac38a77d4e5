"""Task 3: the trace at equal matvec budgets on the tiny model, against the exact (dense) trace.

Every estimator runs once per (seed, budget), interleaved; the result keeps each run's relative error
and time, and what theory expects on this spectrum with Rademacher probes: Hutchinson's RMS relative
error ``sqrt(2 (||H||_F^2 - sum_i H_ii^2) / m) / |tr H|`` and an ideal Hutch++'s (the exact top-``m/3``
eigenspace removed, ``m/3`` probes left) ``sqrt(2 sum_{i > m/3} lambda_i^2 / (m/3)) / |tr H|``
(Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _models import loss_fn
from torch import Tensor, nn

from lightning_hessian import CurvatureOperator, analyze, model_block
from lightning_hessian._context import curvature_context
from lightning_hessian.estimators.trace import hutchinson

from . import common
from .adapters import curvlinops, curvlinops_operator, he, pyhessian_compat, pyhessian_hessian

OURS_DEFAULT = "ours: Hutch++ (analyze trace_matvecs=m)"


@dataclass
class TraceResult:
    """Relative errors and seconds per (estimator, budget), one entry per seed, and the spectrum's facts."""

    description: str
    budgets: list[int]
    n_seeds: int
    exact: float
    eigenvalues: list[float]  # ascending
    top10_share: float  # of ||H||_F^2, in the 10 largest squared eigenvalues
    theory: dict[int, tuple[float, float]]  # budget -> (Hutchinson, ideal Hutch++) expected RMS rel. error
    errors: dict[tuple[str, int], list[float]]
    seconds: dict[tuple[str, int], list[float]]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.errors))

    def mean_error(self, name: str, m: int) -> float:
        return float(np.mean(self.errors[name, m]))


def measure_trace(
    model: nn.Module,
    batch: Any,
    hessian: Tensor,
    budgets: Sequence[int],
    seeds: Sequence[int],
    description: str,
) -> TraceResult:
    """Task 3: every estimator at every budget, once per seed (seeds outermost)."""
    exact = float(hessian.trace())
    methods = _estimators(model, batch)
    errors = {(k, m): [] for k in methods for m in budgets}
    seconds = {(k, m): [] for k in methods for m in budgets}
    for seed in seeds:
        for m in budgets:
            for name, fn in methods.items():
                t, estimate = common.timed(lambda fn=fn, m=m, seed=seed: fn(m, seed))
                errors[name, m].append(common.relative(estimate, exact))
                seconds[name, m].append(t)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    squares = (eigenvalues**2).sort(descending=True).values
    off_diagonal = float(squares.sum() - (hessian.diagonal() ** 2).sum())
    theory = {
        m: (
            math.sqrt(2 * off_diagonal / m) / abs(exact),
            math.sqrt(2 * float(squares[m // 3 :].sum()) / (m // 3)) / abs(exact),
        )
        for m in budgets
    }
    top10 = float(squares[:10].sum() / squares.sum())
    values = eigenvalues.tolist()
    return TraceResult(description, list(budgets), len(seeds), exact, values, top10, theory, errors, seconds)


def _estimators(model: nn.Module, batch: Any) -> dict[str, Callable[[int, int], float]]:
    """Every tool's trace estimators: ``(matvecs, seed) -> estimate``."""
    params = list(model.parameters())

    def ours_hutchpp(m: int, seed: int) -> float:
        report = analyze(
            model,
            loss_fn,
            batch,
            blocks=None,
            full=True,
            smallest=False,
            trace_matvecs=m,
            max_iter=1,
            seed=seed,
        )
        return report.full.trace

    def ours_hutchinson(m: int, seed: int) -> float:
        with curvature_context(model):
            op = CurvatureOperator(model, loss_fn, batch, [model_block(model)])
            return hutchinson(op, probes=m, seed=seed)[0].trace

    def pyhessian_trace(m: int, seed: int) -> float:
        torch.manual_seed(seed)
        with pyhessian_compat(torch.float64):
            samples = pyhessian_hessian(model, batch).trace(maxIter=m, tol=-math.inf)  # -inf: see the caveats
        model.zero_grad(set_to_none=True)
        assert len(samples) == m
        return float(np.mean(samples))

    def curvlinops_trace(estimator: Callable) -> Callable[[int, int], float]:
        def run(m: int, seed: int) -> float:
            torch.manual_seed(seed)  # curvlinops draws its probes from the global stream
            return float(estimator(curvlinops_operator(model, batch, params), m))

        return run

    def he_trace(method: str) -> Callable[[int, int], float]:
        def run(m: int, seed: int) -> float:
            op = he.HessianOperator(model, [batch], loss_fn)
            if method == "hutchinson":
                return he.hutchinson(op, num_samples=m, seed=seed).estimate
            return he.trace(op, num_matvecs=m, method="hutch++", seed=seed).estimate

        return run

    return {
        OURS_DEFAULT: ours_hutchpp,
        "ours: Hutchinson (estimators.trace.hutchinson)": ours_hutchinson,
        "PyHessian: Hutchinson (trace)": pyhessian_trace,
        "hessian-eigenthings: Hutchinson": he_trace("hutchinson"),
        "hessian-eigenthings: Hutch++": he_trace("hutch++"),
        "curvlinops: hutchinson_trace": curvlinops_trace(curvlinops.hutchinson_trace),
        "curvlinops: hutchpp_trace": curvlinops_trace(curvlinops.hutchpp_trace),
        "curvlinops: xtrace": curvlinops_trace(curvlinops.xtrace),
    }
