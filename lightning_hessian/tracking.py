r"""The monitor's whole-model tier: :math:`\lambda_{\max}` tracked warm, and what its eigenvector gives.

:func:`track_model` is called every few hundred training steps with the previous call's
:class:`ModelCurvature` as a warm start, so each call costs a few Hessian-vector products on one retained
gradient graph of the whole model (:class:`~lightning_hessian.CurvatureOperator`):

* :math:`\lambda_{\max}(H)` by Lanczos (:func:`~lightning_hessian.estimators.lanczos`) started from the
  previous top eigenvector :math:`v` (cold: the gradient-plus-random start of ``analyze``), stopped when the
  Ritz residual :math:`\|Hy - \theta y\| \le` ``tol`` :math:`\cdot |\theta|` (relative to
  :math:`\lambda_{\max}` itself, not to the largest :math:`|\theta|`);
* with Adam's diagonal :math:`P`, the preconditioned :math:`\lambda_{\max}(P^{-1} H)` (Cohen et al.,
  arXiv:2207.14484) likewise, with its own warm vector;
* free by-products of the unit top eigenvector :math:`v`: each block's share :math:`\|v_b\|^2`, the
  gradient's alignment :math:`|g^\top v| / \|g\|` (Gur-Ari, Roberts & Dyer, arXiv:1812.04754: the gradient
  lives mostly in the top eigenspace) and the alignment of the update just taken;
* per-block traces from *shared* whole-model Hutchinson probes (see :func:`track_model`): one product per
  probe for every block at once, instead of one per probe per block.

Tracking experiment (``benchmarks/bench_tracking.py``, results in ``benchmarks/results/tracking.md``): the
nanoGPT-style GPT of ``examples/train_char_gpt.py`` (4 layers, d=64, 208k parameters, context 64, batch 8,
Shakespeare characters) trained with AdamW (lr 1e-3, 20 warmup steps) in float32 on a CPU; every 10 steps
(150 steps, 15 checkpoints) each setting tracks both eigenvalues warm (no trace probes) on a fixed held-out
batch, against a cold Lanczos truth at ``tol=1e-6``, ``max_iter=200`` (relative residuals <= 1e-6).
Relative errors, median / max, and products per warm call for *both* eigenvalues (median, max):

================  =================  =================  ===========  ===============
max_iter : tol    λ_max error        λ_max(P^-1 H)      within 5%    products / call
================  =================  =================  ===========  ===============
2 : 1e-2          1.5e-3 / 0.84      2.4e-3 / 0.84      80% / 73%    4 (4)
4 : 1e-2          8.1e-5 / 1.9e-2    1.3e-4 / 2.1e-2    100% / 100%  8 (8)
8 : 1e-2 default  2.5e-5 / 2.5e-4    9.1e-5 / 2.7e-4    100% / 100%  8 (12)
8 : 1e-3          4.2e-7 / 2.6e-6    2.2e-7 / 1.3e-6    100% / 100%  11 (16)
================  =================  =================  ===========  ===============

The first call is cold: 51 products for both at the default ``cold_max_iter=64`` (70 at ``tol=1e-3``).
Without the warm start the same budgets do worse: 8 : 1e-2 was within 5% at 93% of the checkpoints (6.1%
and 9.5% off at step 10), 4 : 1e-2 at 80%, 2 : 1e-2 at 13%. Every 50 steps over 600 steps (12
checkpoints) the defaults were within 1.7e-4 (λ_max) and 3.0e-4 (preconditioned) of the truths at 7
products per call (median; max 10). So the defaults (``max_iter=8``, ``tol=1e-2``) meet the target of
λ_max within 5% at >= 95% of checkpoints with two orders of magnitude to spare; as a converged call stops
early, they cost what ``max_iter=4`` costs: about 4 products per eigenvalue, 0.6-1.9 s per call for both
(graph build included), 18-19 training steps of 35-100 ms on that shared CPU, against 51 products cold.
``trace_probes`` adds one product per probe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian import tags
from lightning_hessian._context import curvature_context
from lightning_hessian.batches import Batches, as_batches
from lightning_hessian.blocks import Block, check_blocks, model_block
from lightning_hessian.estimators import draws
from lightning_hessian.estimators._lanczos_core import LanczosChains, run_lanczos
from lightning_hessian.estimators.lanczos import start_vector
from lightning_hessian.loss_calls import LossFn
from lightning_hessian.operators import CurvatureOperator
from lightning_hessian.preconditioning import PreconditionedOperator, block_diagonal
from lightning_hessian.products import check_products, resolve_products
from lightning_hessian.settings import check_positive, check_settings
from lightning_hessian.sharded import ShardedOperator, full_tensors, is_sharded
from lightning_hessian.starts import StartVectors

__all__ = ["ModelCurvature", "track_model"]

MODEL = "model"  # the whole model's block name in tags (curvature/model/...)


@dataclass
class ModelCurvature:
    """One whole-model measurement of :func:`track_model`.

    Attributes:
        top_eigenvalue, top_residual, top_converged: :math:`\\lambda_{\\max}(H)`, its Ritz residual
            :math:`\\|Hy - \\theta y\\|` (an eigenvalue lies within it) and whether that is within ``tol``
            :math:`\\cdot |\\theta|`.
        preconditioned_top, preconditioned_residual, preconditioned_converged: the same for
            :math:`P^{-1/2} H P^{-1/2}` (``None`` without a preconditioner).
        top_shares: block name -> :math:`\\|v_b\\|^2`, the block's share of the unit top eigenvector.
        gradient_alignment: :math:`|g^\\top v| / \\|g\\|`, ``g`` the gradient on the curvature data (NaN if
            ``g = 0``).
        update_alignment: :math:`|u^\\top v| / \\|u\\|` for the update ``u`` given (``None`` without one, NaN
            if ``u = 0``).
        trace, trace_stderr: Hutchinson estimate of :math:`\\operatorname{tr} H` and its standard error
            (``None`` with ``trace_probes=0``; the error is NaN with one probe).
        block_traces, block_trace_stderr: the same per block, from the same probes.
        block_rayleigh: with ``block_rayleigh=True``, block ->:math:`v_b^\\top H_{bb} v_b / \\|v_b\\|^2`,
            the curvature of the block's own Hessian block along its piece of the top eigenvector (near
            the block's λ_max: the sharp direction lives in the block; far below it: the sharpness comes
            from the coupling with other blocks). Empty otherwise.
        loss: the loss on the curvature data.
        matvecs: whole-model Hessian-vector products taken.
        seconds: wall time of the call.
        top_vector: the unit top Ritz vector (CPU), the next call's warm start.
        preconditioned_vector: the same for the preconditioned operator.
        subspace: with ``subspace=D``, the top ``D`` Ritz vectors, orthonormal ``(P, D)`` float64 on the CPU
            (the first is ``top_vector``); ``None`` otherwise.
        products: the product backend every number came from, ``"exact"`` or ``"finite_difference"``.
    """

    top_eigenvalue: float
    top_residual: float
    top_converged: bool
    preconditioned_top: float | None
    preconditioned_residual: float | None
    preconditioned_converged: bool | None
    top_shares: dict[str, float]
    gradient_alignment: float
    update_alignment: float | None
    trace: float | None
    trace_stderr: float | None
    block_traces: dict[str, float]
    block_trace_stderr: dict[str, float]
    loss: float
    matvecs: int
    seconds: float
    top_vector: Tensor = field(repr=False)
    preconditioned_vector: Tensor | None = field(default=None, repr=False)
    block_rayleigh: dict[str, float] = field(default_factory=dict)
    subspace: Tensor | None = field(default=None, repr=False)
    products: str = "exact"

    def scalars(self) -> dict[str, float]:
        """Tag -> value for the logger (names from :mod:`lightning_hessian.tags`); NaN values are left out."""
        out = {
            tags.SHARPNESS: self.top_eigenvalue,
            tags.block_tag(MODEL, "top_eigenvalue"): self.top_eigenvalue,
            tags.PRECONDITIONED_SHARPNESS: self.preconditioned_top,
            tags.block_tag(MODEL, "preconditioned_top"): self.preconditioned_top,
            tags.GRADIENT_ALIGNMENT: self.gradient_alignment,
            tags.UPDATE_ALIGNMENT: self.update_alignment,
            tags.block_tag(MODEL, "trace"): self.trace,
            tags.block_tag(MODEL, "trace_stderr"): self.trace_stderr,
        }
        for name, share in self.top_shares.items():
            out[tags.block_tag(name, "top_share")] = share
        for name, value in self.block_traces.items():
            out[tags.block_tag(name, "trace")] = value
            out[tags.block_tag(name, "trace_stderr")] = self.block_trace_stderr[name]
        for name, value in self.block_rayleigh.items():
            out[tags.block_tag(name, "top_rayleigh")] = value
        return {tag: float(v) for tag, v in out.items() if v is not None and math.isfinite(v)}


def _operator(
    model: nn.Module, loss_fn: LossFn, data: Any, whole: Block, products: str, **options: Any
) -> Any:
    """The whole model's operator: finite differences on sharded parameters, else a CurvatureOperator."""
    batches = Batches(as_batches(data))
    if products == "finite_difference" and is_sharded(model):
        return ShardedOperator(model, loss_fn, batches, [whole], **options)
    return CurvatureOperator(model, loss_fn, batches, [whole], products=products, **options)


