r"""Curvature operators restricted to parameter blocks, with batched matrix-vector products.

For a loss :math:`\mathcal L(\theta) = \sum_i w_i\, \ell(f(\theta, x_i), y_i)` over batches :math:`i` (weights
:math:`w_i = n_i / \sum_j n_j`, the batch sizes), and a block :math:`b` of parameters selected by
:math:`P_b`, this module multiplies vectors by the diagonal blocks

* Hessian :math:`H_{bb} = P_b \nabla^2_\theta \mathcal L\, P_b^\top`,
* Gauss-Newton (outer-product part) :math:`G_{bb} = P_b J^\top (\nabla^2_f \ell) J P_b^\top`,
  with :math:`J = \partial f / \partial \theta`,
* functional part :math:`H_{bb} - G_{bb}` (:math:`\sum_k (\partial \ell / \partial f_k) \nabla^2 f_k`),

following the split of Ormaniec, Dangel & Singh, "What Does It Mean to Be a Transformer? Insights from a
Theoretical Hessian Analysis", ICLR 2025 (arXiv:2410.10986), eq. (3).

How the products are computed:

* The gradient graph is built once per batch (``create_graph=True``) and reused for every product: a
  Hessian-vector product is then one backward pass through that graph,
  :math:`H_{bb} v = P_b \nabla_\theta \langle g, P_b^\top v\rangle`, and restricting the inputs of that
  backward to the block's parameters lets autograd prune the rest of the graph.
* Gauss-Newton products use the same retained graph: :math:`J v` by the double-backward trick
  (:math:`J v = \nabla_u \langle J^\top u, v\rangle`, with :math:`J^\top u` built once for a dummy
  :math:`u`), :math:`\nabla^2_f \ell` by a backward through the loss, and :math:`J^\top w` by a plain
  backward.
* The operators work on detached copies of the parameters and buffers, passed to the model with
  :func:`torch.func.functional_call`, so the model's weights, ``.grad`` and buffers are never touched.
* Memory: by default every batch's graph is kept alive for the whole pass (the fastest). With
  ``chunk_size=N`` each batch is split into chunks of at most ``N`` samples and the graphs are *not*
  kept: every product call rebuilds one chunk's graph at a time (forward and ``create_graph`` gradient),
  multiplies all requested blocks' vectors on it and frees it, so the peak memory is that of one chunk's
  graph, at the price of one graph build per chunk per product call.

Batches: tensors found in tuples, lists, dicts, other ``Mapping``\ s (``UserDict``, Hugging Face's
``BatchEncoding``) and dataclasses are moved to the parameters' device, and floating ones cast to the
compute dtype; other objects are passed to ``loss_fn`` unchanged (a device or dtype mismatch inside
``loss_fn`` is then reported with what to do).

The class implements :class:`lightning_hessian.estimators.BlockOperator`, so every estimator runs on it.
Build it inside :func:`lightning_hessian._context.curvature_context` (``analyze`` does this).
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_hessian.blocks import Block, check_blocks

__all__ = [
    "BATCHING",
    "CURVATURES",
    "Batches",
    "CurvatureOperator",
    "NonFiniteLossError",
    "PassFailedElsewhere",
    "PreconditionedOperator",
    "split_batch",
]

CURVATURES = ("hessian", "gauss_newton", "functional")
BATCHING = ("auto", "loop", "vmap")

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, Tensor]"]


class NonFiniteLossError(ValueError):
    """The loss on a curvature batch is NaN or infinite, so its curvature is undefined."""


class PassFailedElsewhere(RuntimeError):
    """With data split over processes: the pass failed on another process, so it is abandoned here too."""


class Batches(tuple):
    """Marks a sequence of batches, so that ``analyze(model, loss_fn, Batches([b1, b2]))`` uses all of them.

    A plain tuple or list is taken as *one* batch (``(inputs, targets)`` is a tuple too). A
    :class:`~torch.utils.data.DataLoader` or any iterator is taken as several batches without marking.
    """

    __slots__ = ()


def as_batches(data: Any) -> list[Any]:
    """Return the list of batches that ``data`` stands for (see :class:`Batches`)."""
    if isinstance(data, Batches | DataLoader | collections.abc.Iterator):
        batches = list(data)
        if not batches:
            raise ValueError("data holds no batches: pass at least one batch.")
        return batches
    return [data]


def _is_dataclass_instance(data: Any) -> bool:
    return dataclasses.is_dataclass(data) and not isinstance(data, type)


def find_tensors(data: Any) -> Iterator[Tensor]:
    r"""The tensors of a batch, in order: inside tuples, lists, ``Mapping``\ s and dataclasses, recursively.

    Tensors held by other objects are not found (and so are neither moved, cast nor split).
    """
    if isinstance(data, Tensor):
        yield data
    elif isinstance(data, collections.abc.Mapping):
        for value in data.values():
            yield from find_tensors(value)
    elif _is_dataclass_instance(data):
        for field in dataclasses.fields(data):
            yield from find_tensors(getattr(data, field.name))
    elif isinstance(data, list | tuple):
        for value in data:
            yield from find_tensors(value)


def map_tensors(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    r"""A copy of a batch with ``fn`` applied to every tensor :func:`find_tensors` finds.

    The containers are rebuilt (the user's batch is never modified): dicts, ``defaultdict``, ``UserDict``
    subclasses (Hugging Face's ``BatchEncoding``; their other attributes are kept), other ``Mapping``\ s
    built from a dict, named tuples, tuples, lists, and dataclasses (frozen ones too; a shallow copy whose
    fields are replaced). Other objects are returned as they are.

    Raises:
        TypeError: when a container cannot be rebuilt, with what to do.
    """
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, collections.abc.Mapping):
        items = {key: map_tensors(value, fn) for key, value in data.items()}
        if type(data) is dict:
            return items
        if isinstance(data, collections.defaultdict):
            return type(data)(data.default_factory, items)
        if isinstance(data, collections.UserDict):
            out = copy.copy(data)  # UserDict.__copy__ copies its .data: the original is not touched
            out.data = items
            return out
        try:
            return type(data)(items)
        except Exception as error:
            raise TypeError(
                f"Cannot rebuild the batch's {type(data).__name__} with its tensors moved ({error}). Make "
                f"{type(data).__name__}(dict) work, pass a dict instead, or put the batch on the model's "
                "device and dtype yourself before calling analyze (then it is passed through unchanged)."
            ) from error
    if _is_dataclass_instance(data):
        out = copy.copy(data)
        for field in dataclasses.fields(data):
            object.__setattr__(out, field.name, map_tensors(getattr(data, field.name), fn))
        return out
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a named tuple
        return type(data)(*(map_tensors(value, fn) for value in data))
    if isinstance(data, list | tuple):
        items = [map_tensors(value, fn) for value in data]
        return items if type(data) is list else tuple(items) if type(data) is tuple else type(data)(items)
    return data


def batch_size(batch: Any) -> int:
    """Size of a batch: the leading dimension of its first tensor (1 if it holds no tensor with a dim).

    "First" is in the order of :func:`find_tensors`: put a batch-first tensor (the inputs) first, not a
    mask shared by all samples. It weights the batch in the mean loss over several batches, and is the
    dimension ``chunk_size`` splits.
    """
    return next((t.shape[0] for t in find_tensors(batch) if t.ndim > 0), 1)


def split_batch(batch: Any, chunk_size: int | None) -> list[tuple[Any, int]]:
    """Split a batch along its first dimension into chunks of at most ``chunk_size`` samples.

    Args:
        batch: one batch; every tensor with a dimension must have the batch size first.
        chunk_size: the largest chunk; ``None`` keeps the batch whole.

    Returns:
        ``(chunk, size)`` pairs; 0-dimensional tensors go whole into every chunk.

    Raises:
        ValueError: when a tensor's first dimension is not the batch size (the chunks would not be the
            batch's samples).
    """
    n = batch_size(batch)
    if chunk_size is None or n <= chunk_size:
        return [(batch, n)]
    shapes = [tuple(t.shape) for t in find_tensors(batch)]
    if any(shape and shape[0] != n for shape in shapes):
        raise ValueError(
            f"chunk_size={chunk_size} splits each batch along its first dimension (the batch size, {n}: "
            f"the first dimension of its first tensor), but the batch's tensors have shapes {shapes}. Give "
            "every tensor the batch size first (e.g. targets of shape (batch, seq) rather than flattened, "
            "masks shared by all samples built inside the model), or pass chunk_size=None."
        )
    chunks = []
    for start in range(0, n, chunk_size):
        chunk = map_tensors(batch, lambda t, s=start: t[s : s + chunk_size] if t.ndim else t)
        chunks.append((chunk, min(chunk_size, n - start)))
    return chunks


_DEVICE_ERRORS = re.compile(
    r"same device|expected device|device type|on the expected device|must be on|on a different device", re.I
)
_DTYPE_ERRORS = re.compile(r"same dtype|expected scalar type|expected .*dtype|found dtype", re.I)
# Convolutions say "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)": either one.
_EITHER_ERRORS = re.compile(r"Input type .* and (weight|bias) type", re.I)
_REENTRANT_ERROR = "Checkpointing is not compatible with .grad()"


class _Graph:
    """Retained graphs that products are computed on: all batches at once, or one chunk.

    ``grads``: the weighted gradient per needed parameter (with its graph); with the Gauss-Newton graphs,
    ``outputs`` / ``output_grads`` per batch and ``dummies`` / ``jtu`` for :math:`J v` products.
    """

    __slots__ = ("dummies", "grads", "jtu", "output_grads", "outputs")

    def __init__(self, grads: dict[str, Tensor]) -> None:
        self.grads = grads
        self.outputs: list[Tensor] = []
        self.output_grads: list[Tensor] = []
        self.dummies: list[Tensor] = []
        self.jtu: dict[str, Tensor] = {}

    def prepare_jacobian(self, names: Sequence[str], leaves: Sequence[Tensor]) -> None:
        """``J^T u`` for a dummy ``u``: linear in ``u``, so one graph serves every ``J v``."""
        self.dummies = [torch.zeros_like(o, requires_grad=True) for o in self.outputs]
        self.jtu = dict(zip(names, _grad(self.outputs, leaves, self.dummies, create_graph=True)))


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _LossCall(nn.Module):
    """Calls ``loss_fn(model, batch)``; a module so that ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def _check_loss(value: Any, index: int, need_output: bool) -> tuple[Tensor, Tensor | None]:
    """Validate what ``loss_fn`` returned and split it into ``(loss, output)``."""
    output = None
    if isinstance(value, tuple | list) and len(value) == 2:
        value, output = value
    elif need_output:
        raise TypeError(
            "The Gauss-Newton / functional split needs the model output: make loss_fn return "
            "(loss, output), where output is the tensor the loss is computed from (e.g. the logits)."
        )
    if not isinstance(value, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor (or a pair (loss, output)); got {type(value).__name__}."
        )
    if value.numel() != 1:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(value.shape)} on batch {index}; the curvature is "
            "defined for a scalar loss: reduce it (e.g. .mean()) inside loss_fn."
        )
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"loss_fn returned {value.item()} on batch {index}; the curvature of a non-finite loss is "
            "undefined. Check the batch and the model, or analyse another batch."
        )
    if not value.requires_grad:
        raise ValueError(
            "The loss does not depend on the parameters being analysed (it has no grad_fn). Make sure "
            "loss_fn computes the loss from model(...) without .detach(), torch.no_grad() or .item(), and "
            "that the analysed parameters are trainable."
        )
    if need_output and (not isinstance(output, Tensor) or not output.requires_grad):
        raise TypeError(
            "The second element returned by loss_fn must be the model output tensor the loss is computed "
            "from (with a grad_fn)."
        )
    return value.reshape(()), output


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    batched: bool = False,
) -> list[Tensor]:
    """``torch.autograd.grad`` that keeps graphs alive and gives zeros where an output has no graph."""
    pairs = [
        (o, g)
        for o, g in zip(outputs, grad_outputs if grad_outputs is not None else [None] * len(outputs))
        if o.requires_grad
    ]
    shape_of = (lambda t: (grad_outputs[0].shape[0], *t.shape)) if batched else (lambda t: t.shape)
    if not pairs:
        return [torch.zeros(shape_of(x), dtype=x.dtype, device=x.device) for x in inputs]
    outs, gouts = zip(*pairs)
    grads = torch.autograd.grad(
        outs,
        inputs,
        grad_outputs=None if grad_outputs is None else gouts,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=batched,
    )
    if batched:
        # Inputs the outputs do not reach come back as unbatched zeros: give them the batch dimension.
        grads = tuple(
            g if g.shape == shape_of(x) else g.new_zeros(shape_of(x)) for g, x in zip(grads, inputs)
        )
    return list(grads)


