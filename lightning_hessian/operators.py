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

Batches are found, moved and split by :mod:`lightning_hessian.batches`; ``loss_fn`` is called and checked
by :mod:`lightning_hessian.loss_calls`; the retained graphs are :mod:`lightning_hessian._graphs`.

The class implements :class:`lightning_hessian.estimators.BlockOperator`, so every estimator runs on it.
Build it inside :func:`lightning_hessian._context.curvature_context` (``analyze`` does this).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian import finite_difference
from lightning_hessian._graphs import Graph, grad
from lightning_hessian._rng import DeviceRngState, device_rng_state, set_device_rng_state
from lightning_hessian.batches import as_batches, move_batch, split_batch
from lightning_hessian.blocks import Block, check_blocks
from lightning_hessian.errors import NonFiniteLossError, PassFailedElsewhere
from lightning_hessian.loss_calls import LossCall, LossFn, call_loss, check_loss, split_loss
from lightning_hessian.products import check_products, resolve_products

__all__ = ["BATCHING", "CURVATURES", "CurvatureOperator"]

CURVATURES = ("hessian", "gauss_newton", "functional")
BATCHING = ("auto", "loop", "vmap")


def _check_arguments(blocks: Sequence[Block], curvature: str, batching: str, chunk_size: int | None) -> None:
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
        raise ValueError("No parameter blocks to analyse: the model has no trainable parameters selected.")


