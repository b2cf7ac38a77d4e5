r"""Finite-difference curvature of an FSDP2-sharded model: shard-local products, summed over processes.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every
parameter is a ``DTensor`` of which each process holds one shard; the forward all-gathers the shards and
the backward reduce-scatters the gradients, so each process ends with *its shard of the gradient of the
loss summed over every process's data*. Exact products cannot be taken there (``autograd.grad`` with
respect to the sharded parameters finds them unused: the computation runs on all-gathered copies), but
central differences of gradients only need that backward:

.. math::

    (H_{bb} v)_{\text{shard}} \approx \frac{g_{\text{shard}}(\theta + \varepsilon P_b^\top v)
    - g_{\text{shard}}(\theta - \varepsilon P_b^\top v)}{2 \varepsilon},

with each process adding :math:`\varepsilon v` to its own shard only (in place, restored bitwise after),
the step :math:`\varepsilon` of :func:`lightning_hessian.finite_difference.step_sizes` from the block's
RMS weight (summed over processes) and the product assembled by summing the processes' disjoint shards
(one all-reduce per :meth:`ShardedOperator.matmat`, the scalars of the pass likewise). The result is the
curvature of the batch-size weighted mean loss over the union of the processes' data, as under DDP.
Block vectors are kept whole on every process (the estimators are unchanged); the model's ``.grad`` are
put back after every product, so a pass between accumulation steps changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian._rng import device_rng_state, set_device_rng_state
from lightning_hessian.batches import as_batches, batch_size
from lightning_hessian.blocks import Block, check_blocks
from lightning_hessian.errors import NonFiniteLossError
from lightning_hessian.finite_difference import accumulation_dtype, check_finite, steps_for_scale
from lightning_hessian.loss_calls import LossFn, check_loss

__all__ = ["ShardedOperator", "full_tensors", "is_sharded", "reshard"]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` has ``DTensor`` parameters (FSDP2 / ``ModelParallelStrategy``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters again (a no-op without FSDP2; no collective call).

    FSDP2 keeps the root module's parameters unsharded after a forward that no backward follows (its
    ``reshard_after_forward`` is off for the root), and a forward on unsharded parameters does not gather
    them again: weights written into the shards in place (a perturbation, or its bitwise restoration) would
    not be seen by the next forward, nor by training's. Call this before writing shards and after the
    forwards of a measurement.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 shards nothing
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensors(tensors: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``tensors`` with every ``DTensor`` gathered into a plain full tensor (e.g. Adam's state or the update
    of an FSDP2 model, for the whole-model tier's vectors). A collective call for each DTensor: every
    process must call this with the same names in the same order."""
    if tensors is None:
        return None
    return {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in tensors.items()}


