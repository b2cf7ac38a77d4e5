"""Task 1: the whole model's top eigenvalue, every tool swept from its default to tighter settings.

Each configuration runs once per seed, seeds outermost (``run_interleaved``), so that drift of a shared
machine hits every tool alike; errors are relative to a float64 reference (our Lanczos at tol 1e-10,
cross-checked by scipy ``eigsh`` on plain autograd products). ``TopResult`` keeps every run's numbers and
picks each tool's fastest configuration accurate to ``ACCURACY`` on every seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from _models import ModelSpec, loss_fn
from scipy.sparse.linalg import eigsh
from torch import nn

from lightning_hessian import analyze

from . import common
from .adapters import (
    curvlinops_operator,
    he,
    metered_eigenthings,
    metered_pyhessian,
    metered_scipy,
    pyhessian_hessian,
)
from .references import autograd_top, reference_tops

ACCURACY = 1e-4  # the target relative error for top eigenvalues

Run = Callable[[int], tuple[float, int, float]]  # seed -> (top eigenvalue, products, seconds in products)


@dataclass
class Config:
    """One way of running one tool on the whole model."""

    family: str
    label: str
    run: Run
    default: bool = False
    params: dict = field(default_factory=dict)


@dataclass
class Measured:
    """One configuration's numbers, one entry per seed."""

    config: Config
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    matvecs: list[int] = field(default_factory=list)
    product_seconds: list[float] = field(default_factory=list)

    @property
    def time(self) -> float:
        return statistics.median(self.seconds)

    @property
    def products(self) -> float:
        return statistics.median(self.matvecs)

    @property
    def ms_per_product(self) -> float:
        return 1e3 * sum(self.product_seconds) / max(sum(self.matvecs), 1)

    @property
    def product_share(self) -> float:
        return sum(self.product_seconds) / sum(self.seconds)

    def error(self, reference: float) -> float:
        """The worst seed's relative error."""
        return max(common.relative(v, reference) for v in self.values)


@dataclass
class ProfileRow:
    """One operator of torch.profiler's table: self CPU milliseconds, share of the total, calls."""

    name: str
    self_ms: float
    share: float
    calls: int


@dataclass
class TopResult:
    """What task 1 found on one model."""

    spec: ModelSpec
    description: str
    reference: float
    crosscheck: float
    unit: float
    measured: list[Measured]
    seeds: list[int] = field(default_factory=list)
    profile: list[ProfileRow] = field(default_factory=list)

    def family(self, name: str) -> list[Measured]:
        return [m for m in self.measured if m.config.family == name]

    def accurate(self, m: Measured) -> bool:
        return m.error(self.reference) <= ACCURACY

    def fastest_accurate(self, prefix: str) -> Measured | None:
        """The fastest configuration accurate to 1e-4 on every seed, of the families named ``prefix*``."""
        ok = [m for m in self.measured if m.config.family.startswith(prefix) and self.accurate(m)]
        return min(ok, key=lambda m: m.time) if ok else None

    def best_or_tightest(self, family: str) -> Measured:
        """The fastest accurate configuration of a family, or its most accurate one if none is accurate."""
        ok = self.fastest_accurate(family)
        return ok if ok is not None else min(self.family(family), key=lambda m: m.error(self.reference))

    def ours_choice(self) -> Measured:
        """Our fastest accurate tol, or our tightest one if none was accurate."""
        return self.fastest_accurate("ours") or self.family("ours: Lanczos")[-1]


def measure_top_eigenvalue(spec: ModelSpec, seeds: Sequence[int], quick: bool) -> TopResult:
    """Task 1 on ``spec``: every configuration of ``top_eigenvalue_configs`` once per seed."""
    model, batch = common.build(spec)
    reference = reference_tops(model, batch, None)["model"]
    crosscheck = autograd_top(model, batch)
    unit = common.GradientUnit(model, batch)
    measured = run_interleaved(top_eigenvalue_configs(model, batch, quick), seeds, unit)
    result = TopResult(spec, spec.describe(model), reference, crosscheck, unit.seconds, measured, list(seeds))
    result.profile = profile_ours(model, batch, result.ours_choice().config.params["tol"])
    return result


def run_interleaved(
    configs: Sequence[Config], seeds: Sequence[int], unit: common.GradientUnit
) -> list[Measured]:
    """Every configuration once per seed, seeds outermost, sampling the gradient unit between rounds."""
    measured = [Measured(c) for c in configs]
    for seed in seeds:
        unit.sample()
        for m in measured:
            seconds, (value, matvecs, in_products) = common.timed(lambda m=m, seed=seed: m.config.run(seed))
            m.seconds.append(seconds)
            m.values.append(float(value))
            m.matvecs.append(int(matvecs))
            m.product_seconds.append(in_products)
    unit.sample()
    return measured


