"""``CurvatureTracker``: curvature tiers planned within a time budget, for any training loop.

Three tiers, each a different trade of cost against detail, planned by
:class:`~lightning_hessian.planner.BudgetPlanner` so that together they take a fixed share of the training
time (5% by default):

* ``"update"`` (cheap, many points per run): the curvature along the update the optimiser just took, the
  critical sharpness :math:`2/\\eta_c` from a forward-only line search along it, and for Adam-family
  optimisers the preconditioned curvature along the gradient (:mod:`lightning_hessian.directional`);
* ``"model"``: the whole model's :math:`\\lambda_{\\max}` and Adam's preconditioned :math:`\\lambda_{\\max}`,
  warm-tracked with a few products, each block's share of the top eigenvector, the gradient's and the
  update's alignment with it, per-block traces from shared probes and, at every fourth measurement, each
  block's Rayleigh quotient along its piece of the top eigenvector (:mod:`lightning_hessian.tracking`)
  and, opt-in (``stabilization=D``), at every other measurement [KG]'s curvature-aligned stabilisation
  criterion against the training samples seen (:mod:`lightning_hessian.stabilization`);
* ``"blocks"`` (exact per block): Lanczos on one block per measurement, warm-started from its previous
  vectors, rotating over the blocks layer by layer so every block is measured once per rotation
  (:func:`~lightning_hessian.analyze`).

The tracker knows nothing of Lightning. In a plain PyTorch loop::

    tracker = CurvatureTracker()                       # 5% of the training time
    for batch in loader:
        loss_fn(model, batch).backward()
        tracker.before_step(model)                     # after backward, before the optimiser step
        optimizer.step()
        optimizer.zero_grad()
        found = tracker.after_step(model, loss_fn, curvature_batch, optimizer)
        if found is not None:
            log(found.scalars, found.step)             # tags of lightning_hessian.tags

:meth:`~CurvatureTracker.before_step` / :meth:`~CurvatureTracker.after_step` keep the clock; a loop that
keeps its own calls :meth:`~CurvatureTracker.plan`, :meth:`~CurvatureTracker.snapshot` and
:meth:`~CurvatureTracker.measure` (:class:`~lightning_hessian.HessianMonitor` does, for a Lightning
``Trainer``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian import tags
from lightning_hessian.analysis import analyze
from lightning_hessian.batches import Batches, as_batches
from lightning_hessian.block_selection import select_blocks
from lightning_hessian.blocks import Block
from lightning_hessian.directional import directional_curvature
from lightning_hessian.formulas.stability import sgd_threshold
from lightning_hessian.loss_calls import LossFn
from lightning_hessian.optimizers import adam_preconditioners, learning_rate, stability_scalars
from lightning_hessian.planner import BudgetPlanner
from lightning_hessian.report import BlockCurvature, CurvatureReport
from lightning_hessian.settings import check_settings
from lightning_hessian.sharded import is_sharded, reshard
from lightning_hessian.stabilization import measure_stabilization
from lightning_hessian.tracking import ModelCurvature, track_model

__all__ = ["FIGURES", "TIERS", "CurvatureTracker", "Measurement"]

TIERS = ("update", "model", "blocks")
#: Shares of the budget: the cheap tier needs little to come often; the exact tiers split the rest.
DEFAULT_SHARES = {"update": 0.4, "model": 0.35, "blocks": 0.25}
#: A kind the caller plans with the same budget: drawing the dashboards' figures (on small models a set of
#: figures costs more than a whole-model measurement).
FIGURES = "figures"
FIGURES_SHARE = 0.15
#: The critical sharpness's line search (4-8 forwards) runs at every this many update-tier measurements; the
#: others cost about 1.5-2 training steps (update curvature and preconditioned gradient curvature).
CRITICAL_EVERY = 4
#: Each block's Rayleigh quotient along its piece of the top eigenvector costs about one product with every
#: block (2.7 + 2.33 L whole-model products for L layers): at every this many whole-model measurements.
RAYLEIGH_EVERY = 4
#: The stabilisation criterion (opt-in) takes n D products on per-sample graphs (the time of ~16-45
#: whole-batch products for D = 2-8 on small models): at every this many whole-model measurements (the first
#: included). Its time is charged to the "model" tier, which then comes less often within the budget.
STABILIZATION_EVERY = 2
#: Cost of a first measurement in training steps, until one is measured (small models on CPU: a cold
#: whole-model measurement costs ~20-40 steps, one layer's blocks cold ~30-100); the measured cost then
#: sets the pace. Lower priors give earlier first points but overshoot the budget on short runs.
_PRIOR_STEPS = {"update": 2.0, "model": 20.0, "blocks": 30.0, FIGURES: 20.0}
#: Lanczos steps of the first (cold) whole-model measurement: the next ones continue from its vector, so it
#: need not converge fully (``benchmarks/results/tracking.md``: 8 cold steps are 6-10% off).
_COLD_MAX_ITER = 24


@dataclass
class Measurement:
    """What one call of :meth:`CurvatureTracker.measure` measured.

    Attributes:
        step: the optimizer step. kinds: the tiers measured. scalars: tags of :mod:`lightning_hessian.tags`.
        report: the per-block report of the ``"blocks"`` tier's group (``None`` if it did not run).
        loss: the loss on the curvature data at the current weights. seconds: wall time of the measurement.
    """

    step: int
    kinds: list[str]
    scalars: dict[str, float] = field(default_factory=dict)
    report: CurvatureReport | None = None
    loss: float = math.nan
    seconds: float = 0.0


class CurvatureTracker:
    """Plans and runs the curvature tiers of a training run within a time budget.

    Args:
        budget: the fraction of training time the tiers may take together.
        shares: tier -> share of the budget (default :data:`DEFAULT_SHARES`); a tier left out never runs.
        analysis: keyword arguments of :func:`~lightning_hessian.analyze` for the ``"blocks"`` tier
            (``blocks``, ``rules``, ``top_k``, ``smallest``, ``tol``, ...); ``full`` is ignored (the
            whole model is the ``"model"`` tier). ``products`` (``"exact"``, ``"finite_difference"``,
            ``"auto"``) and ``exact_unavailable`` choose the product backend of both tiers that take
            Hessian-vector products (``"model"`` and ``"blocks"``; ``"update"`` runs forwards only; the
            stabilisation criterion needs exact products and is left out with finite differences).
        preconditioned: measure Adam's preconditioned curvature (Adam-family optimisers only).
        model_max_iter, model_tol: Lanczos steps and relative tolerance of one warm whole-model measurement.
        trace_probes: Hutchinson probes per whole-model measurement (0: no traces).
        stabilization: ``D >= 1`` adds [KG]'s curvature-aligned criterion in the top-``D`` Ritz space of the
            whole-model Lanczos run to every :data:`STABILIZATION_EVERY`-th ``"model"`` measurement, against
            the training samples seen (counted by :meth:`count_samples` or ``after_step(samples=)``); 0
            (default) leaves it off. Cost: ``n D`` per-sample Hessian-vector products on the ``n`` curvature
            samples (the time of ~16-45 whole-batch products for ``D = 2-8`` on small models, charged to the
            ``"model"`` tier) and at least ``D`` Lanczos steps.
        stabilization_sigma: the probes' standard deviation per subspace coordinate (parameter units).
        note: called with a sentence for things the user should know once (e.g. a warning function).
    """

    def __init__(
        self,
        *,
        budget: float = 0.05,
        shares: Mapping[str, float] | None = None,
        analysis: Mapping[str, Any] | None = None,
        preconditioned: bool = True,
        model_max_iter: int = 8,
        model_tol: float = 1e-2,
        trace_probes: int = 4,
        stabilization: int = 0,
        stabilization_sigma: float = 0.01,
        note: Callable[[str], None] | None = None,
    ) -> None:
        shares = dict(DEFAULT_SHARES if shares is None else shares)
        unknown = set(shares) - set(TIERS) - {FIGURES}
        if unknown:
            raise ValueError(f"shares: unknown tier(s) {sorted(unknown)}; the tiers are {TIERS}.")
        self.analysis = {k: v for k, v in (analysis or {}).items() if k != "full"}
        check_settings(products=self.analysis.get("products", "exact"))
        if self.analysis.get("blocks", "auto") is None:
            shares.pop("blocks", None)
        self.planner = BudgetPlanner(budget, shares, _PRIOR_STEPS)
        self.preconditioned = preconditioned
        self.model_max_iter = model_max_iter
        self.model_tol = model_tol
        self.trace_probes = trace_probes
        if isinstance(stabilization, bool) or not isinstance(stabilization, int) or stabilization < 0:
            raise ValueError(
                f"stabilization must be an int >= 0 (the probe subspace's dimension D; 0: off), got "
                f"{stabilization!r}."
            )
        if not (isinstance(stabilization_sigma, int | float) and 0 <= stabilization_sigma < math.inf):
            raise ValueError(
                f"stabilization_sigma must be a finite number >= 0, got {stabilization_sigma!r}."
            )
        self.stabilization = stabilization
        self.stabilization_sigma = float(stabilization_sigma)
        self.samples_seen = 0  # training samples so far (count_samples / after_step(samples=))
        self._stabilization_reference: float | None = None  # the first S_D: the O(k^-2) reference line
        self._told_samples = False
        self._note = note or (lambda message: None)
        self._blocks: list[Block] | None = None
        self._groups: list[tuple[Any, list[Block]]] = []
        self._next_group = 0
        self.rotations = 0  # completed rotations over every group
        self._update_count = 0  # update-tier measurements so far
        self._model_count = 0  # whole-model measurements so far
        self._ritz: dict[str, Tensor] = {}  # per block: the last Ritz vectors (CPU), the warm starts
        self._model: ModelCurvature | None = None
        self._snapshot: dict[str, Tensor] | None = None
        self._clock: float | None = None  # before_step / after_step: when training started,
        self._own_seconds = 0.0  # the time measurements took,
        self._steps = 0  # and the optimiser steps so far
        self._pending: list[str] = []
        self.latest = CurvatureReport(blocks={})  # every block's latest values, the whole model's too

    # --- a loop of your own --------------------------------------------------------------------------------

    def before_step(self, model: nn.Module) -> list[str]:
        """Plan at the current step (call after ``backward``, before ``optimizer.step()``); returns the tiers
        due, and keeps the weights if the update will be measured. Time between calls counts as training."""
        now = time.perf_counter()
        if self._clock is None:  # the training time before a resume counts too
            self._clock = now - self.planner.training_seconds
        self._pending = self.plan(now - self._clock - self._own_seconds, self._steps)
        if "update" in self._pending or "model" in self._pending:
            self.snapshot(model)
        return list(self._pending)

    def count_samples(self, samples: int) -> None:
        """Add ``samples`` training samples (all processes') to the count the stabilisation criterion uses."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"samples must be an int >= 0 (training samples in the step), got {samples!r}.")
        self.samples_seen += samples

    def after_step(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
        samples: int | None = None,
    ) -> Measurement | None:
        """Count the optimiser step (and the ``samples`` it trained on, for the stabilisation criterion) and
        run what :meth:`before_step` planned on the curvature ``data`` (the same batches every time, for
        curves of the model, not of the data); ``None`` if nothing was due."""
        self._steps += 1
        if samples is not None:
            self.count_samples(samples)
        kinds, self._pending = self._pending, []
        if not kinds:
            return None
        began = time.perf_counter()
        try:
            return self.measure(kinds, model, loss_fn, data, self._steps, optimizer, reduce=reduce)
        finally:
            self._own_seconds += time.perf_counter() - began

    # --- planning ------------------------------------------------------------------------------------------

    def plan(self, training_seconds: float, steps: int) -> list[str]:
        """The tiers due now, given the training time so far (the tracker's own excluded) and the steps."""
        self.planner.observe(training_seconds, steps)
        due = [kind for kind in ("update", "model") if self.planner.due(kind)]
        if self.planner.due("blocks", self._group_key()):
            due.append("blocks")
        return due

    def _group_key(self) -> Any:
        return self._groups[self._next_group][0] if self._groups else None

    def rotation_steps(self) -> float | None:
        """Training steps one rotation over every group of blocks takes at the budget (once estimable)."""
        if not self._groups:
            return None
        intervals = [self.planner.interval("blocks", key) for key, _ in self._groups]
        return None if any(i is None for i in intervals) else float(sum(intervals))  # type: ignore[arg-type]

    def snapshot(self, model: nn.Module) -> None:
        """Remember the trainable weights before the optimiser step (the update is measured against them)."""
        self._snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _update(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The update the optimiser just took, and forget the snapshot."""
        saved, self._snapshot = self._snapshot, None
        if saved is None:
            return None
        return {n: p.detach() - saved[n] for n, p in model.named_parameters() if n in saved}

    # --- measuring -----------------------------------------------------------------------------------------

    def measure(
        self,
        kinds: Sequence[str],
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Measurement:
        """Run the tiers ``kinds`` (from :meth:`plan`) at ``step`` on the curvature ``data``.

        Every process of a distributed run must call this with the same ``kinds`` (``reduce`` sums over
        processes, as in :func:`~lightning_hessian.analyze`).
        """
        began = time.perf_counter()
        batches = Batches(as_batches(data))  # read once; a plain list would be one batch
        if self._blocks is None:
            self._resolve_blocks(model, loss_fn, batches[0], reduce)
        update = self._update(model)
        lr = learning_rate(optimizer)
        preconditioner = None
        if self.preconditioned and ("update" in kinds or "model" in kinds):
            preconditioner, missing = adam_preconditioners(optimizer, model)
            if missing:
                self._note(
                    f"{len(missing)} trainable parameter(s) have no Adam state (they never got a gradient): "
                    f"{', '.join(missing[:3])}. The preconditioned curvature treats them as not moving"
                )
        result = Measurement(step=step, kinds=list(kinds))
        mode = self.analysis.get("mode", "eval")
        sharded = is_sharded(model)
        if sharded and preconditioner is not None and "update" in kinds:
            self._note(
                "the preconditioned curvature along the gradient (update tier) is not measured on sharded "
                "(FSDP2) parameters: it needs the whole gradient on every process, which autograd cannot "
                "take with respect to sharded parameters; the preconditioned sharpness (whole-model tier) is"
            )
        for kind in kinds:
            started = time.perf_counter()
            group: Any = None
            if kind == "update" and lr is not None:
                _say(progress, "curvature along the update")
                found = directional_curvature(
                    model, loss_fn, batches, update, lr=lr, mode=mode, reduce=reduce,
                    preconditioner=None if sharded else preconditioner,
                    critical=self._update_count % CRITICAL_EVERY == 0,
                )  # fmt: skip
                self._update_count += 1
                result.scalars.update(found.scalars(lr))
                result.loss = found.loss
                result.scalars.update({tags.LEARNING_RATE: lr, tags.THRESHOLD: sgd_threshold(lr)})
            elif kind == "model":
                _say(progress, "whole-model curvature")
                self._measure_model(
                    model, loss_fn, batches, preconditioner, update, optimizer, reduce, result
                )
            elif kind == "blocks" and self._groups:
                group, blocks = self._groups[self._next_group]
                _say(progress, f"{_group_name(group)} ({self._next_group + 1}/{len(self._groups)})")
                self._measure_blocks(model, loss_fn, batches, blocks, reduce, result)
                self._next_group = (self._next_group + 1) % len(self._groups)
                self.rotations += self._next_group == 0
            else:
                continue
            self.planner.spend(kind, time.perf_counter() - started, group)
        reshard(model)  # FSDP2: leave the parameters sharded, as training left them
        result.seconds = time.perf_counter() - began
        result.scalars.update(self.cost_scalars())
        return result

    def cost_scalars(self) -> dict[str, float]:
        """The tracker's own cost so far, and the length of a rotation at the budget."""
        out = {tags.MONITOR_SECONDS: self.planner.seconds, tags.MONITOR_OVERHEAD: self.planner.overhead}
        rotation = self.rotation_steps()
        if rotation is not None:
            out[tags.MONITOR_ROTATION] = rotation
        return out

    def expected_tags(self) -> set[str]:
        """Every tag the tiers will log on this model (the dashboards chart them from the first pass on)."""
        out = {
            tags.UPDATE_CURVATURE,
            tags.CRITICAL_SHARPNESS,
            tags.CRITICAL_RATIO,
            tags.LEARNING_RATE,
            tags.THRESHOLD,
            tags.SHARPNESS,
            tags.SHARPNESS_RATIO,
            tags.GRADIENT_ALIGNMENT,
            tags.UPDATE_ALIGNMENT,
            tags.MONITOR_SECONDS,
            tags.MONITOR_OVERHEAD,
            tags.MONITOR_ROTATION,
            tags.block_tag("model", "top_eigenvalue"),
        }
        if self.preconditioned:
            out |= {
                tags.PRECONDITIONED_GRADIENT_CURVATURE,
                tags.PRECONDITIONED_GRADIENT_RATIO,
                tags.PRECONDITIONED_SHARPNESS,
                tags.PRECONDITIONED_THRESHOLD,
                tags.PRECONDITIONED_RATIO,
            }
        stats = ["top_eigenvalue", "top_share", "top_rayleigh"]
        if self.analysis.get("smallest", True):
            stats += ["min_eigenvalue", "negative_ratio"]
        if self.trace_probes > 0 or self.analysis.get("trace"):
            stats.append("trace")
        out |= {tags.block_tag(b.name, stat) for b in self._blocks or () for stat in stats}
        if self.stabilization:
            out |= {
                tags.STABILIZATION_CRITERION,
                tags.STABILIZATION_REFERENCE,
                tags.STABILIZATION_VARIANCE,
                tags.STABILIZATION_VALUE_VARIANCE,
                tags.STABILIZATION_SAMPLES,
            }
        return out

    def _resolve_blocks(self, model: nn.Module, loss_fn: LossFn, example: Any, reduce: Any) -> None:
        blocks, _ = select_blocks(
            model, self.analysis.get("blocks", "auto"), self.analysis.get("rules"), loss_fn, example, reduce
        )
        self._blocks = blocks
        # One block per measurement, layer by layer (the blocks outside the layers last): a block's cold
        # Lanczos (top and smallest, tol 1e-3) costs ~50 products, a whole layer's hundreds, which would
        # freeze training for seconds; costs are kept per block (earlier layers' products cost more).
        ordered = sorted(blocks, key=lambda b: (b.layer is None, b.layer or 0))
        self._groups = [(b.name, [b]) for b in ordered]
        self._next_group = self._next_group % len(self._groups) if self._groups else 0  # after a resume
        self.latest.blocks = {b.name: BlockCurvature(b.name, b.kind, b.layer, b.numel) for b in blocks}

    def _measure_model(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        preconditioner: Mapping[str, Tensor] | None,
        update: Mapping[str, Tensor] | None,
        optimizer: torch.optim.Optimizer | None,
        reduce: Any,
        result: Measurement,
    ) -> None:
        settings = self.analysis
        stabilize = (
            self.stabilization > 0 and self.samples_seen > 0 and self._model_count % STABILIZATION_EVERY == 0
        )
        if self.stabilization and not self.samples_seen and not self._told_samples:
            self._told_samples = True
            self._note(
                "stabilization= needs the training samples seen (k): pass after_step(samples=batch size) or "
                "call count_samples(); until then the criterion is not measured"
            )
        found = track_model(
            model,
            loss_fn,
            batches,
            self._blocks or [],
            init=self._model,
            preconditioner=preconditioner,
            update=update,
            max_iter=self.model_max_iter,
            cold_max_iter=max(self.model_max_iter, _COLD_MAX_ITER),
            block_rayleigh=self._model_count % RAYLEIGH_EVERY == RAYLEIGH_EVERY - 1,
            tol=self.model_tol,
            trace_probes=self.trace_probes,
            seed=settings.get("seed", 0) + result.step,  # fresh trace probes at every measurement
            mode=settings.get("mode", "eval"),
            dtype=settings.get("dtype"),
            reduce=reduce,
            chunk_size=settings.get("chunk_size"),
            basis_device=settings.get("basis_device"),
            subspace=self.stabilization if stabilize else 0,
            products=settings.get("products", "exact"),
            exact_unavailable=settings.get("exact_unavailable"),
        )
        if stabilize and found.products != "exact":
            stabilize = False
            self._note(
                "the stabilisation criterion takes exact per-sample Hessian-vector products (double "
                "backward): it is not measured with finite-difference products"
            )
        self._model = found
        self._model_count += 1
        result.scalars.update(found.scalars())
        result.scalars.update(stability_scalars(optimizer, found.top_eigenvalue, found.preconditioned_top))
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.latest.full = BlockCurvature(
            "model",
            "model",
            None,
            numel,
            top_eigenvalues=[found.top_eigenvalue],
            top_residuals=[found.top_residual],
            converged=found.top_converged,
            trace=found.trace,
            trace_stderr=found.trace_stderr,
            preconditioned_top=found.preconditioned_top,
            matvecs=found.matvecs,
            seconds=found.seconds,
            products=found.products,
        )
        self.latest.settings["products"] = found.products
        self.latest.loss = result.loss = found.loss
        if stabilize and found.subspace is not None:
            self._measure_stabilization(model, loss_fn, batches, found.subspace, result)

    def _measure_stabilization(
        self, model: nn.Module, loss_fn: LossFn, batches: Batches, subspace: Tensor, result: Measurement
    ) -> None:
        found = measure_stabilization(
            model,
            loss_fn,
            batches,
            subspace,
            self.samples_seen,
            sigma=self.stabilization_sigma,
            mode=self.analysis.get("mode", "eval"),
        )
        if self._stabilization_reference is None:
            self._stabilization_reference = found.variance
        result.scalars.update(found.scalars(self._stabilization_reference))

    def _measure_blocks(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        blocks: list[Block],
        reduce: Any,
        result: Measurement,
    ) -> None:
        settings = {k: v for k, v in self.analysis.items() if k not in ("blocks", "rules")}
        init = {b.name: self._ritz[b.name] for b in blocks if b.name in self._ritz}
        report = analyze(
            model, loss_fn, batches, blocks=blocks, full=False, init=init or None, reduce=reduce, **settings
        )
        for block in report.blocks.values():
            if block.ritz_vectors is not None:
                self._ritz[block.name] = block.ritz_vectors.detach().to("cpu")
                block.ritz_vectors = None
            self.latest.blocks[block.name] = block
        self.latest.settings["products"] = report.settings["products"]
        self.latest.loss = result.loss = report.loss
        result.report = report
        result.scalars.update(report.scalars())

    # --- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Planner credits and costs, the rotation's position and the step count of ``before_step`` /
        ``after_step`` (warm-start vectors are not kept)."""
        return {
            "planner": self.planner.state_dict(),
            "steps": self._steps,
            "next_group": self._next_group,
            "rotations": self.rotations,
            "update_count": self._update_count,
            "model_count": self._model_count,
            "samples_seen": self.samples_seen,
            "stabilization_reference": self._stabilization_reference,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.planner.load_state_dict(state.get("planner", {}))
        self._next_group = int(state.get("next_group", 0))
        self.rotations = int(state.get("rotations", 0))
        self._update_count = int(state.get("update_count", 0))
        self._model_count = int(state.get("model_count", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self._stabilization_reference = state.get("stabilization_reference")
        # A loop of your own resumes its clock and step count where the checkpoint left them.
        self._steps = int(state.get("steps", 0))
        self._clock, self._own_seconds = None, 0.0


def _say(progress: Callable[[str], None] | None, what: str) -> None:
    if progress is not None:
        progress(what)


def _group_name(group: Any) -> str:
    return f"block {group}"
