"""The analysis settings ``analyze`` and ``HessianMonitor`` share: one object, validated once.

:class:`AnalysisSettings` holds what a curvature pass is asked to compute (blocks, eigenvalues, trace,
density, the Gauss-Newton split) and how (tolerance, step limits, dtype, mode, seed, chunks, the product
backend).
:func:`~lightning_hessian.analyze` builds one from its arguments, :class:`~lightning_hessian.HessianMonitor`
at construction, so both refuse the same bad input with the same message, the monitor before training
starts. Block *names* are checked against the model later (``analyze``, or the monitor's ``setup``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_hessian._context import MODES
from lightning_hessian.blocks import Block, FusedLayout, compile_rules
from lightning_hessian.operators import CURVATURES
from lightning_hessian.products import PRODUCTS, check_products

__all__ = ["AnalysisSettings", "check_positive", "check_settings"]


def check_positive(name: str, value: Any, kind: type = int) -> None:
    """Refuse a ``value`` of ``name`` that is not a positive ``kind`` (``bool`` is not an ``int`` here)."""
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}.")


_DTYPES = (torch.float32, torch.float64)
_MAX_SEED = 2**63 - 2**16  # torch.Generator.manual_seed takes < 2**63; the gradient start adds an offset


def check_settings(
    *,
    blocks: Any = "auto",
    rules: Any = None,
    top_k: Any = 1,
    max_iter: Any = 100,
    trace_matvecs: Any = 30,
    density_probes: Any = 4,
    density_steps: Any = 40,
    tol: Any = 1e-4,
    dtype: Any = None,
    mode: Any = "eval",
    seed: Any = 0,
    chunk_size: Any = None,
    basis_device: Any = None,
    products: Any = "exact",
) -> None:
    """Validate the settings shared by :func:`analyze` and :class:`~lightning_hessian.HessianMonitor`.

    One place for both, so that the callback refuses at construction what ``analyze`` would refuse at the
    first pass. Block *names* are checked against the model later (``analyze``, or the callback's setup).

    Raises:
        ValueError, TypeError: on the first invalid setting, with what to pass instead.
    """
    if (
        (blocks != "auto")
        if isinstance(blocks, str)
        else (
            blocks is not None
            and (not isinstance(blocks, Sequence) or not all(isinstance(b, Block | str) for b in blocks))
        )
    ):
        raise ValueError(
            f'blocks must be "auto", None, or a list of Blocks / block names (see find_blocks(model)); '
            f"got {blocks!r}."
        )
    compile_rules(rules)
    for name, value in [
        ("top_k", top_k),
        ("max_iter", max_iter),
        ("trace_matvecs", trace_matvecs),
        ("density_probes", density_probes),
        ("density_steps", density_steps),
    ]:
        check_positive(name, value)
    if trace_matvecs < 3:
        raise ValueError(
            f"trace_matvecs must be >= 3 (Hutch++ splits it into a sketch, its products and probes), got "
            f"{trace_matvecs!r}."
        )
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol) or not 0 < tol < 1:
        raise ValueError(
            f"tol must be a relative Ritz-residual tolerance in (0, 1), e.g. 1e-4; got {tol!r} (a tolerance "
            ">= 1 accepts any Ritz value as converged)."
        )
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(
            f"dtype must be None (the parameters' dtype), torch.float32 or torch.float64; got {dtype!r} "
            "(pass the torch.dtype object, not a string; half precision has no reliable double backward)."
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63 - 2**16), e.g. 0; got {seed!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive int (samples per chunk) or None, got {chunk_size!r}."
        )
    _check_device("basis_device", basis_device)
    if not isinstance(products, str) or products not in PRODUCTS:
        raise ValueError(
            f"products must be one of {PRODUCTS} (the Hessian-vector product backend: double backward, "
            f"finite differences of gradients, or finite differences where exact is unavailable); got "
            f"{products!r}."
        )


def _check_device(name: str, device: Any) -> None:
    """Refuse a ``device`` that is neither ``None`` nor a ``torch.device`` (or a string naming one)."""
    if device is None or isinstance(device, torch.device):
        return
    if isinstance(device, str):
        try:
            torch.device(device)
            return
        except RuntimeError:
            pass
    raise ValueError(
        f"{name} must be None (the operator's device) or a device such as 'cpu' or 'cuda:0' "
        f"(a str or torch.device), got {device!r}."
    )


@dataclass(frozen=True)
class AnalysisSettings:
    """What a curvature pass computes, validated at construction (see :func:`~lightning_hessian.analyze`
    for each setting). ``kwargs()`` gives them as ``analyze``'s keyword arguments."""

    blocks: str | Sequence[Block | str] | None = "auto"
    rules: Mapping[str, str | FusedLayout] | None = None
    full: bool = False
    top_k: int = 1
    smallest: bool = True
    trace: bool = True
    density: bool = False
    split: bool = False
    tol: float = 1e-4
    max_iter: int = 100
    trace_matvecs: int = 30
    density_probes: int = 4
    density_steps: int = 40
    dtype: torch.dtype | None = None
    mode: str = "eval"
    seed: int = 0
    chunk_size: int | None = None
    basis_device: str | torch.device | None = None
    curvature: str = "hessian"
    density_width: float = 0.02
    products: str = "exact"

    def __post_init__(self) -> None:
        check_settings(
            **{
                k: v
                for k, v in self.kwargs().items()
                if k not in ("full", "smallest", "trace", "density", "split", "curvature", "density_width")
            }
        )
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}.")
        if self.split and self.curvature != "hessian":
            raise ValueError('split=True decomposes the Hessian: use it with curvature="hessian".')
        width = self.density_width
        check_positive("density_width", float(width) if isinstance(width, int | float) else width, float)
        # Finite differences asked for by name cannot give the split; "auto" is checked once it resolves.
        check_products(self.products, self.curvature, self.split, None)

    def kwargs(self) -> dict[str, Any]:
        """The settings by name, as :func:`~lightning_hessian.analyze` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> AnalysisSettings:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)
