r"""Which blocks a pass measures: ``"auto"``, names or :class:`~lightning_hessian.Block`\ s, with the fused
query / key / value layouts read off the attention once per model and cached."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.batches import map_tensors
from lightning_hessian.blocks import Block, FusedLayout, find_blocks
from lightning_hessian.loss_calls import LossFn
from lightning_hessian.sharded import is_sharded

__all__ = ["cached_blocks", "select_blocks"]


def select_blocks(
    model: nn.Module,
    blocks: str | Sequence[Block | str] | None,
    rules: Mapping[str, str | FusedLayout] | None,
    loss_fn: LossFn,
    example: Any,
    reduce: Callable[[Tensor], Tensor] | None,
) -> tuple[list[Block], str | None]:
    """The blocks to analyse, and why the layouts could not be read off the attention (or ``None``)."""
    if blocks is None:
        return [], None
    if isinstance(blocks, str) and blocks != "auto":
        raise ValueError(f'blocks must be "auto", None, or a list of Blocks / block names; got {blocks!r}.')
    problem = None
    if isinstance(blocks, str) or not all(isinstance(item, Block) for item in blocks):
        found, problem = cached_blocks(model, rules, loss_fn, example, reduce)
        if isinstance(blocks, str):
            return list(found), problem
    selected = []
    for item in blocks:
        if isinstance(item, Block):
            selected.append(item)
            continue
        known = {b.name: b for b in found}
        if item not in known:
            raise ValueError(f"No block named {item!r}. Known blocks: {', '.join(known)}.")
        selected.append(known[item])
    return selected, problem


# find_blocks' answer per model, for repeated analyses (a monitor's passes): reading the layouts off the
# attention costs a forward and a few backward passes. Keyed by what the answer depends on, and not by the
# batch, so that every process of a distributed run hits or misses the cache together.
_FOUND: weakref.WeakKeyDictionary[nn.Module, tuple[Any, list[Block]]] = weakref.WeakKeyDictionary()


def cached_blocks(
    model: nn.Module,
    rules: Mapping[str, str | FusedLayout] | None,
    loss_fn: LossFn,
    example: Any,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[Block], str | None]:
    """``find_blocks`` with the layouts read off ``loss_fn`` on one batch, cached per model.

    The cache is keyed by the parameter names, shapes and trainability, the rules and the loss function,
    so a monitor's passes infer the layouts once. A sharded (FSDP2) model's blocks come from the names
    alone. If running ``loss_fn`` fails here, the blocks come from
    the names alone (on every process, when ``reduce`` sums over processes), nothing is cached, and the
    failure is returned: the curvature pass then runs ``loss_fn`` itself and reports its error with what to
    do, or, if it succeeds, the caller warns that the layouts were not read.

    Returns:
        The blocks, and why the layouts could not be read off the attention (``None`` when they were).
    """
    key = (
        tuple((name, p.shape, p.requires_grad) for name, p in model.named_parameters()),
        None if rules is None else tuple((k, repr(v)) for k, v in rules.items()),
        loss_fn,
    )
    cached = _FOUND.get(model)
    if cached is not None and cached[0] == key:
        return list(cached[1]), None
    if is_sharded(model):
        # The layout probe runs the model on detached copies of its parameters, which FSDP2's sharded
        # DTensors do not survive (the model's next forward fails): the blocks come from the names.
        _FOUND[model] = key, find_blocks(model, rules)
        return list(_FOUND[model][1]), None
    device = next((p.device for p in model.parameters()), None)
    problem = None
    try:
        example = map_tensors(example, lambda t: t.to(device)) if device is not None else example
        found = find_blocks(model, rules, example=example, loss_fn=loss_fn)
    except Exception as error:
        problem = f"{type(error).__name__}: {error}"
    failed = problem is not None
    if reduce is not None:
        failed = bool(reduce(torch.tensor([float(failed)], device=device)).item())
    if failed:
        return find_blocks(model, rules), problem or "it failed on another process"
    _FOUND[model] = key, found
    return list(found), None
