"""Task 2: the top eigenvalue of every block, ours (cold, warm, per tensor) against the peers per tensor.

Ours runs all blocks in one batched pass, cold and warm (started from the previous report's Ritz vectors
after one AdamW step, as the callback does between passes), on our blocks and on the peers' granularity
(one block per parameter tensor). The peers run one operator per tensor with their task-1 choice; where
that is not accurate on every tensor, hessian-eigenthings also runs with its fewest Lanczos steps that
are (searched one step at a time, references in hand).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _models import ModelSpec, loss_fn, one_optimizer_step
from scipy.sparse.linalg import eigsh
from torch import nn

import lightning_hessian
from lightning_hessian import Block, analyze

from . import common
from .adapters import curvlinops_operator, he, metered_eigenthings, metered_scipy
from .references import reference_tops
from .top_eigenvalue import ACCURACY, Measured, TopResult

LOOSER_TOLS = (1e-2, 3e-2)  # ours per tensor at these too, so that ours gets its fastest accurate tol
TENSOR_RUNS = ("tensors", "tuned tensors", *(f"tensors {t:g}" for t in LOOSER_TOLS))  # only with peers


@dataclass
class OursRun:
    """One configuration of ours: median seconds and products over the repeats, the worst block's error."""

    seconds: float
    products: float
    error: float


@dataclass
class PeerRun:
    """One peer, one operator and one eigensolver run per tensor (seed 0)."""

    tool: str
    setting: str  # e.g. "lanczos k=1, max_iter=16, LA"
    seconds: dict[str, float]
    products: dict[str, int]
    error: float  # the worst tensor's relative error

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class BlocksResult:
    """What task 2 found on one model; ``ours`` is keyed as in ``_ours_runs`` (cold, warm, tensors, ...)."""

    spec_name: str
    description: str
    repeats: int
    n_blocks: int
    n_params: int  # parameter tensors in the model
    tensors: dict[str, int]  # the per-tensor blocks measured (name -> size); empty without the peers
    subset: bool  # whether the per-tensor blocks are a subset of the model's tensors
    tuned: float  # task 1's choice of tol for ours
    task1_seconds: float  # task 1's whole-model time of ours at tol=1e-4
    gradient: float  # seconds of one gradient (median over the section)
    ours: dict[str, OursRun]
    ours_per_tensor: dict[str, tuple[int, float]] = field(default_factory=dict)  # (products, seconds)
    peers: list[PeerRun] = field(
        default_factory=list
    )  # eigenthings' runs (task 1's choice first), curvlinops

    def peer_runs(self, tool: str) -> list[PeerRun]:
        return [p for p in self.peers if p.tool == tool]


def measure_blocks(
    spec: ModelSpec, top: TopResult, repeats: int, peers: bool, tensor_subset: Callable[[str], bool] | None
) -> BlocksResult:
    """Task 2 on ``spec``; the peers and ours per tensor only if ``peers`` (on ``tensor_subset``)."""
    model, batch = common.build(spec)
    stepped = one_optimizer_step(model, batch)
    unit = common.GradientUnit(model, batch)
    blocks = lightning_hessian.find_blocks(model)
    # The peers' granularity (one block per parameter tensor), measured only where the peers run.
    names = [n for n in common.params_of(model) if tensor_subset is None or tensor_subset(n)] if peers else []
    tensors = common.per_tensor_blocks(model, names)
    ref_blocks = reference_tops(model, batch, blocks)
    ref_stepped = reference_tops(stepped, batch, blocks)
    ref_tensors = reference_tops(model, batch, tensors) if peers else {}
    tuned = top.ours_choice().config.params["tol"]
    runs = _ours_runs(model, stepped, batch, blocks, tensors, repeats, tuned, unit)
    references = {"whole": {"model": top.reference}, "tuned whole": {"model": top.reference}}
    references |= {"cold": ref_blocks, **{k: ref_tensors for k in TENSOR_RUNS}}
    references |= {k: ref_stepped for k in ("warm", "cold, stepped", "tuned warm")}
    result = BlocksResult(
        spec_name=spec.name,
        description=spec.describe(model),
        repeats=repeats,
        n_blocks=len(blocks),
        n_params=len(common.params_of(model)),
        tensors={t.name: t.numel for t in tensors},
        subset=tensor_subset is not None,
        tuned=tuned,
        task1_seconds=next(m for m in top.family("ours: Lanczos") if m.config.default).time,
        gradient=0.0,
        ours={k: _summary(r, references[k]) for k, r in runs.items() if r},
    )
    if peers:
        report = runs["tensors"][0][1]
        result.ours_per_tensor = {n: (report.blocks[n].matvecs, report.blocks[n].seconds) for n in names}
        result.peers = _peer_runs(model, batch, top, names, ref_tensors, unit)
        unit.sample()
    result.gradient = unit.seconds
    return result


