"""Spectral estimators on a block-diagonal symmetric operator: pure linear algebra, no models.

Every estimator works on all blocks of a :class:`BlockOperator` at once (one batched ``matmat`` call per
iteration), is seeded and deterministic, and draws its random vectors on the CPU in float64, so results do not
depend on the device.

* :func:`lanczos`: top-k and smallest eigenvalues (Lanczos with full reorthogonalisation). Use this one.
* :func:`slq`: spectral density by stochastic Lanczos quadrature.
* :func:`hutchpp`: trace estimates (Hutch++).

Baselines the benchmarks compare against are kept in their modules and not exported:
``power.power_iteration`` (PyHessian's method), ``trace.hutchinson`` (plain Hutchinson) and
``lanczos.lanczos_with_error_estimates`` (the gap-estimate stopping rule of ``benchmarks/bench_stopping.py``).
"""

from lightning_hessian.estimators._operator import BlockOperator, DenseBlockOperator
from lightning_hessian.estimators.lanczos import LanczosResult, lanczos
from lightning_hessian.estimators.slq import SpectralDensity, slq
from lightning_hessian.estimators.trace import TraceResult, hutchpp

__all__ = [
    "BlockOperator",
    "DenseBlockOperator",
    "LanczosResult",
    "SpectralDensity",
    "TraceResult",
    "hutchpp",
    "lanczos",
    "slq",
]