def top_eigenvalue_configs(model: nn.Module, batch: Any, quick: bool) -> list[Config]:
    """Each tool from its default to tighter settings (the sweeps); every run returns its products."""
    return [
        *_ours_configs(model, batch, quick),
        *_pyhessian_configs(model, batch, quick),
        *_eigenthings_configs(model, batch, quick),
        *_curvlinops_configs(model, batch, quick),
    ]


def _ours_configs(model: nn.Module, batch: Any, quick: bool) -> list[Config]:
    def ours(tol: float) -> Run:
        def run(seed: int) -> tuple[float, int, float]:
            r = analyze(
                model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False, tol=tol, seed=seed
            )
            return r.full.top_eigenvalue, r.matvecs, r.full.seconds  # .seconds: time in its products

        return run

    return [
        Config(
            "ours: Lanczos",
            f"tol={tol:g}" + (" (default)" if tol == 1e-4 else ""),
            ours(tol),
            tol == 1e-4,
            {"tol": tol},
        )
        for tol in ((1e-2, 3e-3, 1e-3, 1e-4) if quick else (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4))
    ]


def _pyhessian_configs(model: nn.Module, batch: Any, quick: bool) -> list[Config]:
    def power(tol: float, max_iter: int) -> Run:
        def run(seed: int) -> tuple[float, int, float]:
            torch.manual_seed(seed)  # PyHessian draws its start vector from the global stream
            with metered_pyhessian() as meter:
                values, _ = pyhessian_hessian(model, batch).eigenvalues(maxIter=max_iter, tol=tol)
            model.zero_grad(set_to_none=True)  # it leaves a create_graph gradient in .grad
            return values[0], meter.count, meter.seconds

        return run

    configs = [Config("PyHessian: power", "tol=1e-3, maxIter=100 (default)", power(1e-3, 100), True)]
    for tol in (3e-5, 1e-5) if quick else (1e-4, 3e-5, 1e-5, 1e-6):
        configs.append(Config("PyHessian: power", f"tol={tol:g}, maxIter=1000", power(tol, 1000)))
    return configs


def _eigenthings_configs(model: nn.Module, batch: Any, quick: bool) -> list[Config]:
    def power(tol: float, max_iter: int) -> Run:
        def run(seed: int) -> tuple[float, int, float]:
            op, meter = metered_eigenthings(he.HessianOperator(model, [batch], loss_fn))
            value = he.power_iteration_one(op, tol=tol, max_iter=max_iter, seed=seed)[0]
            return value, meter.count, meter.seconds

        return run

    def lanczos(**kwargs: Any) -> Run:
        def run(seed: int) -> tuple[float, int, float]:
            op, meter = metered_eigenthings(he.HessianOperator(model, [batch], loss_fn))
            result = he.lanczos(op, seed=seed, **kwargs)
            return result.eigenvalues[0].item(), meter.count, meter.seconds  # [0]: "the top" value

        return run

    configs = []
    for tol in (3e-3, 1e-4) if quick else (1e-2, 3e-3, 1e-3, 1e-4):
        label = "tol=1e-4, max_iter=100 (default)" if tol == 1e-4 else f"tol={tol:g}, max_iter=1000"
        max_iter = 100 if tol == 1e-4 else 1000
        configs.append(Config("eigenthings: power", label, power(tol, max_iter), tol == 1e-4, {"tol": tol}))
    configs.append(
        Config("eigenthings: lanczos", "default (k=10: 20 steps, LM)", lanczos(), True, {"steps": 20})
    )
    configs.append(Config("eigenthings: lanczos", "k=1 (2 steps)", lanczos(k=1)))
    for steps in (10, 12, 15, 20) if quick else (8, 10, 12, 15, 20):
        run = lanczos(k=1, max_iter=steps, which="LA")
        configs.append(
            Config("eigenthings: lanczos", f"k=1, max_iter={steps}, LA", run, params={"steps": steps})
        )
    return configs


def _curvlinops_configs(model: nn.Module, batch: Any, quick: bool) -> list[Config]:
    params = list(model.parameters())

    def eigsh_run(tol: float, ncv: int | None) -> Run:
        def run(seed: int) -> tuple[float, int, float]:
            op, meter = metered_scipy(curvlinops_operator(model, batch, params).to_scipy())
            v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
            value = eigsh(op, k=1, which="LA", tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False)[0]
            return value, meter.count, meter.seconds

        return run

    sweep = ((1e-2, None), (1e-2, 8)) if quick else ((1e-2, None), (1e-4, None), (1e-2, 8), (1e-4, 8))
    return [
        Config(
            "curvlinops: eigsh",
            f"tol={tol:g}" + (f", ncv={ncv}" if ncv else " (default ncv=20)"),
            eigsh_run(tol, ncv),
            params={"tol": tol, "ncv": ncv},
        )
        for tol, ncv in sweep
    ]


def profile_ours(model: nn.Module, batch: Any, tol: float, top: int = 8) -> list[ProfileRow]:
    """torch.profiler on one whole-model pass of ours: the operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        analyze(model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False, tol=tol)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        ProfileRow(e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total, e.count)
        for e in events[:top]
    ]
