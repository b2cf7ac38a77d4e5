"""``analyze()``: the per-block curvature report of a model on some data, without Lightning."""

from __future__ import annotations

import dataclasses
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian._context import ReentrantCheckpointError, curvature_context
from lightning_hessian.batches import Batches, as_batches, map_tensors
from lightning_hessian.blocks import Block, FusedLayout, find_blocks, model_block
from lightning_hessian.errors import NonFiniteLossError
from lightning_hessian.estimators import hutchpp, lanczos, slq
from lightning_hessian.loss_calls import LossFn
from lightning_hessian.operators import CURVATURES, CurvatureOperator
from lightning_hessian.preconditioning import PreconditionedOperator, block_diagonal
from lightning_hessian.products import check_products, resolve_products
from lightning_hessian.report import BlockCurvature, CurvatureReport
from lightning_hessian.settings import AnalysisSettings, check_positive
from lightning_hessian.sharded import ShardedOperator, is_sharded

__all__ = ["analyze"]


def _select_blocks(
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
    so a monitor's passes infer the layouts once. If running ``loss_fn`` fails here, the blocks come from
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


_STARTS = ("gradient", "random")


class _Starts:
    """Lanczos start vectors per block, made when the block's turn comes (see ``analyze``'s ``start``).

    A warm start is used as given. Otherwise, with ``start="gradient"``, ``g_b/||g_b|| + r_b/||r_b||``: the
    block's gradient plus a random unit vector from one generator shared by the blocks in index order (the
    blocks are visited in that order, so the draws do not depend on how they are grouped). Every process
    calls ``op.gradient`` for the same blocks in the same order (it sums over processes).
    """

    def __init__(
        self, op: CurvatureOperator, warm: list[Tensor | None] | None, start: str, seed: int
    ) -> None:
        self.op, self.warm, self.gradient = op, warm, start == "gradient"
        # seed < 2**63 - 2**16 (check_settings): the offset stays in manual_seed's range
        self.gen = torch.Generator().manual_seed(seed + 7919)  # apart from the estimators' own draws

    def __call__(self, index: int) -> Tensor | None:
        warm = None if self.warm is None else self.warm[index]
        if warm is not None or not self.gradient:
            return warm
        g = self.op.gradient(index).to(device="cpu", dtype=torch.float64)
        r = torch.randn(g.shape, generator=self.gen, dtype=torch.float64)
        r = r / r.norm()
        norm = g.norm()
        return r if not torch.isfinite(norm) or norm == 0 else g / norm + r


# analyze runs the estimators one block at a time, so that at most one block's Lanczos basis (Hutch++
# sketch, SLQ probes) is alive: a pass's memory does not grow with the number of blocks. Every block has its
# own products and random streams, so the results are bitwise those of running all blocks together. With
# chunk_size every product call rebuilds the graph for all the blocks in it: there the blocks run together.
_ALL_BLOCKS_AT_ONCE = False  # True: the order before one block at a time (tests and benchmarks compare)


def _block_groups(count: int, chunked: bool) -> list[list[int]]:
    """The groups of block indices that run together, in index order."""
    if chunked or _ALL_BLOCKS_AT_ONCE:
        return [list(range(count))]
    return [[index] for index in range(count)]


def _pick(per_block: list[Any], group: list[int]) -> list[tuple[int, Any]]:
    """``(index, result)`` for the blocks of ``group`` from an estimator's per-block list."""
    return [(i, per_block[i]) for i in group]


def _store_eigenpairs(r: BlockCurvature, eig: Any) -> None:
    """Copy one block's :class:`~lightning_hessian.estimators.LanczosResult` into its report entry."""
    r.top_eigenvalues = eig.eigenvalues.tolist()
    r.top_residuals = eig.residuals.tolist()
    r.converged = eig.converged
    r.min_eigenvalue, r.min_residual, r.min_converged = (
        eig.min_eigenvalue,
        eig.min_residual,
        eig.min_converged,
    )
    # The smallest Ritz vector too: a warm start from the top vectors alone leaves the bottom of the
    # spectrum cold, and the smallest eigenvalue then costs as many steps as without a warm start.
    vectors = [v for v in (eig.eigenvectors, eig.min_eigenvector) if v is not None]
    r.ritz_vectors = torch.cat([v.reshape(v.shape[0], -1) for v in vectors], dim=1) if vectors else None


def _is_batch(item: Any) -> bool:
    """Whether ``item`` looks like a batch itself (a container), rather than one tensor of a batch."""
    return isinstance(item, tuple | list | Mapping) or (
        dataclasses.is_dataclass(item) and not isinstance(item, type)
    )


def _looks_like_several_batches(data: Any) -> bool:
    return type(data) in (list, tuple) and len(data) >= 2 and all(_is_batch(item) for item in data)


def analyze(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    blocks: str | Sequence[Block | str] | None = "auto",
    rules: Mapping[str, str | FusedLayout] | None = None,
    full: bool = False,
    curvature: str = "hessian",
    top_k: int = 1,
    smallest: bool = True,
    trace: bool = True,
    density: bool = False,
    split: bool = False,
    tol: float = 1e-4,
    max_iter: int = 100,
    trace_matvecs: int = 30,
    density_probes: int = 4,
    density_steps: int = 40,
    density_width: float = 0.02,
    dtype: torch.dtype | None = None,
    mode: str = "eval",
    batching: str = "auto",
    seed: int = 0,
    init: CurvatureReport | Mapping[str, Tensor] | None = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    chunk_size: int | None = None,
    start: str = "gradient",
    products: str = "exact",
    exact_unavailable: str | None = None,
) -> CurvatureReport:
    r"""Measure the curvature of ``loss_fn`` per parameter block of ``model``.

    For every block :math:`b` the diagonal block :math:`H_{bb}` of the loss Hessian is probed with
    matrix-vector products on one retained gradient graph (see :mod:`lightning_hessian.operators`):

    * top-``k`` and smallest eigenvalues by Lanczos with full reorthogonalisation, stopped when every
      requested Ritz pair has residual :math:`\|H_{bb} y - \theta y\| \le` ``tol`` :math:`\cdot |\theta|`,
      relative to each value itself (:math:`\mathrm{tol}^2 \max|\theta|` for a value within
      ``tol`` :math:`\cdot \max|\theta|` of 0: see :func:`~lightning_hessian.estimators.lanczos`); an
      eigenvalue then lies within that distance, the eigenvalue error is usually far smaller;
    * the trace by Hutch++ (Meyer et al., 2021) with ``trace_matvecs`` products, exact for small blocks;
    * the spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, 2019), smoothed
      with Gaussians of width ``density_width`` times the block's spectral range;
    * with ``split=True``, the Gauss-Newton and functional parts of Ormaniec, Dangel & Singh (2025).

    Args:
        model: any ``nn.Module``. It is left exactly as found: weights, ``.grad``, buffers, train/eval
            flags and random number streams.
        loss_fn: ``loss_fn(model, batch)`` returning the scalar loss, or ``(loss, output)`` with the tensor
            the loss is computed from (needed for ``split=True`` and the Gauss-Newton curvatures).
        data: one batch, or several as a :class:`~lightning_hessian.Batches`, a ``DataLoader`` or an
            iterator; then the curvature is that of the batch-size weighted mean loss.
        blocks: ``"auto"`` (:func:`~lightning_hessian.find_blocks`), a list of blocks or block names, or
            ``None`` for none (with ``full=True``: the whole model only).
        rules: extra block rules for :func:`~lightning_hessian.find_blocks`.
        full: also analyse the whole model as one block (``report.full``).
        curvature: ``"hessian"`` (default), ``"gauss_newton"`` or ``"functional"``.
        top_k: how many of the largest eigenvalues to compute.
        smallest: also compute the smallest eigenvalue (negative curvature).
        trace: estimate the trace.
        density: estimate the spectral density.
        split: also compute the Gauss-Newton top eigenvalue and the functional part's extreme eigenvalues
            (only with ``curvature="hessian"``).
        tol: Ritz-residual tolerance of Lanczos, relative to each eigenvalue.
        max_iter: Lanczos step limit per block; blocks that stop there are reported as not converged.
        trace_matvecs: Hutch++ budget per block.
        density_probes, density_steps: stochastic Lanczos quadrature probes and steps per block.
        density_width: Gaussian smoothing width relative to the block's spectral range.
        dtype: compute dtype, e.g. ``torch.float64``; ``None`` keeps the model's.
        mode: ``"eval"`` (default: dropout off, running statistics), ``"train"`` or ``"keep"``.
        batching: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`~lightning_hessian.CurvatureOperator`).
        seed: seed of every random draw; equal seeds give identical reports.
        init: a previous report (or block name -> vectors) whose Ritz vectors start Lanczos: a warm start.
        preconditioner: a positive diagonal :math:`P` per parameter name (tensors shaped like the
            parameters), e.g. Adam's; with ``full=True`` the report's ``full.preconditioned_top`` is then
            :math:`\lambda_{\max}(P^{-1} H)` of the whole model (Cohen et al., arXiv:2207.14484).
        reduce: with data split over processes, a function summing a tensor over them (see
            :class:`~lightning_hessian.CurvatureOperator`): the report is then that of the union of the data,
            identical on every process.
        chunk_size: a memory budget: split every batch into chunks of at most this many samples and keep
            only one chunk's graph alive at a time, rebuilt for every product call (see
            :class:`~lightning_hessian.CurvatureOperator`): peak memory of one chunk instead of all the
            data, for one extra forward and gradient per chunk per call. Same result when ``loss_fn`` is a
            mean of per-sample losses. ``None`` (default) keeps every batch's graph for the whole pass.
            Without ``chunk_size`` the blocks are measured one after the other, so that only one block's
            Lanczos basis (``max_iter`` vectors of the block's size) is alive at a time; with it they run
            together, every call's graph build shared by all blocks (then every block's basis is alive).
        start: the Lanczos start vector of a block without a warm start. ``"gradient"`` (default):
            :math:`g_b/\|g_b\| + r_b/\|r_b\|`, the block's gradient (already computed with the graph)
            plus an equal-norm random vector: training gradients lie mostly in the top Hessian eigenspace
            (Gur-Ari, Roberts & Dyer, arXiv:1812.04754), and the random half keeps every eigenvector in the
            Krylov space. Measured over eight benchmark and test models: about 10% fewer products for the
            whole model and for all blocks (0-20% per model, none needing more), same accuracy.
            ``"random"``: a random vector.
        products: ``"exact"`` (default): Hessian-vector products by double backward, with the math
            attention kernel and compiled code run eagerly. ``"finite_difference"``: central differences
            of gradients (:mod:`lightning_hessian.finite_difference`: step rule and error model), which
            run the model with its own kernels (FlashAttention, efficient SDPA, compiled graphs); Hessian
            only (no ``split``). ``"auto"``: finite differences where exact products are unavailable (a
            compiled model, sharded parameters, or ``exact_unavailable``), said once as a warning
            (:func:`lightning_hessian.products.resolve_products`). The backend used is in
            ``report.settings["products"]`` (and why, ``"products_reason"``) and in every block's
            ``products``.
        exact_unavailable: for callers that know why exact products cannot run (e.g. a monitor under a
            sharded training strategy): the reason; ``"auto"`` then takes finite differences.

    Batches are moved to the parameters' device, and their floating tensors cast to the compute dtype, when
    the tensors sit in tuples, lists, dicts, other ``Mapping``\ s or dataclasses; tensors inside other
    objects are passed as they are, and a device or dtype mismatch inside ``loss_fn`` is reported with
    what to do. With exact products a ``torch.compile``\ d model (or submodule) runs eagerly during the pass
    (compiled graphs have no double backward; finite differences run the compiled graph); block names leave
    out ``_orig_mod``. Activation checkpointing must use ``use_reentrant=False``; reentrant checkpointing is
    refused with an error saying so.

    Returns:
        A :class:`~lightning_hessian.CurvatureReport`; ``print(report.table())`` shows it.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}, got {start!r}.")
    if preconditioner is not None and not full:
        raise ValueError("preconditioner= gives the whole model's preconditioned sharpness: pass full=True.")
    if split and curvature != "hessian":
        raise ValueError('split=True decomposes the Hessian: use it with curvature="hessian".')
    validated = AnalysisSettings(  # validates, with the messages HessianMonitor gives at construction
        blocks=blocks,
        rules=rules,
        full=full,
        top_k=top_k,
        smallest=smallest,
        trace=trace,
        density=density,
        split=split,
        tol=tol,
        max_iter=max_iter,
        trace_matvecs=trace_matvecs,
        density_probes=density_probes,
        density_steps=density_steps,
        dtype=dtype,
        mode=mode,
        seed=seed,
        chunk_size=chunk_size,
    )
    check_positive(
        "density_width",
        float(density_width) if isinstance(density_width, int | float) else density_width,
        float,
    )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "The model has no trainable parameters (every parameter has requires_grad=False), so there is "
            "no curvature to measure: set requires_grad_(True) on the parameters to analyse."
        )

    products, reason = resolve_products(products, model, exact_unavailable)
    check_products(products, curvature, split, reason)
    batches = as_batches(data)  # read once (a DataLoader or iterator): the blocks' example and the pass
    selected, probe_problem = _select_blocks(model, blocks, rules, loss_fn, batches[0], reduce)
    if full:
        selected.append(model_block(model))
    if not selected:
        raise ValueError("Nothing to analyse: pass blocks='auto' (or a list of blocks) and/or full=True.")
    if isinstance(init, CurvatureReport):
        init = {b.name: b.ritz_vectors for b in init if b.ritz_vectors is not None}
    starts = [None if init is None else init.get(b.name) for b in selected]
    if all(s is None for s in starts):
        starts = None

    results = [BlockCurvature(b.name, b.kind, b.layer, b.numel, products=products) for b in selected]
    began = time.perf_counter()
    with curvature_context(model, mode, exact=products == "exact"):
        try:
            if products == "finite_difference" and is_sharded(model):
                op = ShardedOperator(
                    model,
                    loss_fn,
                    Batches(batches),
                    selected,
                    reduce=reduce,
                    dtype=dtype,
                    chunk_size=chunk_size,
                )
            else:
                op = CurvatureOperator(
                    model,
                    loss_fn,
                    Batches(batches),
                    selected,
                    curvature=curvature,
                    dtype=dtype,
                    batching=batching,
                    split=split,
                    reduce=reduce,
                    chunk_size=chunk_size,
                    products=products,
                )
        except (NonFiniteLossError, ReentrantCheckpointError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            if not _looks_like_several_batches(data):
                raise
            raise ValueError(
                f"loss_fn failed on data={type(data).__name__} of {len(data)} items that look like batches"
                " "
                f"({type(error).__name__}: {error}). A plain {type(data).__name__} is ONE batch (e.g. "
                "(inputs, targets)); to measure several batches pass Batches([batch1, batch2, ...]) "
                "(from lightning_hessian) or a DataLoader."
            ) from error
        if probe_problem is not None:  # loss_fn works in the pass, so the probe's failure is ours to report
            warnings.warn(
                "analyze: reading the query / key / value layouts off the attention failed "
                f"({probe_problem}); the blocks come from the names alone. Pass blocks= (e.g. "
                "find_blocks(model, rules=...)) to choose them yourself.",
                UserWarning,
                stacklevel=2,
            )
        groups = _block_groups(len(selected), chunk_size is not None)
        start_of = _Starts(op, starts, start, seed)
        for group in groups:
            eigs = lanczos(
                op,
                top_k,
                smallest=smallest,
                tol=tol,
                max_iter=max_iter,
                init={i: start_of(i) for i in group},
                seed=seed,
                blocks=group,
            )
            for i in group:
                _store_eigenpairs(results[i], eigs[i])
            del eigs  # this group's Ritz vectors now live in the results only
            if trace:
                for i, tr in _pick(hutchpp(op, matvecs=trace_matvecs, seed=seed, blocks=group), group):
                    results[i].trace, results[i].trace_stderr = tr.trace, tr.stderr
            if density:
                densities = slq(op, probes=density_probes, steps=density_steps, seed=seed, blocks=group)
                for i, d in _pick(densities, group):
                    results[i].density = d.smoothed(width=density_width)
                    results[i].density_nodes, results[i].density_weights = d.nodes.numpy(), d.weights.numpy()
        matvecs = op.matvecs
        for r, n, s in zip(results, op.block_matvecs, op.block_seconds):
            r.matvecs, r.seconds = n, s
        if split:
            gauss_newton, functional = op.using("gauss_newton"), op.using("functional")
            for group in groups:
                kwargs = dict(tol=tol, max_iter=max_iter, seed=seed, blocks=group)
                for i, eig in _pick(lanczos(gauss_newton, 1, smallest=False, **kwargs), group):
                    results[i].gauss_newton_top = eig.eigenvalues[0].item()
                for i, eig in _pick(lanczos(functional, 1, **kwargs), group):
                    results[i].functional_top, results[i].functional_min = (
                        eig.eigenvalues[0].item(),
                        eig.min_eigenvalue,
                    )
            for r, extra in zip(results, zip(gauss_newton.block_matvecs, functional.block_matvecs)):
                r.matvecs += sum(extra)
            matvecs += gauss_newton.matvecs + functional.matvecs
        if preconditioner is not None:
            whole = len(selected) - 1
            diagonals = [None] * whole + [block_diagonal(selected[whole], preconditioner)]
            preconditioned = PreconditionedOperator(op, diagonals)
            eig = lanczos(
                preconditioned, 1, smallest=False, tol=tol, max_iter=max_iter, seed=seed, blocks=[whole]
            )
            results[whole].preconditioned_top = eig[whole].eigenvalues[0].item()
            results[whole].matvecs += eig[whole].matvecs
            matvecs += eig[whole].matvecs
        loss = op.loss
        del op
    seconds = time.perf_counter() - began

    settings = {k: v for k, v in validated.kwargs().items() if k not in ("blocks", "rules", "full")}
    settings.update(
        density_width=density_width,
        dtype=str(dtype) if dtype is not None else None,
        batching=batching,
        products=products,
        products_reason=reason,
    )
    named = {r.name: r for r in results}
    full_result = named.pop(selected[-1].name) if full else None
    return CurvatureReport(
        blocks=named,
        full=full_result,
        curvature=curvature,
        loss=loss,
        seconds=seconds,
        matvecs=matvecs,
        settings=settings,
    )
