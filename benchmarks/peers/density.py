"""Task 4: the spectral density at equal probes × steps on the tiny model, against the exact spectrum.

The distance is Wasserstein-1 between each tool's quadrature measure (Lanczos nodes and weights averaged
over probes, no smoothing) and the dense Hessian's eigenvalues, divided by the spectral width: computed
by ``scipy.stats.wasserstein_distance``, independent of every tool (stochastic Lanczos quadrature: Lin,
Saad & Yang, "Approximating spectral densities of large matrices", SIAM Review 2016).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _models import loss_fn
from scipy.stats import wasserstein_distance
from torch import Tensor, nn

from lightning_hessian import CurvatureOperator, model_block
from lightning_hessian._context import curvature_context
from lightning_hessian.estimators import slq

from . import common
from .adapters import he, pyhessian_compat, pyhessian_hessian

OURS = "ours: slq"
Budget = tuple[int, int]  # (probes, Lanczos steps)


@dataclass
class DensityResult:
    """W1 / width and seconds per (estimator, budget), one entry per seed."""

    description: str
    budgets: list[Budget]
    n_seeds: int
    n_eigenvalues: int
    width: float
    distances: dict[tuple[str, Budget], list[float]]
    seconds: dict[tuple[str, Budget], list[float]]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.distances))

    def mean(self, name: str, b: Budget) -> float:
        return float(np.mean(self.distances[name, b]))


def measure_density(
    model: nn.Module,
    batch: Any,
    hessian: Tensor,
    budgets: Sequence[Budget],
    seeds: Sequence[int],
    description: str,
) -> DensityResult:
    """Task 4: every tool at every budget, once per seed (seeds outermost)."""
    spectrum = torch.linalg.eigvalsh(hessian).cpu().numpy()
    width = float(spectrum[-1] - spectrum[0])

    def w1(nodes: np.ndarray, weights: np.ndarray) -> float:
        keep = np.isfinite(nodes) & (weights > 0)
        return wasserstein_distance(nodes[keep], spectrum, u_weights=weights[keep]) / width

    methods = _estimators(model, batch, w1)
    distances = {(k, b): [] for k in methods for b in budgets}
    seconds = {(k, b): [] for k in methods for b in budgets}
    for seed in seeds:
        for b in budgets:
            for name, fn in methods.items():
                t, d = common.timed(lambda fn=fn, b=b, seed=seed: fn(*b, seed))
                distances[name, b].append(d)
                seconds[name, b].append(t)
    return DensityResult(description, list(budgets), len(seeds), len(spectrum), width, distances, seconds)


def _estimators(
    model: nn.Module, batch: Any, w1: Callable[[np.ndarray, np.ndarray], float]
) -> dict[str, Callable[[int, int, int], float]]:
    """Every tool's density: ``(probes, steps, seed) -> W1 / width`` of its quadrature measure."""

    def ours(probes: int, steps: int, seed: int) -> float:
        with curvature_context(model):
            op = CurvatureOperator(model, loss_fn, batch, [model_block(model)])
            density = slq(op, probes=probes, steps=steps, seed=seed)[0]
        return w1(density.nodes.numpy().ravel(), density.weights.numpy().ravel())

    def pyhessian_density(probes: int, steps: int, seed: int) -> float:
        torch.manual_seed(seed)
        with pyhessian_compat(torch.float64):
            nodes, weights = pyhessian_hessian(model, batch).density(iter=steps, n_v=probes)
        model.zero_grad(set_to_none=True)
        return w1(np.asarray(nodes, dtype=float).ravel(), np.asarray(weights, dtype=float).ravel())

    def he_density(probes: int, steps: int, seed: int) -> float:
        op = he.HessianOperator(model, [batch], loss_fn)
        result = he.spectral_density(op, num_runs=probes, lanczos_steps=steps, seed=seed, num_grid_points=64)
        return w1(result.raw_eigenvalues.cpu().numpy().ravel(), result.raw_weights.cpu().numpy().ravel())

    return {
        OURS: ours,
        "PyHessian: density": pyhessian_density,
        "hessian-eigenthings: spectral_density": he_density,
    }
