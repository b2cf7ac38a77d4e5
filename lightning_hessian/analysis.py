"""``analyze()``: the per-block curvature report of a model on some data, without Lightning."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian._context import ReentrantCheckpointError, curvature_context
from lightning_hessian.batches import Batches, as_batches
from lightning_hessian.block_selection import select_blocks
from lightning_hessian.blocks import Block, FusedLayout, model_block
from lightning_hessian.errors import NonFiniteLossError
from lightning_hessian.estimators import hutchpp, lanczos, slq
from lightning_hessian.loss_calls import LossFn
from lightning_hessian.operators import CurvatureOperator
from lightning_hessian.preconditioning import PreconditionedOperator, block_diagonal
from lightning_hessian.products import check_products, resolve_products
from lightning_hessian.report import BlockCurvature, CurvatureReport
from lightning_hessian.settings import AnalysisSettings
from lightning_hessian.sharded import ShardedOperator, full_tensors, is_sharded
from lightning_hessian.starts import StartVectors

__all__ = ["analyze"]


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
    seed: int = 0,
    init: CurvatureReport | Mapping[str, Tensor] | None = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    chunk_size: int | None = None,
    products: str = "exact",
    exact_unavailable: str | None = None,
    basis_device: torch.device | str | None = None,
) -> CurvatureReport:
    r"""Measure the curvature of ``loss_fn`` per parameter block of ``model``.

    For every block :math:`b` the diagonal block :math:`H_{bb}` of the loss Hessian is probed with
    matrix-vector products on one retained gradient graph (see :mod:`lightning_hessian.operators`):

    * top-``k`` and smallest eigenvalues by Lanczos with full reorthogonalisation, started from the block's
      gradient plus an equal-norm random vector (:mod:`lightning_hessian.starts`), stopped when every
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
        basis_device: where the Lanczos bases (eigenvalues, density) and the reported Ritz vectors are kept,
            e.g. ``"cpu"`` for a GPU whose memory is full: every Lanczos step then moves one vector to the
            model's device and its product back (see :func:`~lightning_hessian.estimators.lanczos`).
            ``None`` (default): on the model's device.

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
    settings = AnalysisSettings(  # validates, with the messages HessianMonitor gives at construction
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
        basis_device=basis_device,
        curvature=curvature,
        density_width=density_width,
        products=products,
    )
    if preconditioner is not None and not full:
        raise ValueError("preconditioner= gives the whole model's preconditioned sharpness: pass full=True.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "The model has no trainable parameters (every parameter has requires_grad=False), so there is "
            "no curvature to measure: set requires_grad_(True) on the parameters to analyse."
        )
    products, reason = resolve_products(products, model, exact_unavailable)
    check_products(products, curvature, split, reason)
    batches = as_batches(data)  # read once (a DataLoader or iterator): the blocks' example and the pass
    selected, probe_problem = select_blocks(model, blocks, rules, loss_fn, batches[0], reduce)
    if full:
        selected.append(model_block(model))
    if not selected:
        raise ValueError("Nothing to analyse: pass blocks='auto' (or a list of blocks) and/or full=True.")

    results = [BlockCurvature(b.name, b.kind, b.layer, b.numel, products=products) for b in selected]
    began = time.perf_counter()
    with curvature_context(model, mode, exact=products == "exact"):
        op = _operator(model, loss_fn, data, batches, selected, settings, reduce, products)
        if probe_problem is not None:  # loss_fn works in the pass, so the probe's failure is ours to report
            warnings.warn(
                "analyze: reading the query / key / value layouts off the attention failed "
                f"({probe_problem}); the blocks come from the names alone. Pass blocks= (e.g. "
                "find_blocks(model, rules=...)) to choose them yourself.",
                UserWarning,
                stacklevel=2,
            )
        groups = _block_groups(len(selected), chunk_size is not None)
        starts = StartVectors(op, _warm_starts(init, selected), "gradient", seed)
        for group in groups:
            _measure_group(op, group, starts, results, settings)
        for r, n, t in zip(results, op.block_matvecs, op.block_seconds):
            r.matvecs, r.seconds = n, t
        matvecs = op.matvecs
        if split:
            matvecs += _measure_split(op, groups, results, settings)
        if preconditioner is not None:
            if is_sharded(model):  # FSDP2 optimiser state: the whole-model diagonal on every process
                preconditioner = full_tensors(preconditioner)
            matvecs += _measure_preconditioned(op, selected, preconditioner, results, settings)
        loss = op.loss
        del op
    seconds = time.perf_counter() - began

    report_settings = {k: v for k, v in settings.kwargs().items() if k not in ("blocks", "rules", "full")}
    report_settings.update(
        dtype=str(dtype) if dtype is not None else None,
        basis_device=str(basis_device) if basis_device is not None else None,
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
        settings=report_settings,
    )