def _needed_parameters(model: nn.Module, blocks: Sequence[Block]) -> list[str]:
    """The names of the parameters the blocks touch, checked: trainable, on one device, blocks disjoint."""
    params = dict(model.named_parameters())
    needed = list(dict.fromkeys(name for block in blocks for name in block.params))
    for name in needed:
        if name not in params:
            raise ValueError(f"Block parameter {name!r} is not a parameter of the model.")
        if not params[name].requires_grad:
            raise ValueError(f"Block parameter {name!r} is frozen (requires_grad=False).")
    check_blocks(blocks, model)
    devices = {params[name].device for name in needed}
    if len(devices) > 1:
        raise ValueError(f"The analysed parameters live on several devices {devices}; move them to one.")
    return needed


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
        self.products, self.products_reason = resolve_products(products, model)
        check_products(self.products, curvature, split, self.products_reason)
        _check_arguments(blocks, curvature, batching, chunk_size)
        self.blocks = tuple(blocks)
        self.curvature, self.batching, self.chunk_size = curvature, batching, chunk_size
        self._vmap_failed = False
        self.sizes = tuple(block.numel for block in self.blocks)
        self.block_matvecs = [0] * len(self.blocks)
        self.block_seconds = [0.0] * len(self.blocks)

        self._needed = _needed_parameters(model, self.blocks)
        params = dict(model.named_parameters())
        self.device = params[self._needed[0]].device
        self.dtype = dtype if dtype is not None else params[self._needed[0]].dtype
        if self.products == "finite_difference":
            finite_difference.check_dtype(self.dtype)
        self._copy_tensors(model, cast=dtype is not None)
        self._reduce, self._split = reduce, split
        self._call = LossCall(model, loss_fn)
        self._first_pass(data, need_output=split or curvature != "hessian")

    def _copy_tensors(self, model: nn.Module, cast: bool) -> None:
        """Our own leaves: autograd only ever touches these copies, never the model's tensors.

        Copies, not views, because a forward may write to its weights in place (``nn.Embedding(max_norm=)``).
        Every trainable copy requires grad (not only the analysed ones), so that a loss without a graph
        means a broken ``loss_fn`` rather than blocks the loss happens not to use.
        """

        def detached(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to(self.dtype) if cast and t.is_floating_point() else t

        self._leaves = {
            name: detached(p).clone().requires_grad_(p.requires_grad) for name, p in model.named_parameters()
        }
        self._tensors = {f"model.{name}": t for name, t in self._leaves.items()}
        self._tensors.update({f"model.{name}": detached(b).clone() for name, b in model.named_buffers()})
        self._shapes = {name: self._leaves[name].shape for name in self._needed}
        self._leaf_list = [self._leaves[name] for name in self._needed]

    def _first_pass(self, data: Any, need_output: bool) -> None:
        """Run every batch once: the loss, the gradient and, unless graphs are rebuilt per product, the graph.

        With ``chunk_size`` or finite differences, the (moved) chunks, their sizes and the random state before
        their first forward are kept instead, so that every rebuild (every perturbed forward) draws the same
        dropout masks (``mode="train"``). With ``reduce``, an error on one process is raised on all of them
        after one collective, so no process waits forever.
        """
        self._chunks: list[tuple[Any, int, DeviceRngState | None]] = []
        keep_graph = self.chunk_size is None and self.products == "exact"
        # Graphs of sum_i n_i loss_i (n_i the batch sizes), divided by the total size N once N is known
        # across processes.
        grads = [torch.zeros_like(leaf) for leaf in self._leaf_list]
        outputs: list[Tensor] = []
        output_grads: list[Tensor] = []
        local_size, local_loss, error = 0, 0.0, None
        try:
            for index, batch in enumerate(as_batches(data)):
                for chunk, n in split_batch(batch, self.chunk_size):
                    chunk = move_batch(chunk, self.device, self.dtype)
                    state = None if keep_graph else device_rng_state(self.device)
                    loss, output = self._forward(chunk, index, need_output, check=True)
                    local_size, local_loss = local_size + n, local_loss + n * loss.item()
                    if not keep_graph:  # the gradient only: no graph is kept
                        self._chunks.append((chunk, n, state))
                        grads = [t + g for t, g in zip(grads, grad([n * loss], self._leaf_list))]
                        continue
                    step = grad([n * loss], self._leaf_list, create_graph=True)
                    grads = [t + g for t, g in zip(grads, step)]
                    if need_output:
                        outputs.append(output)
                        output_grads.append(grad([n * loss], [output], create_graph=True)[0])
        except Exception as exc:
            if self._reduce is None:
                raise
            error = exc  # raised after the collective below
        self._size, loss_sum = self._agree(error, local_size, local_loss)
        self.loss = loss_sum / self._size
        self._grads = {name: g / self._size for name, g in zip(self._needed, grads)}
        self._graph: Graph | None = None
        if keep_graph:
            self._graph = Graph(self._grads)
            if need_output:
                self._graph.outputs = outputs
                self._graph.output_grads = [g / self._size for g in output_grads]
                self._graph.prepare_jacobian(self._needed, self._leaf_list)

    def _agree(self, error: Exception | None, size: int, loss: float) -> tuple[int, float]:
        """Sum the batch sizes and losses over processes, with failure flags; raise what failed anywhere."""
        non_finite = isinstance(error, NonFiniteLossError)
        totals = torch.tensor([float(error is not None), float(non_finite), size, loss], dtype=torch.float64)
        failed, failed_non_finite, size_sum, loss_sum = self._sum(totals.to(self.device)).tolist()
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
        return size_sum, loss_sum

    def _forward(
        self,
        batch: Any,
        index: int,
        need_output: bool,
        check: bool = False,
        tensors: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Any]:
        """``loss_fn`` on one (moved) batch via the detached tensors (or ``tensors``), with clear errors."""
        tensors = self._tensors if tensors is None else tensors
        value = call_loss(self._call, tensors, batch, index, self.device, self.dtype)
        return check_loss(value, index, need_output) if check else split_loss(value)

    def _build(self, chunk: Any, size: int, state: DeviceRngState) -> Graph:
        """One chunk's graph, weighted by its share ``size / N`` of the mean loss (``chunk_size`` mode)."""
        set_device_rng_state(state, self.device)
        need_output = self.curvature != "hessian"
        loss, output = self._forward(chunk, 0, need_output)
        weighted = loss * (size / self._size)
        graph = Graph(dict(zip(self._needed, grad([weighted], self._leaf_list, create_graph=True))))
        if need_output:
            graph.outputs = [output]
            graph.output_grads = [grad([weighted], [output], create_graph=True)[0]]
            graph.prepare_jacobian(self._needed, self._leaf_list)
        return graph

    def _sum(self, tensor: Tensor) -> Tensor:
        return tensor if self._reduce is None else self._reduce(tensor)

    # --- products ---------------------------------------------------------------------------------------

    def _vmap(self, columns: int) -> bool:
        """Whether to multiply ``columns`` vectors of a block with one batched backward."""
        if self.batching != "auto":
            return self.batching == "vmap"
        on_gpu = self.device.type == "cuda" and self.chunk_size is None
        return columns > 1 and on_gpu and not self._vmap_failed

    def _hessian(self, graph: Graph, block: Block, columns: Tensor) -> Tensor:
        names = block.params
        leaves = [self._leaves[n] for n in names]
        grads = [graph.grads[n] for n in names]
        vectors = block.scatter(columns, self._shapes)
        if self._vmap(columns.shape[1]):
            try:
                result = grad(grads, leaves, [vectors[n] for n in names], batched=True)
                return block.columns(dict(zip(names, result)))
            except RuntimeError:  # out of memory (m graphs at once) or an op without a batching rule
                if self.batching != "auto":
                    raise
                self._vmap_failed = True  # "auto" falls back to the loop, for good
        products = []
        for j in range(columns.shape[1]):
            # The vector enters as the backward's grad_outputs: no extra products or sums in the graph.
            result = grad(grads, leaves, [vectors[n][j] for n in names])
            products.append(block.columns({n: r.unsqueeze(0) for n, r in zip(names, result)}))
        return torch.cat(products, dim=1)

    def _gauss_newton(self, graph: Graph, block: Block, columns: Tensor) -> Tensor:
        names = block.params
        leaves = [self._leaves[n] for n in names]
        vectors = block.scatter(columns, self._shapes)
        products = []
        for j in range(columns.shape[1]):
            dot = sum((graph.jtu[n] * vectors[n][j]).sum() for n in names)
            jv = grad([dot], graph.dummies)
            curvature = sum((g * u).sum() for g, u in zip(graph.output_grads, jv))
            hjv = grad([curvature], graph.outputs)
            result = grad(graph.outputs, leaves, hjv)
            products.append(block.columns({n: r.unsqueeze(0) for n, r in zip(names, result)}))
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

    def _product(self, graph: Graph, block: Block, columns: Tensor) -> Tensor:
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
        failure: Exception | None = None
        try:
            self._products(jobs, results)
        except Exception as error:
            if self._reduce is None or not jobs:
                raise
            failure = error
            for index, _, columns in jobs:  # the same collective call everywhere: zeros and a flag
                results[index] = columns.new_zeros((self.sizes[index], columns.shape[1]))
        for index, _, columns in jobs:
            self.block_matvecs[index] += columns.shape[1]
        if self._reduce is not None:
            results = self._reduce_products(results, failure)
        if self.products == "finite_difference":
            finite_difference.check_finite(results)  # after the sum: every process raises together
        return results

    def _reduce_products(
        self, results: list[Tensor | None], failure: Exception | None
    ) -> list[Tensor | None]:
        """One collective for all blocks' products of a call, with a flag: did it fail anywhere?"""
        present = [r for r in results if r is not None]
        if not present:
            return results
        flag = torch.full((1,), float(failure is not None), dtype=self.dtype, device=self.device)
        summed = self._sum(torch.cat([*(r.reshape(-1) for r in present), flag]))
        if failure is not None:
            raise failure
        if summed[-1] > 0:
            raise PassFailedElsewhere(
                "The curvature pass failed on another process in the middle of its products (see its error); "
                "abandoned here too."
            )
        pieces = iter(summed[:-1].split([r.numel() for r in present]))
        return [None if r is None else next(pieces).view_as(r) for r in results]

    def _products(self, jobs: list[tuple[int, Block, Tensor]], results: list[Tensor | None]) -> None:
        """The local products of :meth:`matmat`, written into ``results``."""
        with torch.enable_grad():
            if self.products == "finite_difference":
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
        return self._sum(self.blocks[index].vector({n: g.detach() for n, g in self._grads.items()}))