class PreconditionedOperator:
    r"""The symmetric :math:`P^{-1/2} A P^{-1/2}` of a block operator :math:`A` and a diagonal :math:`P > 0`.

    Its eigenvalues are those of :math:`P^{-1} A` (the two are similar), so Lanczos on it gives the
    preconditioned sharpness :math:`\lambda_{\max}(P^{-1} H)` of adaptive optimisers (Cohen et al.,
    "Adaptive Gradient Methods at the Edge of Stability", arXiv:2207.14484).

    Args:
        op: the operator (e.g. a :class:`CurvatureOperator`).
        diagonals: per block, the diagonal of :math:`P` as a block vector, or ``None`` to leave the block
            out (it must then never be asked for).
    """

    def __init__(self, op: Any, diagonals: Sequence[Tensor | None]) -> None:
        if len(diagonals) != len(op.sizes):
            raise ValueError(f"Expected {len(op.sizes)} diagonals (one per block), got {len(diagonals)}.")
        self.op, self.sizes, self.dtype, self.device = op, op.sizes, op.dtype, op.device
        self._scales = []
        for size, d in zip(op.sizes, diagonals):
            if d is not None:
                if d.shape != (size,) or not bool((d > 0).all()):
                    raise ValueError(f"A preconditioner diagonal must be positive, of shape ({size},).")
                d = d.to(device=op.device, dtype=op.dtype).rsqrt().unsqueeze(1)
            self._scales.append(d)

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """``P_b^{-1/2} A_b P_b^{-1/2} vectors[b]`` for every block (see :class:`BlockOperator`)."""
        scaled = [None if v is None else s * v.reshape(len(s), -1) for v, s in zip(vectors, self._scales)]
        return [None if r is None else s * r for r, s in zip(self.op.matmat(scaled), self._scales)]