def _warm_starts(
    init: CurvatureReport | Mapping[str, Tensor] | None, selected: Sequence[Block]
) -> list[Tensor | None] | None:
    """Per selected block, the Ritz vectors of a previous report (or the given vectors) to start from."""
    if isinstance(init, CurvatureReport):
        init = {b.name: b.ritz_vectors for b in init if b.ritz_vectors is not None}
    starts = [None if init is None else init.get(b.name) for b in selected]
    return None if all(s is None for s in starts) else starts


def _operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    batches: list[Any],
    selected: list[Block],
    settings: AnalysisSettings,
    reduce: Callable[[Tensor], Tensor] | None,
    products: str,
) -> CurvatureOperator | ShardedOperator:
    """The pass's operator over all selected blocks; a failing ``loss_fn`` on a tuple of batches says why."""
    try:
        if products == "finite_difference" and is_sharded(model):
            return ShardedOperator(
                model,
                loss_fn,
                Batches(batches),
                selected,
                reduce=reduce,
                dtype=settings.dtype,
                chunk_size=settings.chunk_size,
            )
        return CurvatureOperator(
            model,
            loss_fn,
            Batches(batches),
            selected,
            curvature=settings.curvature,
            dtype=settings.dtype,
            split=settings.split,
            reduce=reduce,
            chunk_size=settings.chunk_size,
            products=products,
        )
    except (NonFiniteLossError, ReentrantCheckpointError, torch.OutOfMemoryError):
        raise
    except Exception as error:
        if not _looks_like_several_batches(data):
            raise
        raise ValueError(
            f"loss_fn failed on data={type(data).__name__} of {len(data)} items that look like batches "
            f"({type(error).__name__}: {error}). A plain {type(data).__name__} is ONE batch (e.g. "
            "(inputs, targets)); to measure several batches pass Batches([batch1, batch2, ...]) "
            "(from lightning_hessian) or a DataLoader."
        ) from error


def _measure_group(
    op: Any, group: list[int], starts: StartVectors, results: list[BlockCurvature], settings: AnalysisSettings
) -> None:
    """Eigenvalues, trace and density of the blocks of ``group``, written into their report entries."""
    eigs = lanczos(
        op,
        settings.top_k,
        smallest=settings.smallest,
        tol=settings.tol,
        max_iter=settings.max_iter,
        init={i: starts(i) for i in group},
        seed=settings.seed,
        blocks=group,
        basis_device=settings.basis_device,
    )
    for i in group:
        _store_eigenpairs(results[i], eigs[i])
    del eigs  # this group's Ritz vectors now live in the results only
    if settings.trace:
        traces = hutchpp(op, matvecs=settings.trace_matvecs, seed=settings.seed, blocks=group)
        for i, tr in _pick(traces, group):
            results[i].trace, results[i].trace_stderr = tr.trace, tr.stderr
    if settings.density:
        densities = slq(
            op,
            probes=settings.density_probes,
            steps=settings.density_steps,
            seed=settings.seed,
            blocks=group,
            basis_device=settings.basis_device,
        )
        for i, d in _pick(densities, group):
            results[i].density = d.smoothed(width=settings.density_width)
            results[i].density_nodes, results[i].density_weights = d.nodes.numpy(), d.weights.numpy()


def _measure_split(
    op: CurvatureOperator, groups: list[list[int]], results: list[BlockCurvature], settings: AnalysisSettings
) -> int:
    """The Gauss-Newton top and functional extreme eigenvalues per block ([O] eq. 3); returns the products."""
    gauss_newton, functional = op.using("gauss_newton"), op.using("functional")
    for group in groups:
        kwargs = dict(
            tol=settings.tol,
            max_iter=settings.max_iter,
            seed=settings.seed,
            blocks=group,
            basis_device=settings.basis_device,
        )
        for i, eig in _pick(lanczos(gauss_newton, 1, smallest=False, **kwargs), group):
            results[i].gauss_newton_top = eig.eigenvalues[0].item()
        for i, eig in _pick(lanczos(functional, 1, **kwargs), group):
            results[i].functional_top, results[i].functional_min = (
                eig.eigenvalues[0].item(),
                eig.min_eigenvalue,
            )
    for r, extra in zip(results, zip(gauss_newton.block_matvecs, functional.block_matvecs)):
        r.matvecs += sum(extra)
    return gauss_newton.matvecs + functional.matvecs


def _measure_preconditioned(
    op: Any,
    selected: list[Block],
    preconditioner: Mapping[str, Tensor],
    results: list[BlockCurvature],
    settings: AnalysisSettings,
) -> int:
    """lambda_max(P^-1 H) of the whole model (the last block); returns the number of products."""
    whole = len(selected) - 1
    diagonals = [None] * whole + [block_diagonal(selected[whole], preconditioner)]
    eig = lanczos(
        PreconditionedOperator(op, diagonals),
        1,
        smallest=False,
        tol=settings.tol,
        max_iter=settings.max_iter,
        seed=settings.seed,
        blocks=[whole],
        basis_device=settings.basis_device,
    )[whole]
    results[whole].preconditioned_top = eig.eigenvalues[0].item()
    results[whole].matvecs += eig.matvecs
    return eig.matvecs
