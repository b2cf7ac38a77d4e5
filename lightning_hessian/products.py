"""Which product backend a curvature pass uses: exact double backward or finite differences.

``products="exact"`` differentiates the gradient graph a second time (:mod:`lightning_hessian.operators`):
exact to rounding, but it needs every op of the model to have a double backward, which fused attention
kernels (FlashAttention, memory-efficient SDPA), compiled graphs (``torch.compile``) and sharded
parameters (FSDP, DTensor) do not have. A pass with exact products therefore switches to the math
attention kernel and runs compiled code eagerly (:func:`lightning_hessian._context.curvature_context`).
``products="finite_difference"`` (:mod:`lightning_hessian.finite_difference`) only needs gradients, so the
model runs as it trains. ``products="auto"`` takes finite differences where the exact path is unavailable
or would change how the model runs, and says so once per reason (a :class:`UserWarning`):

* the model (or a submodule) is compiled: an ``OptimizedModule`` or ``module.compile()``;
* a parameter is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallelism; ``"exact"`` is refused there:
  autograd finds the sharded parameters unused, the computation runs on all-gathered copies);
* the caller says why, through ``exact_unavailable`` (e.g. a Lightning strategy that shards the model).

Finite differences give Hessian products only: the Gauss-Newton / functional split needs exact products.
FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) is refused with either backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

__all__ = ["FSDP1_MESSAGE", "PRODUCTS", "check_products", "exact_blocker", "resolve_products"]

PRODUCTS = ("exact", "finite_difference", "auto")

_SAID: set[str] = set()  # the reasons "auto" has already announced


def _compiled(module: nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo compiles nothing
        return False
    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def _sharded(model: nn.Module) -> str | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()  # a torch without DTensor shards nothing
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "its parameters are sharded DTensors (FSDP2 fully_shard or tensor parallelism)"
    return None


FSDP1_MESSAGE = (
    "The model is wrapped in FSDP1 FullyShardedDataParallel (Lightning's FSDPStrategy), whose flattened, "
    "sharded parameters no product backend can address per block: neither double backward nor the "
    "per-parameter perturbations of finite differences work there. Train the monitored run with FSDP2: "
    "Lightning's ModelParallelStrategy (torch.distributed.fsdp.fully_shard), which finite-difference "
    'products support (products="auto"), or with DDP.'
)


def _check_not_fsdp1(model: nn.Module) -> None:
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(FSDP1_MESSAGE)


def exact_blocker(model: nn.Module) -> str | None:
    """Why exact (double-backward) products cannot run ``model`` as it trains, or ``None``."""
    sharded = _sharded(model)
    if sharded is not None:
        return sharded
    compiled = [name or type(m).__name__ for name, m in model.named_modules() if _compiled(m)]
    if compiled:
        return (
            f"it is compiled with torch.compile ({', '.join(compiled[:3])}), and compiled graphs have no "
            "double backward (exact products would run it eagerly)"
        )
    return None


def resolve_products(
    products: str,
    model: nn.Module,
    exact_unavailable: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[str, str | None]:
    """The backend to use: ``("exact" | "finite_difference", reason)``.

    Args:
        products: ``"exact"``, ``"finite_difference"`` or ``"auto"``.
        model: the model the pass runs.
        exact_unavailable: a caller's reason why exact products cannot be used (e.g. the training strategy
            shards the model); with ``"auto"`` it selects finite differences, with ``"exact"`` it is an
            error.
        warn: says the sentence of ``"auto"`` (default: a :class:`UserWarning`), e.g. on rank 0 only; it is
            said once per reason and process either way.

    Returns:
        The backend and why it was chosen (``None`` for exact products taken by default).

    Raises:
        ValueError: for an unknown ``products``; ``"exact"`` on sharded parameters or when the caller says
            it is unavailable; an FSDP1 model (:data:`FSDP1_MESSAGE`).
    """
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}.")
    _check_not_fsdp1(model)
    if products == "finite_difference":
        return products, "requested"
    if products == "exact":
        exact_unavailable = exact_unavailable or _sharded(model)
        if exact_unavailable is not None:
            raise ValueError(
                f"Exact Hessian-vector products are unavailable here: {exact_unavailable}. Pass "
                'products="finite_difference" (or "auto") to measure with finite differences of gradients.'
            )
        return products, None
    reason = exact_unavailable or exact_blocker(model)
    if reason is None:
        return "exact", None
    if reason not in _SAID:
        _SAID.add(reason)
        message = (
            f'products="auto": curvature is measured with finite-difference Hessian-vector products because '
            f"{reason}. See lightning_hessian.finite_difference for their error."
        )
        if warn is None:
            warnings.warn(message, UserWarning, stacklevel=3)
        else:
            warn(message)
    return "finite_difference", reason


def check_products(products: str, curvature: str, split: bool, reason: str | None) -> None:
    """Refuse what finite differences cannot give: the Gauss-Newton / functional curvatures and the split."""
    if products == "finite_difference" and (curvature != "hessian" or split):
        because = "" if reason in (None, "requested") else f" (chosen because {reason})"
        raise ValueError(
            f"Finite-difference products{because} give Hessian products only; curvature={curvature!r} / "
            'split=True need the exact double-backward path. Use curvature="hessian" and split=False, '
            'or products="exact" on a model that allows double backward.'
        )