def _top(
    op: Any,
    warm: Tensor,
    tol: float,
    max_iter: int,
    seed: int,
    basis_device: torch.device | str | None = None,
    keep: int = 1,
) -> tuple[float, float, bool, Tensor]:
    """λ_max of a one-block operator by Lanczos, stopped when ``r <= tol * |θ_top|``.

    The Lanczos recurrence and start vector of :func:`~lightning_hessian.estimators.lanczos` (warm start plus
    a seeded ``1e-3`` random part), with one change: ``lanczos`` measures residuals against the largest
    :math:`|\theta|`, which a large negative Ritz value can set, and then stops with λ_max far off (measured:
    after 2 steps at ``tol=1e-2`` on a spectrum in [-100, 1], with the top Ritz value at -0.08).

    With ``keep > 1`` the run takes at least ``keep`` steps and returns the top ``keep`` Ritz vectors (top
    first, orthonormal): a Krylov approximation of the top eigenspace at no extra product beyond those steps.

    Returns:
        ``(θ_top, r, converged, unit Ritz vector (n,))``, with ``keep > 1`` the vectors ``(n, <= keep)``;
        ``r`` is floored at the rounding level.
    """
    start = start_vector(op, 0, warm, draws.generator(seed, draws.LANCZOS, 0))
    max_iter = max(max_iter, keep)
    chains = {0: LanczosChains(start[None], capacity=min(max_iter + 1, 33), basis_device=basis_device)}
    rounding = torch.finfo(op.dtype).eps

    def on_step(_: int, chain: LanczosChains) -> None:
        theta, _, residuals = chain.ritz(0)
        top = float(theta[-1])
        floor = rounding * float(theta.abs().max())
        if (
            chain.broken[0]
            or (max(float(residuals[-1]), floor) <= tol * abs(top) and chain.lengths[0] >= keep)
            or chain.lengths[0] >= max_iter
        ):
            chain.stop()

    run_lanczos(op, chains, on_step)
    chain = chains[0]
    theta, s, residuals = chain.ritz(0)
    residual = max(float(residuals[-1]), rounding * float(theta.abs().max()))
    converged = chain.broken[0] or residual <= tol * abs(float(theta[-1]))
    vectors = chain.ritz_vectors(0, s[:, -keep:].flip(1)).to(op.device)  # the caller multiplies by them
    return float(theta[-1]), residual, converged, vectors if keep > 1 else vectors[:, 0]