def _local_slices(param: Any) -> tuple[slice, ...]:
    """Where a DTensor's local shard sits in the full parameter."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


class ShardedOperator:
    """Finite-difference Hessian blocks of a model with ``DTensor`` (FSDP2) parameters.

    Build it inside :func:`lightning_hessian._context.curvature_context` with ``exact=False``, on every
    process with that process's batches; it implements :class:`~lightning_hessian.estimators.BlockOperator`
    like :class:`~lightning_hessian.CurvatureOperator` (same ``sizes``, ``matvecs``, ``gradient``, ``loss``).

    Args:
        model: the FSDP2-sharded model (its parameters are changed in place during a product and restored
            bitwise; its ``.grad`` are restored).
        loss_fn, data, blocks: as for :class:`~lightning_hessian.CurvatureOperator` (block layouts refer
            to the full, unsharded parameter shapes).
        reduce: sums a tensor over the processes (required with more than one process).
        gradient_divide_factor: what FSDP2's reduce-scatter divides the summed gradients by: the data
            parallel world size by default (PyTorch's default).
        dtype, chunk_size: must be ``None`` (the model runs as it trains, on whole batches).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        blocks: Sequence[Block],
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
        gradient_divide_factor: float | None = None,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if dtype is not None or chunk_size is not None:
            raise ValueError(
                "A sharded (FSDP2) model is measured in its own dtype and on whole batches: pass dtype=None "
                "and chunk_size=None (smaller curvature batches keep a pass inside a memory budget)."
            )
        if not blocks:
            raise ValueError(
                "No parameter blocks to analyse: the model has no trainable parameters selected."
            )
        check_blocks(blocks, model)
        reshard(model)  # after a forward without backward FSDP2's root holds unsharded parameters
        self.blocks = tuple(blocks)
        self.sizes = tuple(b.numel for b in self.blocks)
        self.products, self.curvature = "finite_difference", "hessian"
        self.block_matvecs = [0] * len(self.blocks)
        self.block_seconds = [0.0] * len(self.blocks)
        self._model, self._loss_fn, self._reduce = model, loss_fn, reduce
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        first = next(iter(self._params.values()))
        self.device = first.to_local().device if hasattr(first, "to_local") else first.device
        self.dtype = accumulation_dtype(first.dtype)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self._divide = float(world if gradient_divide_factor is None else gradient_divide_factor)
        self._slices = {
            n: _local_slices(p) if hasattr(p, "to_local") else None for n, p in self._params.items()
        }
        self._batches = []
        for batch in as_batches(data):
            self._batches.append((batch, batch_size(batch), device_rng_state(self.device)))
        local_size = sum(n for _, n, _ in self._batches)
        size = self._sum(torch.tensor(float(local_size), dtype=torch.float64, device=self.device)).item()
        self._size = size
        local = self._local_gradient({}, check=True)
        self.loss = self._loss_sum / size
        self._grads = {n: self._full(n, g) for n, g in local.items()}

    @property
    def matvecs(self) -> int:
        """Total number of vectors multiplied so far, over all blocks."""
        return sum(self.block_matvecs)

    def _sum(self, tensor: Tensor) -> Tensor:
        return tensor if self._reduce is None else self._reduce(tensor)

    def _full(self, name: str, local: Tensor) -> Tensor:
        """A full-shape tensor holding ``local`` at this process's shard, zero elsewhere."""
        out = local.new_zeros(self._params[name].shape)
        out[self._slices[name] or ...] = local
        return out

    def _local_gradient(self, shifts: dict[str, Tensor], check: bool = False) -> dict[str, Tensor]:
        """This process's shard of the union's mean-loss gradient at θ + ``shifts`` (full-shape shifts)."""
        stash = {n: p.grad for n, p in self._params.items()}
        saved = {}
        reshard(self._model)  # a forward must gather the shards written below
        try:
            with torch.no_grad():
                for name, shift in shifts.items():
                    local = self._params[name].to_local()
                    saved[name] = local.clone()
                    piece = shift[self._slices[name] or ...]
                    local.copy_((local.to(piece.dtype) + piece).to(local.dtype))
            for p in self._params.values():
                p.grad = None
            losses = torch.zeros((), dtype=torch.float64, device=self.device)
            for index, (batch, n, state) in enumerate(self._batches):
                set_device_rng_state(state, self.device)
                loss = self._loss_fn(self._model, batch)
                if check:
                    loss, _ = check_loss(loss, index, need_output=False)
                elif isinstance(loss, tuple | list):
                    loss = loss[0]
                losses += n * loss.detach().double()
                (loss * (n * self._divide / self._size)).backward()
            if check:  # every process raises together, after one collective
                total = self._sum(torch.stack([losses, (~torch.isfinite(losses)).double()]))
                self._loss_sum = total[0].item()
                if total[1].item():
                    raise NonFiniteLossError("The curvature loss is non-finite on some process.")
            acc = self.dtype
            return {
                n: (p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local())).to(acc)
                for n, p in self._params.items()
            }
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self._params[name].to_local().copy_(original)
            for n, p in self._params.items():
                p.grad = stash[n]

    def gradient(self, index: int) -> Tensor:
        """The gradient of the union's loss restricted to block ``index``, as a block vector."""
        return self._sum(self.blocks[index].vector(self._grads))

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Finite-difference products of every block (see :class:`BlockOperator`), summed over processes."""
        if len(vectors) != len(self.blocks):
            raise ValueError(f"Expected {len(self.blocks)} entries (one per block), got {len(vectors)}.")
        results: list[Tensor | None] = [None] * len(self.blocks)
        for index, (block, columns) in enumerate(zip(self.blocks, vectors)):
            if columns is None:
                continue
            start = time.perf_counter()
            columns = (columns.unsqueeze(1) if columns.ndim == 1 else columns).to(self.device, self.dtype)
            results[index] = self._product(block, columns)
            self.block_seconds[index] += time.perf_counter() - start
            self.block_matvecs[index] += columns.shape[1]
        present = [r for r in results if r is not None]
        if present:
            summed = self._sum(torch.cat([r.reshape(-1) for r in present])).split(
                [r.numel() for r in present]
            )
            pieces = iter(summed)
            results = [None if r is None else next(pieces).view_as(r) for r in results]
        check_finite(results)
        return results

    def _product(self, block: Block, columns: Tensor) -> Tensor:
        """This process's shard of the block's products, zero elsewhere (summed over processes after)."""
        full = {n: self._full(n, self._params[n].to_local().detach().to(self.dtype)) for n in block.params}
        squares = self._sum(block.vector(full).pow(2).sum())  # the shards are disjoint: their sum is all
        steps = steps_for_scale((squares / block.numel).sqrt(), columns, self._params[block.params[0]].dtype)
        products = []
        for j, step in enumerate(steps.tolist()):
            if step == 0.0:
                products.append(columns.new_zeros((columns.shape[0], 1)))
                continue
            shift = {n: torch.zeros_like(full[n]) for n in block.params}
            offset = 0
            for part in block.parts:
                piece = part.select(shift[part.param])
                part.assign(
                    shift[part.param], columns[offset : offset + piece.numel(), j].reshape(piece.shape)
                )
                offset += piece.numel()
            plus = self._local_gradient({n: step * s for n, s in shift.items()})
            minus = self._local_gradient({n: -step * s for n, s in shift.items()})
            diff = {n: self._full(n, (plus[n] - minus[n]) / (2 * step)) for n in block.params}
            products.append(block.vector(diff).unsqueeze(1))
        return torch.cat(products, dim=1)