class CurvatureOperator:
    """The block-diagonal of a curvature matrix of ``loss_fn`` over ``data``, as a batched linear operator.

    Args:
        model: the model. Its parameters, ``.grad`` and buffers are left untouched.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss, or ``(loss, output)`` where ``output`` is
            the tensor the loss is computed from (required for ``"gauss_newton"`` and ``"functional"``).
        data: one batch, or several (a :class:`Batches`, a ``DataLoader`` or an iterator): the operator is
            then the curvature of the batch-size-weighted mean loss. Every batch's graph is kept in memory,
            unless ``chunk_size`` is given.
        blocks: the parameter blocks (from :func:`~lightning_hessian.find_blocks` or
            :func:`~lightning_hessian.blocks.model_block`); block ``b`` acts on vectors of size
            ``blocks[b].numel`` ordered as the block's parts.
        curvature: ``"hessian"``, ``"gauss_newton"`` or ``"functional"`` (Hessian minus Gauss-Newton).
        dtype: compute dtype (e.g. ``torch.float64``); ``None`` keeps the parameters' dtype. Floating inputs
            in the batches are cast to it.
        batching: how several vectors of one block are multiplied: ``"loop"`` (one backward per vector) or
            ``"vmap"`` (one ``is_grads_batched`` backward for all; its memory grows with the number of
            vectors). ``"auto"`` picks, per call, what ``benchmarks/bench_operators.py`` measured to be
            faster: ``"vmap"`` for several vectors on a CUDA device without ``chunk_size`` (3-5x faster for
            8 vectors per block on an H100), ``"loop"`` otherwise (on CPU the loop was as fast or faster, and
            for one vector always). Gauss-Newton products always loop.
        split: also prepare the Gauss-Newton graphs, so that :meth:`using` can switch between all three
            curvatures on one forward pass (``loss_fn`` must then return ``(loss, output)``).
        reduce: for data split over processes: a function that sums a tensor over all processes and
            returns the sum on each (e.g. ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``). The
            operator is then the curvature of the mean loss over the union of every process's batches:
            the batch sizes, losses and every product are summed across processes, so all processes run
            the estimators on identical numbers and make the same collective calls. An error on one
            process is raised on all of them.
        chunk_size: keep the pass inside a memory budget: split every batch into chunks of at most this
            many samples (along the first dimension of its tensors) and keep no graph between product
            calls; each call rebuilds one chunk's graph at a time. The peak memory is then that of one
            chunk's graph instead of all batches' graphs, and every product call costs one extra forward
            and gradient per chunk. The result equals the unchunked one when ``loss_fn`` is the mean of
            per-sample losses (e.g. a mean cross-entropy over equal-length sequences) and samples do not
            interact (no BatchNorm batch statistics with ``mode="train"``). ``None``: keep the graphs.
        products: how products are computed: ``"exact"`` (default; double backward through retained
            graphs), ``"finite_difference"`` (central differences of gradients, no double backward: for
            fused attention kernels, compiled and sharded models; Hessian only, see
            :mod:`lightning_hessian.finite_difference` for the step rule and its error) or ``"auto"``
            (finite differences where exact products are unavailable, see
            :func:`lightning_hessian.products.resolve_products`). Finite differences keep no graph: like
            ``chunk_size``, the (moved) batches are kept and every product runs them again.

    Attributes:
        sizes: the block sizes. ``block_matvecs`` / ``block_seconds``: products computed so far and the
            time they took, per block (``matvecs``: their total). ``loss``: the weighted mean loss.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        blocks: Sequence[Block],
        *,
        curvature: str = "hessian",
        dtype: torch.dtype | None = None,
        batching: str = "auto",
        split: bool = False,
        reduce: Callable[[Tensor], Tensor] | None = None,
        chunk_size: int | None = None,
        products: str = "exact",
    ) -> None:
        from lightning_hessian.products import check_products, resolve_products

        self.products, self.products_reason = resolve_products(products, model)
        check_products(self.products, curvature, split, self.products_reason)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive int (samples per chunk) or None, got {chunk_size!r}."
            )
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if not blocks:
            raise ValueError(
                "No parameter blocks to analyse: the model has no trainable parameters selected."
            )
        self.blocks = tuple(blocks)
        self.curvature = curvature
        self.batching = batching
        self._vmap_failed = False
        self.sizes = tuple(block.numel for block in self.blocks)
        self.block_matvecs = [0] * len(self.blocks)
        self.block_seconds = [0.0] * len(self.blocks)

        params = dict(model.named_parameters())
        needed = list(dict.fromkeys(name for block in self.blocks for name in block.params))
        for name in needed:
            if name not in params:
                raise ValueError(f"Block parameter {name!r} is not a parameter of the model.")
            if not params[name].requires_grad:
                raise ValueError(f"Block parameter {name!r} is frozen (requires_grad=False).")
        check_blocks(self.blocks, model)
        devices = {params[name].device for name in needed}
        if len(devices) > 1:
            raise ValueError(f"The analysed parameters live on several devices {devices}; move them to one.")
        self.device = devices.pop()
        self.dtype = dtype if dtype is not None else params[needed[0]].dtype
        if self.products == "finite_difference":
            from lightning_hessian.finite_difference import check_dtype

            check_dtype(self.dtype)

        def detached(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to(self.dtype) if dtype is not None and t.is_floating_point() else t

        # Our own leaves: autograd only ever touches these copies, never the model's tensors. They are copies
        # (not views) because a forward may write to its weights in place (nn.Embedding(max_norm=...)).
        # Every trainable copy requires grad (not only the analysed ones), so that a loss without a graph
        # means a broken loss_fn rather than blocks the loss happens not to use.
        self._leaves = {
            name: detached(p).clone().requires_grad_(p.requires_grad) for name, p in params.items()
        }
        tensors = {f"model.{name}": t for name, t in self._leaves.items()}
        tensors.update({f"model.{name}": detached(b).clone() for name, b in model.named_buffers()})
        self._shapes = {name: self._leaves[name].shape for name in needed}

        self._reduce = reduce
        self._split = split
        need_output = split or curvature != "hessian"
        self._call = _LossCall(model, loss_fn)
        self._tensors = tensors
        self._needed = needed
        self._leaf_list = [self._leaves[name] for name in needed]
        self.chunk_size = chunk_size
        leaves = self._leaf_list
        grads = [torch.zeros_like(leaf) for leaf in leaves]
        graph_outputs: list[Tensor] = []
        output_grads: list[Tensor] = []
        # With chunk_size or finite differences: the (moved) chunks, their sizes and the random state before
        # their first forward, so that every rebuild of a chunk's graph (every perturbed forward) draws the
        # same dropout masks (mode="train").
        self._chunks: list[tuple[Any, int, tuple[Tensor, Tensor | None]]] = []
        keep_graph = chunk_size is None and self.products == "exact"
        # Graphs of sum_i n_i loss_i (n_i the batch sizes), divided by the total size N below: once N is known
        # across processes, when a reduce is given.
        local_size, local_loss, error = 0, 0.0, None
        try:
            for index, batch in enumerate(as_batches(data)):
                for chunk, n in split_batch(batch, chunk_size):
                    chunk = self._move(chunk)
                    state = _rng_state(self.device) if not keep_graph else None
                    loss, output = self._forward(chunk, index, need_output, check=True)
                    local_size, local_loss = local_size + n, local_loss + n * loss.item()
                    if not keep_graph:  # the gradient only: no graph is kept
                        self._chunks.append((chunk, n, state))
                        step = _grad([n * loss], leaves)
                        grads = [total + g for total, g in zip(grads, step)]
                        continue
                    step = _grad([n * loss], leaves, create_graph=True)
                    grads = [total + g for total, g in zip(grads, step)]
                    if need_output:
                        graph_outputs.append(output)
                        output_grads.append(_grad([n * loss], [output], create_graph=True)[0])
        except Exception as exc:
            if reduce is None:
                raise
            error = exc  # raised after the collective below, so no other process waits forever
        non_finite = isinstance(error, NonFiniteLossError)
        totals = torch.tensor(
            [float(error is not None), float(non_finite), local_size, local_loss], dtype=torch.float64
        )
        failed, failed_non_finite, size, loss_sum = self._sum(totals.to(self.device)).tolist()
        if error is not None:
            raise error
        if failed_non_finite:  # the same kind of failure everywhere: the model diverged, not the pass
            raise NonFiniteLossError(
                "The curvature loss is non-finite on another process: the union's curvature is undefined."
            )
        if failed:
            raise PassFailedElsewhere(
                "The curvature pass failed on another process (see its error); skipped here too."
            )
        self._size = size
        self.loss = loss_sum / size
        self._grads = {name: g / size for name, g in zip(needed, grads)}
        self._graph: _Graph | None = None
        if keep_graph:
            self._graph = _Graph(self._grads)
            if need_output:
                self._graph.outputs = graph_outputs
                self._graph.output_grads = [g / size for g in output_grads]
                self._graph.prepare_jacobian(needed, leaves)

    def _forward(
        self,
        batch: Any,
        index: int,
        need_output: bool,
        check: bool = False,
        tensors: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Any]:
        """``loss_fn`` on one (moved) batch via the detached tensors (or ``tensors``), with clear errors."""
        try:
            value = functional_call(self._call, self._tensors if tensors is None else tensors, (batch,))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            message = str(error)
            if _REENTRANT_ERROR in message:
                from lightning_hessian._context import REENTRANT_MESSAGE, ReentrantCheckpointError

                raise ReentrantCheckpointError(REENTRANT_MESSAGE) from error
            if _EITHER_ERRORS.search(message):
                kind = "device or dtype"
            elif _DEVICE_ERRORS.search(message):
                kind = "device"
            elif _DTYPE_ERRORS.search(message):
                kind = "dtype"
            else:
                raise
            raise RuntimeError(
                f"loss_fn failed on batch {index} with a {kind} mismatch: {message.strip()} The curvature "
                f"is computed on {self.device} in {self.dtype}: the batch's tensors are moved there (and "
                "floating ones cast) when they sit in tuples, lists, dicts, other Mappings or dataclasses, "
                "but tensors held by other objects are passed as they are. Pass the batch in such a "
                "container, or move and cast it inside loss_fn (e.g. x.to(next(model.parameters()))); "
                "tensors created inside the model should follow its inputs (torch.zeros(..., "
                "device=x.device, dtype=x.dtype))."
            ) from error
        if check:
            return _check_loss(value, index, need_output)
        if isinstance(value, tuple | list) and len(value) == 2:
            return value[0].reshape(()), value[1]
        return value.reshape(()), None

    def _build(self, chunk: Any, size: int, state: tuple[Tensor, Tensor | None]) -> _Graph:
        """One chunk's graph, weighted by its share ``size / N`` of the mean loss (``chunk_size`` mode)."""
        _set_rng_state(state, self.device)
        need_output = self.curvature != "hessian"
        loss, output = self._forward(chunk, 0, need_output)
        weighted = loss * (size / self._size)
        graph = _Graph(dict(zip(self._needed, _grad([weighted], self._leaf_list, create_graph=True))))
        if need_output:
            graph.outputs = [output]
            graph.output_grads = [_grad([weighted], [output], create_graph=True)[0]]
            graph.prepare_jacobian(self._needed, self._leaf_list)
        return graph

    def _sum(self, tensor: Tensor) -> Tensor:
        return tensor if self._reduce is None else self._reduce(tensor)

    def _move(self, batch: Any) -> Any:
        """The batch with its tensors on the operator's device and floating ones in its dtype.

        A batch already there is returned as it is (not rebuilt), so any object works then.
        """

        def target(t: Tensor) -> tuple[torch.device, torch.dtype]:
            return self.device, self.dtype if t.is_floating_point() else t.dtype

        if all((t.device, t.dtype) == target(t) for t in find_tensors(batch)):
            return batch
        return map_tensors(batch, lambda t: t.to(*target(t)))

    # --- block vectors <-> parameter-shaped tensors -----------------------------------------------------

    def _scatter(self, block: Block, columns: Tensor) -> dict[str, Tensor]:
        """(numel, m) block vectors -> per parameter (m, *shape) tensors, zero outside the block."""
        m = columns.shape[1]
        out: dict[str, Tensor] = {}
        offset = 0
        for part in block.parts:
            shape = self._shapes[part.param]
            target = out.setdefault(part.param, columns.new_zeros((m, *shape)))
            piece_shape = part.select(target, leading=1).shape
            n = piece_shape[1:].numel()
            part.assign(target, columns[offset : offset + n].T.reshape(piece_shape), leading=1)
            offset += n
        return out

    @staticmethod
    def _gather(block: Block, tensors: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`_scatter`: per parameter (m, *shape) tensors -> (numel, m) block vectors."""
        pieces = [part.select(tensors[part.param], leading=1) for part in block.parts]
        return torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1).T

    # --- products ---------------------------------------------------------------------------------------

    def _vmap(self, columns: int) -> bool:
        """Whether to multiply ``columns`` vectors of a block with one batched backward."""
        if self.batching != "auto":
            return self.batching == "vmap"
        on_gpu = self.device.type == "cuda" and self.chunk_size is None
        return columns > 1 and on_gpu and not self._vmap_failed

    def _hessian(self, graph: _Graph, block: Block, columns: Tensor) -> Tensor:
        names = block.params
        leaves = [self._leaves[n] for n in names]
        grads = [graph.grads[n] for n in names]
        vectors = self._scatter(block, columns)
        if self._vmap(columns.shape[1]):
            try:
                result = _grad(grads, leaves, [vectors[n] for n in names], batched=True)
                return self._gather(block, dict(zip(names, result)))
            except RuntimeError:  # out of memory (m graphs at once) or an op without a batching rule
                if self.batching != "auto":
                    raise
                self._vmap_failed = True  # "auto" falls back to the loop, for good
        products = []
        for j in range(columns.shape[1]):
            # The vector enters as the backward's grad_outputs: no extra products or sums in the graph.
            result = _grad(grads, leaves, [vectors[n][j] for n in names])
            products.append(self._gather(block, {n: r.unsqueeze(0) for n, r in zip(names, result)}))
        return torch.cat(products, dim=1)

    def _gauss_newton(self, graph: _Graph, block: Block, columns: Tensor) -> Tensor:
        names = block.params
        leaves = [self._leaves[n] for n in names]
        vectors = self._scatter(block, columns)
        products = []
        for j in range(columns.shape[1]):
            dot = sum((graph.jtu[n] * vectors[n][j]).sum() for n in names)
            jv = _grad([dot], graph.dummies)
            curvature = sum((g * u).sum() for g, u in zip(graph.output_grads, jv))
            hjv = _grad([curvature], graph.outputs)
            result = _grad(graph.outputs, leaves, hjv)
            products.append(self._gather(block, {n: r.unsqueeze(0) for n, r in zip(names, result)}))
        return torch.cat(products, dim=1)

    @property
    def matvecs(self) -> int:
        """Total number of vectors multiplied so far, over all blocks."""
        return sum(self.block_matvecs)

    def using(self, curvature: str) -> CurvatureOperator:
        """The same blocks and graphs with another curvature (built with ``split=True``), fresh counters."""
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if curvature != "hessian" and not (self._split or self.curvature != "hessian"):
            raise ValueError("This operator was built without the Gauss-Newton graphs: pass split=True.")
        other = copy.copy(self)
        other.curvature = curvature
        other.block_matvecs = [0] * len(self.blocks)
        other.block_seconds = [0.0] * len(self.blocks)
        return other

    def _product(self, graph: _Graph, block: Block, columns: Tensor) -> Tensor:
        if self.curvature == "hessian":
            return self._hessian(graph, block, columns)
        if self.curvature == "gauss_newton":
            return self._gauss_newton(graph, block, columns)
        return self._hessian(graph, block, columns) - self._gauss_newton(graph, block, columns)

    def matmat(self, vectors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Multiply block ``b``'s curvature by ``vectors[b]`` (a ``(sizes[b], m)`` tensor), skipping ``None``.

        Implements :class:`lightning_hessian.estimators.BlockOperator`.
        """
        if len(vectors) != len(self.blocks):
            raise ValueError(f"Expected {len(self.blocks)} entries (one per block), got {len(vectors)}.")
        jobs = []
        for index, (block, columns) in enumerate(zip(self.blocks, vectors)):
            if columns is not None:
                columns = columns.unsqueeze(1) if columns.ndim == 1 else columns
                jobs.append((index, block, columns.to(device=self.device, dtype=self.dtype)))
        results: list[Tensor | None] = [None] * len(self.blocks)
        try:
            self._products(jobs, results)
        except Exception as error:
            if self._reduce is None or not jobs:
                raise
            # Every process must make the same collective call: send zeros and a failure flag instead.
            failure: Exception | None = error
            for index, _, columns in jobs:
                results[index] = torch.zeros(
                    (self.sizes[index], columns.shape[1]), dtype=self.dtype, device=self.device
                )
        else:
            failure = None
        for index, _, columns in jobs:
            self.block_matvecs[index] += columns.shape[1]
        if self._reduce is not None:
            # One collective for all blocks' products of this call, with a flag: did it fail anywhere?
            present = [r for r in results if r is not None]
            if present:
                flag = torch.full((1,), float(failure is not None), dtype=self.dtype, device=self.device)
                summed = self._reduce(torch.cat([*(r.reshape(-1) for r in present), flag]))
                if failure is not None:
                    raise failure
                if summed[-1] > 0:
                    raise PassFailedElsewhere(
                        "The curvature pass failed on another process in the middle of its products (see "
                        "its error); abandoned here too."
                    )
                pieces = iter(summed[:-1].split([r.numel() for r in present]))
                results = [None if r is None else next(pieces).view_as(r) for r in results]
        if self.products == "finite_difference":
            from lightning_hessian.finite_difference import check_finite

            check_finite(results)  # after the sum: every process raises together
        return results

    def _products(self, jobs: list[tuple[int, Block, Tensor]], results: list[Tensor | None]) -> None:
        """The local products of :meth:`matmat`, written into ``results``."""
        with torch.enable_grad():
            if self.products == "finite_difference":
                from lightning_hessian import finite_difference

                results[:] = finite_difference.matmat(self, jobs)
            elif self._graph is not None:
                for index, block, columns in jobs:
                    start = time.perf_counter()
                    results[index] = self._product(self._graph, block, columns).detach()
                    self.block_seconds[index] += time.perf_counter() - start
            else:
                # chunk_size: one chunk's graph alive at a time; its build is shared by the blocks.
                for chunk, size, state in self._chunks if jobs else ():
                    start = time.perf_counter()
                    graph = self._build(chunk, size, state)
                    build = (time.perf_counter() - start) / max(len(jobs), 1)
                    for index, block, columns in jobs:
                        start = time.perf_counter()
                        product = self._product(graph, block, columns).detach()
                        total = results[index]
                        results[index] = product if total is None else total + product
                        self.block_seconds[index] += time.perf_counter() - start + build
                    del graph, product  # free this chunk's graph before the next one is built

    def gradient(self, index: int) -> Tensor:
        """The gradient of the loss restricted to block ``index`` (detached), as a block vector."""
        block = self.blocks[index]
        local = self._gather(block, {n: self._grads[n].detach().unsqueeze(0) for n in block.params})[:, 0]
        return self._sum(local)