def _block_sums(
    rows: Tensor, whole: Block, shapes: Mapping[str, torch.Size], blocks: Sequence[Block]
) -> Tensor:
    """``(len(blocks), k)``: for every block, the sum of each row of ``rows`` (``(k, n)``, whole-model
    vectors) over the block's entries; no whole-model index tensor is built."""
    views, offset = {}, 0
    for name in whole.params:
        size = math.prod(shapes[name])
        views[name] = rows[:, offset : offset + size].reshape(rows.shape[0], *shapes[name])
        offset += size
    sums = [
        sum(
            part.select(views[part.param], leading=1).reshape(rows.shape[0], -1).sum(1)
            for part in block.parts
        )
        for block in blocks
    ]
    return torch.stack(sums) if sums else rows.new_zeros((0, rows.shape[0]))


def _check_tensors(tensors: Mapping[str, Tensor], model: nn.Module, what: str) -> None:
    """Every key a parameter of ``model`` (frozen ones are ignored), every tensor of its shape."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    unknown = [name for name in tensors if name not in shapes]
    if unknown:
        raise ValueError(
            f"{what} has entries {unknown[:3]} that are not parameters of the model; key it by the names of "
            "model.named_parameters()."
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shapes[name]):
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(t.shape)}, the parameter {tuple(shapes[name])}."
            )


def _whole(tensors: Mapping[str, Tensor], whole: Block, shapes: Mapping[str, torch.Size]) -> Tensor:
    """A per-parameter mapping as one whole-model vector (float64); a missing parameter counts as zero."""
    pieces = [
        tensors[name].detach() if name in tensors else torch.zeros(math.prod(shapes[name]))
        for name in whole.params
    ]
    return torch.cat([p.reshape(-1).to(device="cpu", dtype=torch.float64) for p in pieces])


def _alignment(x: Tensor, v: Tensor) -> float:
    norm = x.norm()
    return float(x @ v / norm) if norm > 0 and torch.isfinite(norm) else math.nan


def track_model(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    blocks: Sequence[Block],
    *,
    init: ModelCurvature | None = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    update: Mapping[str, Tensor] | None = None,
    max_iter: int = 8,
    cold_max_iter: int = 64,
    tol: float = 1e-2,
    trace_probes: int = 4,
    seed: int = 0,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    chunk_size: int | None = None,
    products: str = "exact",
    block_rayleigh: bool = False,
    basis_device: torch.device | str | None = None,
    subspace: int = 0,
    exact_unavailable: str | None = None,
) -> ModelCurvature:
    r"""The whole model's top curvature, warm-started, with its eigenvector's by-products and block traces.

    Cost: at most ``max_iter`` products for :math:`\lambda_{\max}`, as many for the preconditioned one, and
    ``trace_probes`` for the traces, all on one gradient graph (one forward and one ``create_graph``
    backward).

    Block traces from shared probes: with Rademacher :math:`z_j` over the whole model (:math:`j = 1..m`,
    the probes of :func:`~lightning_hessian.estimators.trace.hutchinson` on the whole model, same seed)
    and one product :math:`H z_j` each, :math:`\hat t_b = \frac1m \sum_j z_{j,b}^\top (H z_j)_b`. Since
    :math:`(Hz)_b = H_{bb} z_b + H_{b\bar b} z_{\bar b}` and the coordinates of :math:`z` are independent
    with zero mean, :math:`E[\hat t_b] = \operatorname{tr} H_{bb}`, and one probe's variance is
    :math:`2 (\|H_{bb}\|_F^2 - \sum_i H_{ii}^2) + \|H_{b\bar b}\|_F^2`: Hutchinson's variance on
    :math:`H_{bb}` plus the block's coupling to the rest of the model, the price of sharing the probes (on
    the tests' attention model the total was 4-24x Hutchinson's variance on :math:`H_{bb}` alone, per block).
    The reported standard error is the sample standard deviation over probes :math:`/\sqrt m` (so it needs
    ``m >= 2``). The same probes give :math:`\operatorname{tr} H` (variance
    :math:`2 (\|H\|_F^2 - \sum_i H_{ii}^2)` per probe). With a fixed ``seed`` every call draws the same
    probes, so the errors of successive calls are correlated; pass e.g. the step as ``seed`` for
    independent ones.

    Args:
        model: the model; left exactly as found (weights, ``.grad``, buffers, train/eval flags, RNG).
        loss_fn: ``loss_fn(model, batch)`` returning the scalar loss (as for ``analyze``).
        data: one batch, or several (:class:`~lightning_hessian.Batches`, a ``DataLoader``).
        blocks: the blocks whose shares and traces to report (e.g. ``find_blocks(model)``); they must hold
            trainable parameters only and may leave some out (the shares then sum to less than 1).
        init: the previous call's result: its top vectors start Lanczos. ``None`` (or a result for another
            set of trainable parameters) starts cold from :math:`g/\|g\| + r/\|r\|`, ``r`` random.
        preconditioner: a positive diagonal :math:`P` per trainable parameter name (e.g. Adam's
            :math:`\sqrt{\hat v} + \epsilon`; ``inf`` for frozen entries): adds
            :math:`\lambda_{\max}(P^{-1} H)`.
        update: the update just taken, per parameter name (a missing parameter counts as zero): adds its
            alignment with :math:`v`.
        max_iter: products per warm Lanczos run (each of the two); a run that stops there is not converged.
        cold_max_iter: products per Lanczos run without a warm start (the first call, or the preconditioned
            run's first call): ``max(max_iter, cold_max_iter)``. A cold start needs more products than a
            warm one (see the module's experiment); ``max_iter`` alone would leave the first measurement off.
        tol: relative Ritz-residual tolerance, relative to :math:`\lambda_{\max}` itself.
        trace_probes: Hutchinson probes shared by the whole model and every block (0: no traces).
        seed: seed of the random start part, the warm-start perturbation and the probes.
        mode, dtype, reduce, chunk_size, products, basis_device, exact_unavailable: as for
            :func:`~lightning_hessian.analyze`.
        block_rayleigh: also each block's Rayleigh quotient along its piece of the top eigenvector
            (``ModelCurvature.block_rayleigh``): one product with every block's diagonal Hessian block, on a
            second graph, costing about as much as one product for every block (a block's pruned product
            runs through every later layer: 2.7 + 2.33 L whole-model products for L layers, issue #12).
        subspace: also keep the top ``subspace`` Ritz vectors of the same Lanczos run
            (``ModelCurvature.subspace``, for :func:`~lightning_hessian.stabilization.measure_stabilization`):
            the run then takes at least that many products. Beyond the first, they span the Krylov space's
            best approximation of the top eigenspace, not converged eigenvectors.

    Returns:
        A :class:`ModelCurvature`; ``.scalars()`` gives the tags to log.
    """
    check_positive("cold_max_iter", cold_max_iter)
    if isinstance(subspace, bool) or not isinstance(subspace, int) or subspace < 0:
        raise ValueError(
            f"subspace must be an int >= 0 (top Ritz vectors to keep; 0: none), got {subspace!r}."
        )
    check_settings(
        max_iter=max_iter,
        tol=tol,
        dtype=dtype,
        mode=mode,
        seed=seed,
        chunk_size=chunk_size,
        basis_device=basis_device,
    )
    if isinstance(trace_probes, bool) or not isinstance(trace_probes, int) or trace_probes < 0:
        raise ValueError(f"trace_probes must be an int >= 0 (0: no traces), got {trace_probes!r}.")
    cold_max_iter = max(max_iter, cold_max_iter)
    if init is not None and not isinstance(init, ModelCurvature):
        raise TypeError(
            f"init must be the ModelCurvature of a previous call (or None), got {type(init).__name__}."
        )
    whole = model_block(model, MODEL)
    if whole.numel == 0:
        raise ValueError(
            "The model has no trainable parameters (requires_grad=False everywhere): nothing to measure."
        )
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    if is_sharded(model):  # whole-model vectors are whole on every process: gather sharded ones (FSDP2)
        preconditioner, update = full_tensors(preconditioner), full_tensors(update)
    blocks = list(blocks)
    check_blocks(blocks, model)
    frozen = [(b.name, n) for b in blocks for n in b.params if n not in shapes]
    if frozen:
        raise ValueError(
            f"Block {frozen[0][0]!r} holds the frozen parameter {frozen[0][1]!r}; pass blocks of trainable "
            "parameters only (find_blocks(model) leaves frozen ones out)."
        )
    if preconditioner is not None:
        missing = [n for n in shapes if n not in preconditioner]
        if missing:
            raise ValueError(
                f"preconditioner has no entry for {missing[:3]}; give one per trainable parameter."
            )
        _check_tensors(preconditioner, model, "preconditioner")
        bad = [n for n in shapes if not bool((preconditioner[n] > 0).all())]
        if bad:
            raise ValueError(
                f"preconditioner[{bad[0]!r}] has entries that are not positive (or NaN): P must be a positive"
                " diagonal, e.g. Adam's sqrt(v_hat) + eps, with inf for frozen entries."
            )
    if update is not None:
        _check_tensors(update, model, "update")
    u = None if update is None else _whole(update, whole, shapes)
    products, reason = resolve_products(products, model, exact_unavailable)
    check_products(products, "hessian", False, reason)

    began = time.perf_counter()
    with curvature_context(model, mode, exact=products == "exact"):
        options = dict(dtype=dtype, reduce=reduce, chunk_size=chunk_size)
        op = _operator(model, loss_fn, data, whole, products, **options)
        fresh = init is None or init.top_vector.shape != (whole.numel,)
        warm = StartVectors(op, None, "gradient", seed)(0) if fresh else init.top_vector
        budget = cold_max_iter if fresh else max_iter
        top, residual, converged, ritz = _top(op, warm, tol, budget, seed, basis_device, max(1, subspace))
        ritz = ritz.to(device="cpu", dtype=torch.float64).reshape(whole.numel, -1)
        v = ritz[:, 0] / ritz[:, 0].norm()
        basis = torch.linalg.qr(ritz).Q if subspace else None  # orthonormal in float64
        gradient = op.gradient(0).to(device="cpu", dtype=torch.float64)

        p_top = p_residual = p_converged = p_vector = None
        if preconditioner is not None:
            diagonal = block_diagonal(whole, preconditioner)
            scaled = PreconditionedOperator(op, [diagonal])
            p_warm = None if fresh or init.preconditioned_vector is None else init.preconditioned_vector
            budget = max_iter if p_warm is not None else cold_max_iter
            if p_warm is None:  # the gradient start in the preconditioned coordinates: P^{-1/2} g
                source = SimpleNamespace(
                    blocks=op.blocks, gradient=lambda _: diagonal.rsqrt().to(gradient) * gradient
                )
                p_warm = StartVectors(source, None, "gradient", seed)(0)
            p_top, p_residual, p_converged, p_vector = _top(scaled, p_warm, tol, budget, seed, basis_device)
            p_vector = p_vector.detach().cpu()

        traces: Tensor | None = None
        if trace_probes:
            probes = torch.stack(
                [
                    draws.rademacher((whole.numel,), draws.generator(seed, draws.HUTCHINSON, 0, j))
                    for j in range(trace_probes)
                ],
                dim=1,
            )
            hz = op.matmat([draws.to_operator(probes, op)])[0]
            # z_j' (H z_j) entrywise, then summed per block and over the whole model: (blocks + 1, m)
            rows = (probes * hz.to(device="cpu", dtype=torch.float64)).T
            traces = torch.cat([_block_sums(rows, whole, shapes, blocks), rows.sum(1, keepdim=True).T])
        loss, matvecs, keep = float(op.loss), op.matvecs, op.dtype
        del op
        rayleigh: dict[str, float] = {}
        if block_rayleigh and blocks:
            rayleigh, extra = _block_rayleigh(
                model, loss_fn, data, blocks, v, whole, shapes, products, options
            )
            matvecs += extra
    shares = _block_sums(v.square()[None], whole, shapes, blocks)[:, 0]
    means = [] if traces is None else traces.mean(1).tolist()
    errors = [] if traces is None else [draws.sample_stderr(row) for row in traces]
    names = [b.name for b in blocks]
    return ModelCurvature(
        top_eigenvalue=top,
        top_residual=residual,
        top_converged=converged,
        preconditioned_top=p_top,
        preconditioned_residual=p_residual,
        preconditioned_converged=p_converged,
        top_shares=dict(zip(names, shares.tolist())),
        gradient_alignment=abs(_alignment(gradient, v)),
        update_alignment=None if u is None else abs(_alignment(u, v)),
        trace=means[-1] if means else None,
        trace_stderr=errors[-1] if errors else None,
        block_traces=dict(zip(names, means[:-1])),
        block_trace_stderr=dict(zip(names, errors[:-1])),
        loss=loss,
        matvecs=matvecs,
        seconds=time.perf_counter() - began,
        top_vector=v.to(keep),
        preconditioned_vector=p_vector,
        block_rayleigh=rayleigh,
        subspace=basis,
        products=products,
    )


def _block_rayleigh(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    blocks: Sequence[Block],
    v: Tensor,
    whole: Block,
    shapes: Mapping[str, torch.Size],
    products: str,
    options: Mapping[str, Any],
) -> tuple[dict[str, float], int]:
    """``v_b' H_bb v_b / |v_b|^2`` for every block with a nonzero piece of ``v``, and the products taken."""
    pieces, offset = {}, 0
    for name in whole.params:
        size = math.prod(shapes[name])
        pieces[name] = v[offset : offset + size].reshape(shapes[name])
        offset += size
    parts = [block.vector(pieces) for block in blocks]
    batches = Batches(as_batches(data))
    if products == "finite_difference" and is_sharded(model):
        op = ShardedOperator(model, loss_fn, batches, list(blocks), **options)
    else:
        op = CurvatureOperator(model, loss_fn, batches, list(blocks), products=products, **options)
    vectors = [draws.to_operator(p, op) if p.norm() > 0 else None for p in parts]
    out = op.matmat(vectors)
    quotients = {
        block.name: float(p @ hp.to(device="cpu", dtype=torch.float64).reshape(-1)) / float(p @ p)
        for block, p, hp in zip(blocks, parts, out)
        if hp is not None
    }
    return quotients, op.matvecs
