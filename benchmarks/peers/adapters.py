"""The peers: their imports, product meters that count their Hessian-vector products, and shims.

Every tool is metered the same way: its product function is wrapped (``ProductMeter.wrap``) so that the
number of products (columns) and the seconds spent inside them are recorded beside the total time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import common

try:
    import curvlinops
    import hessian_eigenthings as he
    import pyhessian
    from pyhessian.utils import hessian_vector_product as pyhessian_hvp
    from scipy.sparse.linalg import LinearOperator
except ImportError as error:  # pragma: no cover - a message, not a crash
    raise SystemExit(
        f"{error}. The peers: pip install -e '.[bench]' && pip install --no-deps "
        "curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 (--no-deps: BackPACK's torchvision would "
        "replace torch)."
    ) from error

__all__ = ["CE", "curvlinops", "he", "pyhessian", "pyhessian_hvp"]

CE = nn.CrossEntropyLoss()  # the same mean cross-entropy as loss_fn, for the peers that take a criterion


@dataclass
class ProductMeter:
    """Counts a tool's Hessian-vector products and the time spent inside them."""

    count: int = 0
    seconds: float = 0.0

    def wrap(
        self, fn: Callable[..., Any], columns: Callable[..., int] = lambda *a, **k: 1
    ) -> Callable[..., Any]:
        """``fn``, metered: ``columns(*args)`` products per call (1 unless the call is a block)."""

        def metered(*args: Any, **kwargs: Any) -> Any:
            common.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            common.synchronize()
            self.seconds += time.perf_counter() - start
            self.count += columns(*args, **kwargs)
            return out

        return metered


@contextlib.contextmanager
def metered_pyhessian() -> Iterator[ProductMeter]:
    """Meter PyHessian's products: wraps the ``hessian_vector_product`` its ``hessian`` class calls."""
    module = sys.modules["pyhessian.hessian"]  # (``pyhessian.hessian`` the attribute is the class)
    meter = ProductMeter()
    module.hessian_vector_product = meter.wrap(pyhessian_hvp)
    try:
        yield meter
    finally:
        module.hessian_vector_product = pyhessian_hvp


def metered_scipy(operator: LinearOperator) -> tuple[LinearOperator, ProductMeter]:
    """A scipy operator that meters its products (columns)."""
    meter = ProductMeter()
    matvec = meter.wrap(operator.matvec, lambda x: 1 if x.ndim == 1 else x.shape[1])
    return LinearOperator(operator.shape, matvec=matvec, dtype=operator.dtype), meter


def metered_eigenthings(op: Any) -> tuple[Any, ProductMeter]:
    """A hessian-eigenthings operator that meters its products."""
    meter = ProductMeter()
    return he.LambdaOperator(meter.wrap(op.matvec), op.size, op.device, op.dtype), meter


def curvlinops_operator(model: nn.Module, batch: Any, params: Sequence[Tensor] | None = None) -> Any:
    """curvlinops' Hessian of the mean cross-entropy, its determinism check off (in its favour)."""
    params = list(model.parameters()) if params is None else list(params)
    return curvlinops.HessianLinearOperator(
        model, CE, params, [batch], check_deterministic=False, num_data=batch[0].shape[0]
    )


def pyhessian_hessian(model: nn.Module, batch: Any) -> Any:
    """PyHessian's ``hessian`` object: the forward pass and the ``create_graph`` gradient."""
    return pyhessian.hessian(model, CE, data=batch, cuda=common.on_cuda())


@contextlib.contextmanager
def pyhessian_compat(dtype: torch.dtype) -> Iterator[None]:
    """Let PyHessian 0.1 run on today's PyTorch, in ``dtype``, and restore everything afterwards.

    * ``torch.eig`` (used by ``hessian.density``) was removed from PyTorch; PyHessian applies it to the
      symmetric Lanczos tridiagonal and reads ``(eigenvalues[:, 0], eigenvectors)``: ``linalg.eigh`` gives
      the same for a symmetric matrix.
    * PyHessian draws its random vectors (and builds ``T``) in the default dtype.
    """

    def eig(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    saved_eig, saved_dtype = torch.eig, torch.get_default_dtype()
    torch.eig = eig
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.eig = saved_eig
        torch.set_default_dtype(saved_dtype)