def _ours_runs(
    model: nn.Module,
    stepped: nn.Module,
    batch: Any,
    blocks: Sequence[Block],
    tensors: Sequence[Block],
    repeats: int,
    tuned: float,
    unit: common.GradientUnit,
) -> dict[str, list[tuple[float, Any]]]:
    """Ours, interleaved repeats (one seed each): ``key -> [(seconds, report)]``, in the table's order."""

    def ours(m: nn.Module, chosen: Sequence[Block], seed: int, tol: float = 1e-4, init: Any = None) -> Any:
        return analyze(
            m, loss_fn, batch, blocks=list(chosen), smallest=False, trace=False, seed=seed, tol=tol, init=init
        )

    def whole_model(seed: int, tol: float) -> Any:
        return analyze(
            model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False, seed=seed, tol=tol
        )

    keys = ("cold", "warm", "cold, stepped", "tensors", "tuned warm", "tuned tensors", *TENSOR_RUNS[2:])
    runs: dict[str, list[tuple[float, Any]]] = {k: [] for k in (*keys, "whole", "tuned whole")}
    timed = common.timed
    for seed in range(repeats):
        unit.sample()
        runs["whole"].append(timed(lambda seed=seed: whole_model(seed, 1e-4)))
        runs["tuned whole"].append(timed(lambda seed=seed: whole_model(seed, tuned)))
        runs["cold"].append(timed(lambda seed=seed: ours(model, blocks, seed)))
        # "warm": from the Ritz vectors of the report before the step, as the callback does between passes.
        previous = runs["cold"][-1][1]
        runs["warm"].append(timed(lambda seed=seed, p=previous: ours(stepped, blocks, seed, init=p)))
        runs["cold, stepped"].append(timed(lambda seed=seed: ours(stepped, blocks, seed)))
        runs["tuned warm"].append(timed(lambda seed=seed, p=previous: ours(stepped, blocks, seed, tuned, p)))
        if tensors:
            runs["tensors"].append(timed(lambda seed=seed: ours(model, tensors, seed)))
            runs["tuned tensors"].append(timed(lambda seed=seed: ours(model, tensors, seed, tuned)))
            for tol in LOOSER_TOLS:
                runs[f"tensors {tol:g}"].append(timed(lambda seed=seed, t=tol: ours(model, tensors, seed, t)))
    unit.sample()
    return runs


def _summary(runs: list[tuple[float, Any]], reference: dict[str, float]) -> OursRun:
    tops = [
        {"model": r.full.top_eigenvalue} if r.full else {k: b.top_eigenvalue for k, b in r.blocks.items()}
        for _, r in runs
    ]
    return OursRun(
        statistics.median(t for t, _ in runs),
        statistics.median(r.matvecs for _, r in runs),
        max(common.max_error(t, reference) for t in tops),
    )


def _peer_runs(
    model: nn.Module,
    batch: Any,
    top: TopResult,
    names: Sequence[str],
    reference: dict[str, float],
    unit: common.GradientUnit,
) -> list[PeerRun]:
    """hessian-eigenthings (task 1's choice, then the step search if needed), then curvlinops."""
    he_choice = top.fastest_accurate("eigenthings") or top.best_or_tightest("eigenthings: lanczos")
    cl_choice = top.best_or_tightest("curvlinops: eigsh")

    def per_tensor(tool: str, setting: str, one: Callable[[str], tuple[float, int]]) -> PeerRun:
        unit.sample()
        values, products, seconds = {}, {}, {}
        for name in names:
            seconds[name], (values[name], products[name]) = common.timed(lambda name=name: one(name))
        return PeerRun(tool, setting, seconds, products, common.max_error(values, reference))

    def method(choice: Measured) -> str:
        return f"{choice.config.family.split(': ')[1]} {choice.config.label}"

    he_runs = [
        per_tensor("hessian-eigenthings", method(he_choice), _eigenthings_one(model, batch, he_choice))
    ]
    # Task 1's choice was accurate on the whole model; per tensor it may not be. The target compares
    # accurate with accurate: its fewest Lanczos steps (one more at a time) that make every tensor accurate.
    first = he_choice.config.params.get("steps", 12) + 1
    for steps in range(first, first + 30):
        if he_runs[-1].error <= ACCURACY:
            break
        one = _eigenthings_one(model, batch, he_choice, steps)
        he_runs.append(per_tensor("hessian-eigenthings", f"lanczos k=1, max_iter={steps}, LA", one))
    return [*he_runs, per_tensor("curvlinops", method(cl_choice), _curvlinops_one(model, batch, cl_choice))]


def _eigenthings_one(
    model: nn.Module, batch: Any, choice: Measured, lanczos_steps: int | None = None
) -> Callable[[str], tuple[float, int]]:
    """One tensor's top eigenvalue and products: ``choice``'s method, or Lanczos with ``lanczos_steps``."""

    def one(name: str) -> tuple[float, int]:
        op, meter = metered_eigenthings(
            he.HessianOperator(model, [batch], loss_fn, param_filter=he.match_names(name))
        )
        if lanczos_steps is not None:
            value = he.lanczos(op, k=1, max_iter=min(lanczos_steps, op.size), which="LA", seed=0)
            return value.eigenvalues[0].item(), meter.count
        if choice.config.family == "eigenthings: power":
            value = he.power_iteration_one(op, tol=choice.config.params["tol"], max_iter=1000, seed=0)[0]
        else:
            steps = min(choice.config.params["steps"], op.size)
            value = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=0).eigenvalues[0].item()
        return value, meter.count

    return one


def _curvlinops_one(model: nn.Module, batch: Any, choice: Measured) -> Callable[[str], tuple[float, int]]:
    """One tensor's top eigenvalue and products by ``eigsh`` on curvlinops' operator, as ``choice``."""
    params = dict(model.named_parameters())

    def one(name: str) -> tuple[float, int]:
        op, meter = metered_scipy(curvlinops_operator(model, batch, [params[name]]).to_scipy())
        ncv = choice.config.params["ncv"]
        ncv = None if ncv is None else min(ncv, op.shape[0])
        v0 = np.random.default_rng(0).standard_normal(op.shape[0])
        tol = choice.config.params["tol"]
        value = eigsh(op, k=1, which="LA", tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False)[0]
        return float(value), meter.count

    return one
