"""Spectral estimators on a block-diagonal symmetric operator: pure linear algebra, no models.

Every estimator works on all blocks of a :class:`BlockOperator` at once (one batched ``matmat`` call per
iteration), is seeded and deterministic, and draws its random vectors on the CPU in float64, so results do not
depend on the device.

* :func:`lanczos`: top-k and smallest eigenvalues (Lanczos with full reorthogonalisation). Use this one.
* :func:`power_iteration`: largest-magnitude eigenvalues with deflation, as in PyHessian (for comparison).
* :func:`slq`: spectral density by stochastic Lanczos quadrature.
* :func:`hutchinson`, :func:`hutchpp`: trace estimates.
"""

from lightning_hessian.estimators._operator import BlockOperator, DenseBlockOperator
from lightning_hessian.estimators.lanczos import LanczosResult, lanczos
from lightning_hessian.estimators.power import PowerResult, power_iteration
from lightning_hessian.estimators.slq import SpectralDensity, slq
from lightning_hessian.estimators.trace import TraceResult, hutchinson, hutchpp

__all__ = [
    "BlockOperator",
    "DenseBlockOperator",
    "LanczosResult",
    "PowerResult",
    "SpectralDensity",
    "TraceResult",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "slq",
]
