"""``HessianMonitor``: the Lightning callback that measures per-block curvature while a model trains.

The callback is thin: it holds the curvature data and the loss, lets
:class:`~lightning_hessian.tracker.CurvatureTracker` plan and run the budget mode's tiers (or calls
:func:`~lightning_hessian.analyze` on a schedule), takes the live optimiser's thresholds from
:mod:`lightning_hessian.optimizers`, keeps the history of measurements, and hands the numbers to the
dashboard (:mod:`lightning_hessian.dashboard`) and the alert rules (:mod:`lightning_hessian.alerts`). No
mathematics lives here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_hessian import tags
from lightning_hessian._rng import isolated_rng
from lightning_hessian._side_effects import TrainingStepGuard
from lightning_hessian.alerts import SEVERITIES, Alert, AlertManager, AlertRule, PassRecord, as_record
from lightning_hessian.analysis import analyze
from lightning_hessian.batches import Batches, batch_size
from lightning_hessian.block_theory import BlockBoundComparison, compare_block_bound
from lightning_hessian.blocks import Block, FusedLayout, find_blocks
from lightning_hessian.dashboard import CurvatureDashboard
from lightning_hessian.errors import NonFiniteLossError, PassFailedElsewhere
from lightning_hessian.formulas.stability import block_heterogeneity
from lightning_hessian.html_report import write_html_report
from lightning_hessian.optimizers import adam_preconditioners, stability_scalars
from lightning_hessian.products import FSDP1_MESSAGE, check_products, resolve_products
from lightning_hessian.report import CurvatureReport
from lightning_hessian.settings import AnalysisSettings
from lightning_hessian.sharded import is_sharded, reshard
from lightning_hessian.theory import TheoryComparison, compare_attention
from lightning_hessian.tracker import DEFAULT_SHARES, FIGURES, FIGURES_SHARE, TIERS, CurvatureTracker

__all__ = ["HessianMonitor"]

_DATA_MODES = ("fixed", "current")
_ON_ERROR = ("warn", "raise")
_STOP_ON = (None, "warning", "critical")
_SEVERITY_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
_LOG = logging.getLogger("lightning_hessian")
_HISTORY = 1000  # measurements kept for the alert rules and the dashboards (a budget mode makes many)
#: The scalars put into ``trainer.callback_metrics`` (for EarlyStopping / ModelCheckpoint).
_MONITORED = (
    tags.SHARPNESS,
    tags.SHARPNESS_RATIO,
    tags.PRECONDITIONED_SHARPNESS,
    tags.PRECONDITIONED_RATIO,
    tags.HETEROGENEITY,
)


def _warn(message: str) -> None:
    """Warn (rank 0) without growing Python's warnings registry.

    ``warnings.warn`` under the default filter remembers every distinct message it has shown, in the calling
    module's ``__warningregistry__``; alert messages carry steps and values, so over a long run that
    registry grew by a few entries per pass (found by ``benchmarks/soak.py``). Alerts have their own
    cooldowns and errors are reported once by the callback, so no registry is kept: filters still apply.
    """
    if rank_zero_only.rank == 0:
        line = sys._getframe(1).f_lineno  # the caller's line, as warnings.warn would show
        warnings.warn_explicit(message, UserWarning, __file__, line, module=__name__, registry=None)


def _detached_copy(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def _to_cpu(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().cpu())


def _check_data(data: Any) -> None:
    """Refuse a ``data=`` that cannot give curvature batches at every pass, saying what works."""
    if isinstance(data, str):
        if data not in _DATA_MODES:
            raise ValueError(f'data must be "fixed", "current", or the curvature batches; got {data!r}.')
    elif isinstance(data, Sequence):
        if len(data) == 0:
            raise ValueError('data=[] holds no batches: pass at least one batch, or data="fixed".')
    elif isinstance(data, Iterator):
        raise TypeError(
            "data is an iterator, which the first pass would use up: pass a list of batches or a DataLoader "
            "(read again at every pass)."
        )
    elif not isinstance(data, Iterable):
        raise TypeError(
            f'data must be "fixed", "current", a list of batches or a DataLoader; got {type(data).__name__}.'
        )


def _is_rule_list(alerts: Any) -> bool:
    return (
        isinstance(alerts, Sequence)
        and not isinstance(alerts, str)
        and all(isinstance(rule, AlertRule) for rule in alerts)
    )


class _SilencedLogging:
    """Turns ``LightningModule.log`` / ``log_dict`` into no-ops, so a curvature pass logs nothing."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.module.log, self.module.log_dict


def training_step_loss(module: nn.Module, batch: Any, batch_idx: int = 0) -> Tensor:
    """The loss of ``module.training_step(batch, batch_idx)`` with the module's logging silenced.

    Accepts a ``training_step`` that returns the loss tensor or a dict with a ``"loss"`` entry.
    """
    with _SilencedLogging(module):
        out = module.training_step(batch, batch_idx)
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(
                "training_step returned a dict without a 'loss' key; pass loss_fn= to HessianMonitor."
            )
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"training_step returned {type(out).__name__}, not a loss tensor (batch_idx={batch_idx}); "
            "pass loss_fn=lambda module, batch: ... to HessianMonitor."
        )
    return out


def _optimizer_steps(trainer: pl.Trainer, *, ending_batch: bool = True) -> int:
    """The step axis Lightning logs the user's ``self.log`` metrics on: batches that stepped.

    With automatic optimisation and one optimiser this is ``trainer.global_step``; with manual
    optimisation and several optimisers ``global_step`` counts every ``optimizer.step()`` (twice per batch
    for two), while Lightning's loggers count batches. In ``on_train_batch_end`` the current batch is
    counted (once its gradient-accumulation window closes), as ``global_step`` already counts it.
    """
    loop = trainer.fit_loop.epoch_loop
    steps = loop._batches_that_stepped
    return steps + 1 if ending_batch and not loop._should_accumulate() else steps


def _strategy_reason(strategy: Any) -> str | None:
    """Why the training strategy rules out exact products (``None``: it does not); refuse the strategies
    that no product backend can measure, saying what to use instead."""
    name = type(strategy).__name__
    if "FSDP" in name:  # FSDP1: flat sharded parameters, neither backend can address a block
        raise RuntimeError(f"HessianMonitor does not support the {name} strategy. {FSDP1_MESSAGE}")
    if "DeepSpeed" in name or "XLA" in name:
        raise RuntimeError(
            f"HessianMonitor does not support the {name} strategy: "
            + (
                "DeepSpeed ZeRO partitions the parameters into flat buffers that no product backend can "
                "address per block"
                if "DeepSpeed" in name
                else "XLA runs the model as lazily traced graphs on TPU cores, which the monitor's per-block "
                "perturbations and products are not tested on"
            )
            + ". Monitor the run with DDP (strategy='ddp'), or with FSDP2 (ModelParallelStrategy) and "
            'products="auto"; or call lightning_hessian.analyze on a gathered copy of the model.'
        )
    if "ModelParallel" not in name:
        return None
    mesh = getattr(strategy, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise RuntimeError(
            f"HessianMonitor measures {name} runs that shard by data only (FSDP2): this one has "
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}, and the sharded finite-difference "
            "products assume that every process's gradient is its shard of the data-parallel mean. Pass "
            "ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1)."
        )
    return f"the training strategy {name} shards the parameters across processes (FSDP2 fully_shard)"


def _total_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps this run will take, when known before it ends."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no loader length yet, or an iterable dataset
        return None
    return int(total) if math.isfinite(total) else None


class HessianMonitor(Callback):
    r"""Measure the Hessian of the loss per parameter block during training, and raise curvature alerts.

    With no arguments the monitor keeps its total cost within ``budget`` (5%) of the training time, by
    planning what to measure (:class:`~lightning_hessian.tracker.CurvatureTracker`, with the measured cost
    of every kind of measurement on this model and machine): often, the curvature along the update just
    taken, the critical sharpness and, for Adam, the preconditioned curvature along the gradient (a few
    forwards); less often the whole model's sharpness and preconditioned sharpness (warm-tracked), each
    block's share of the top eigenvector and per-block traces; and exact per-block eigenvalues for one layer
    at a time, rotating so every block is measured once per rotation. Its own cost and the rotation's length
    are logged (``monitor/...``); a run too short for a tier at its budget is told so as soon as the costs
    are known. With ``every_n_steps`` (or ``early_steps``) it makes full passes of
    :func:`~lightning_hessian.analyze` on that schedule instead (and once at the end of training).

    Every measurement is logged through every attached logger as ``curvature/<block>/<statistic>``
    scalars and the stability ratios, and with TensorBoard as the dashboards and figures of
    :class:`~lightning_hessian.dashboard.CurvatureDashboard`.

    Stability (Cohen et al., ICLR 2021; arXiv:2207.14484): the whole model's top eigenvalue
    :math:`\lambda_{\max}` is compared with :math:`2/\eta` (``stability/sharpness_ratio``), and for
    Adam-family optimisers the preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)` with
    :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` (``stability/preconditioned_ratio``), with the live learning
    rate and betas of the first optimiser's first parameter group.

    Curvature data: by default (``data="fixed"``) the first ``num_batches`` training batches are captured
    and reused at every pass, so that curves over time measure the change of the model, not of the batch;
    they are saved in the callback's checkpoint state so a resumed run continues the same curves. Every
    pass of a curve uses the same data: a pass due before ``num_batches`` batches have been seen is skipped
    with a warning (pass the batches yourself to measure that early), and a first epoch shorter than
    ``num_batches`` makes every pass use the batches it had (with a warning; never repeated samples).
    ``data="current"`` uses the batch of the step that triggers the pass; a sequence of batches or a
    ``DataLoader`` uses those (the loader's first ``num_batches`` batches are read at every pass with the
    same random seed, so a shuffling loader gives the same batches, and the training's random streams are
    left alone).

    Loss: ``loss_fn(module, batch)`` if given (return ``(loss, output)`` for the Gauss-Newton split);
    otherwise the module's ``training_step(batch, batch_idx)`` (``batch_idx`` of the step that triggered the
    pass) with its ``self.log`` calls and the loggers' ``log_metrics`` silenced. Re-running
    ``training_step`` repeats its side effects: the module's plain attributes (torchmetrics states and
    counters included) are put back after the pass, changes other than metrics are reported once, and what
    lies outside the module (forward hooks' closures, globals) is not restored; ``loss_fn=`` avoids all of
    it.

    Steps: a pass at step ``s`` follows the ``s``-th batch that stepped, the step axis Lightning logs the
    module's own ``self.log`` metrics on (``trainer.global_step`` with automatic optimisation and one
    optimiser; with manual optimisation and two optimisers ``global_step`` advances twice per batch, this
    axis once).

    A pass never changes training: weights, ``.grad``, optimiser state, random streams, buffers and
    train/eval flags are left exactly as they were (see :func:`~lightning_hessian.analyze`), and an error
    inside a pass is reported once as a warning and training goes on (``on_error="raise"`` to re-raise).

    Args:
        every_n_steps: ``None`` (default): plan within ``budget``. An int: a full pass every this many
            optimizer steps (0: only ``early_steps`` and the end).
        budget: the fraction of training time the monitor may take (default ``0.05``), in budget mode.
        tiers: what budget mode measures: ``"update"`` (curvature along the update, critical sharpness,
            preconditioned gradient curvature), ``"model"`` (whole-model sharpness and what comes with it),
            ``"blocks"`` (exact per-block eigenvalues, one layer per measurement).
        early_steps: extra optimizer steps to measure at (curvature changes fastest early in training); a
            schedule, like ``every_n_steps``.
        at_end: one full pass at the end of training (default: with a schedule yes, in budget mode no).
        data: ``"fixed"``, ``"current"``, or the curvature batches themselves: a sequence of batches, or a
            DataLoader whose first ``num_batches`` batches are read at every pass (with ``seed``: the same
            ones).
        num_batches: with ``data="fixed"`` (or a DataLoader), how many batches to use.
        loss_fn: ``loss_fn(module, batch)`` returning the loss or ``(loss, output)``.
        blocks: ``"auto"`` (:func:`~lightning_hessian.find_blocks`), block names or ``Block`` objects, or
            ``None`` for the whole model only.
        rules: extra rules for :func:`~lightning_hessian.find_blocks`.
        full: also measure the whole model (needed for the stability ratios).
        top_k, smallest, trace, density, split, tol, max_iter, trace_matvecs, density_probes, density_steps,
            dtype, mode: as in :func:`~lightning_hessian.analyze`, but with cheaper defaults for a pass that
            repeats during training: no trace, no density, and ``tol=1e-3`` (each eigenvalue still lies
            within 0.1% of the block's spectral norm of a true eigenvalue; measured errors are ~1e-5).
            Together they bound the cost of a pass:
            at most ``blocks x (max_iter + trace_matvecs + density_probes x density_steps)`` Hessian-vector
            products (plus the same for the whole model, and twice ``max_iter`` more with ``split``).
        preconditioned: measure the preconditioned sharpness of Adam-family optimisers.
        stabilization: budget mode, opt-in: ``D >= 1`` adds Kiselev & Grabovoy's curvature-aligned
            stabilisation criterion (arXiv:2604.14870) in the top-``D`` Ritz space of the whole-model tier,
            against the training samples seen (every process's batches counted), at every other whole-model
            measurement (:mod:`lightning_hessian.stabilization`; ``n D`` products on the ``n`` curvature
            samples' own graphs, charged to the whole-model tier's budget). 0: off.
        warm_start: start each pass's Lanczos from the previous pass's Ritz vectors.
        alerts: ``True`` for the default rules, ``False`` for none, a list of rules, or an ``AlertManager``.
        on_alert: called with every :class:`~lightning_hessian.alerts.Alert` (on rank 0).
        stop_on: stop training at the first alert of this severity or worse (``"warning"``,
            ``"critical"``) or never (``None``).
        figures: draw the dashboards' figures for the loggers that take them (TensorBoard, Weights &
            Biases, MLflow; needs matplotlib).
        theory: evaluate the papers' attention theory on the model's own attention layers at every pass
            (:func:`~lightning_hessian.theory.compare_attention`): per-head Jacobian norms, the corrected
            single-layer bounds and measured / theory ratios as ``theory/...`` scalars, a "Theory vs measured"
            dashboard and a text table. Layers the formulas do not describe are listed once and left out.
        theory_target: ``theory_target(batch) -> Tensor`` for the papers' setting (one attention layer
            trained with the mean-squared error against this target): the bounds are then proven,
            ``theory/<block>/bound_ratio`` is logged and a ratio above 1 raises the ``bound_violation``
            alert. Checked numerically at every pass (see :mod:`lightning_hessian.theory`). With it, a
            post-norm layer of [P]'s exact form also gets the full-block bound of [P] Thm 6,
            ``theory/<layer>/block_bound`` (:mod:`lightning_hessian.block_theory`; seconds per sequence).
        theory_samples: sequences the Jacobian norms are averaged over.
        max_overhead: with a schedule, skip a scheduled pass while the passes so far have taken more than
            this fraction of the training time (e.g. ``0.05``); ``None`` never skips. The end-of-training pass
            is always made. (Budget mode plans instead of skipping: see ``budget``.)
        on_error: ``"warn"`` (report a failing pass once, keep training) or ``"raise"``. Out-of-memory
            errors are caught like any other; ``chunk_size`` keeps a pass inside a memory budget.
        chunk_size: split every curvature batch into chunks of at most this many samples and keep only one
            chunk's graph alive at a time (see :func:`~lightning_hessian.analyze`): less memory, more time.
        basis_device: keep the Lanczos bases (every block's, the whole model's) on this device, e.g.
            ``"cpu"`` when the GPU's memory is full: one vector moves each way per Lanczos step (see
            :func:`~lightning_hessian.analyze`). ``None`` (default): on the model's device.
        seed: seed of the estimators' random vectors (and of reading a ``DataLoader`` given as ``data``).
        products: the Hessian-vector product backend of every measurement that takes products (full
            passes; in budget mode the whole-model and block tiers, the update tier runs forwards only):
            ``"exact"`` (double backward, the default), ``"finite_difference"`` (central differences of
            gradients, :mod:`lightning_hessian.finite_difference`: the model runs with its own attention
            kernels and compiled graphs; Hessian only, no ``split`` or ``stabilization``) or ``"auto"``
            (finite differences where exact products are unavailable: a compiled model, or a
            ``ModelParallelStrategy`` (FSDP2) run, which ``"exact"`` is refused under; said once on rank 0).
            Every report records the backend (``report.settings["products"]``, each block's ``products``,
            the dashboards' latest-values text).
        name: tell two monitors in one Trainer apart (e.g. a frequent cheap one and a rare full one):
            every tag they log and every ``trainer.callback_metrics`` key is prefixed with ``"<name>/"``,
            and their checkpoint states are kept apart. ``None`` (default): unprefixed tags; two unnamed
            monitors in one Trainer are refused at setup.
        console: the least severe alert printed to the console as a warning (``"info"``, ``"warning"``
            (default), ``"critical"``, or ``None`` for none); the others go to the ``lightning_hessian``
            Python logger at INFO level. ``on_alert`` and the dashboards get every alert.
        html_report: at the end of training, write ``curvature_report.html`` (one self-contained page of
            the run's charts, alerts and latest values: :func:`~lightning_hessian.write_html_report`) into
            the first logger's log directory.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        budget: float | None = None,
        tiers: Sequence[str] = TIERS,
        early_steps: Sequence[int] = (),
        at_end: bool | None = None,
        data: str | Sequence[Any] | Iterable[Any] = "fixed",
        num_batches: int = 1,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        blocks: str | Sequence[str | Block] | None = "auto",
        rules: Mapping[str, str | FusedLayout] | None = None,
        full: bool = True,
        top_k: int = 1,
        smallest: bool = True,
        trace: bool = False,
        density: bool = False,
        split: bool = False,
        tol: float = 1e-3,
        max_iter: int = 100,
        trace_matvecs: int = 30,
        density_probes: int = 4,
        density_steps: int = 40,
        dtype: torch.dtype | None = None,
        mode: str = "eval",
        preconditioned: bool = True,
        stabilization: int = 0,
        warm_start: bool = True,
        alerts: bool | Sequence[AlertRule] | AlertManager = True,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on: str | None = None,
        figures: bool = True,
        max_overhead: float | None = None,
        on_error: str = "warn",
        seed: int = 0,
        chunk_size: int | None = None,
        basis_device: str | torch.device | None = None,
        products: str = "exact",
        theory: bool = True,
        theory_target: Callable[[Any], Tensor] | None = None,
        theory_samples: int = 2,
        name: str | None = None,
        console: str | None = "warning",
        html_report: bool = True,
    ) -> None:
        super().__init__()
        scheduled = every_n_steps is not None or bool(early_steps)
        if every_n_steps is None:
            every_n_steps = 0
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(
                f"every_n_steps must be None (plan by budget=), or an int >= 0 (0: only early_steps and the "
                f"end), got {every_n_steps!r}."
            )
        if scheduled and budget is not None:
            raise ValueError(
                "budget= plans the measurements itself; every_n_steps= / early_steps= schedule full passes "
                "instead. Pass one of them (max_overhead= bounds the cost of a schedule)."
            )
        if not scheduled and max_overhead is not None:
            raise ValueError(
                "max_overhead= bounds a schedule of full passes (every_n_steps=); without a schedule the "
                "monitor plans within budget= (default 0.05): pass budget= instead."
            )
        if at_end is None:
            at_end = scheduled
        if console not in _SEVERITY_RANK and console is not None:
            raise ValueError(
                "console must be 'info', 'warning', 'critical' (the least severe alert printed as a "
                "warning; less severe ones go to the 'lightning_hessian' logger) or None; got "
                f"{console!r}."
            )
        if isinstance(early_steps, str) or not isinstance(early_steps, Iterable):
            raise ValueError(
                f"early_steps must be a list of optimizer steps >= 1 (e.g. [1, 2, 5]; [] for none), got "
                f"{early_steps!r}."
            )
        early = list(early_steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in early):
            raise ValueError(f"early_steps must be optimizer steps >= 1, got {early_steps!r}.")
        if scheduled and every_n_steps == 0 and not early and not at_end:
            raise ValueError("Nothing scheduled: set every_n_steps > 0, early_steps, or at_end=True.")
        _check_data(data)
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name)):
            raise ValueError(
                f"name must be None or a non-empty tag prefix of letters, digits, '_', '.', '-' (e.g. "
                f"'full'), got {name!r}."
            )
        if not (isinstance(alerts, bool | AlertManager) or _is_rule_list(alerts)):
            raise TypeError(
                "alerts must be True (the default rules), False (none), a list of AlertRule objects or an "
                f"AlertManager; got {alerts!r}."
            )
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be a callable loss_fn(module, batch) -> loss (or (loss, output)).")
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}.")
        if stop_on not in _STOP_ON:
            raise ValueError(f"stop_on must be one of {_STOP_ON}, got {stop_on!r}.")
        if on_alert is not None and not callable(on_alert):
            raise TypeError("on_alert must be a callable on_alert(alert).")
        if theory_target is not None and not callable(theory_target):
            raise TypeError("theory_target must be a callable theory_target(batch) -> target tensor.")
        if theory_target is not None and not theory:
            raise ValueError("theory_target= needs theory=True.")
        if isinstance(theory_samples, bool) or not isinstance(theory_samples, int) or theory_samples < 1:
            raise ValueError(f"theory_samples must be a positive int, got {theory_samples!r}.")
        if blocks is None and not full:
            raise ValueError("Nothing to measure: blocks=None needs full=True.")
        if split and loss_fn is None:
            raise ValueError(
                "split=True needs loss_fn= returning (loss, output): training_step has no output."
            )

        self.every_n_steps = every_n_steps
        self.budget = None if scheduled else (0.05 if budget is None else budget)
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, int | float)
            or not 0 < self.budget < 1
        ):
            raise ValueError(
                f"budget must be a fraction of training time in (0, 1), e.g. 0.05; got {budget!r}."
            )
        self.console = console
        self.html_report = html_report
        if isinstance(tiers, str) or not set(tiers) <= set(TIERS) or not tiers:
            raise ValueError(f"tiers must be a non-empty list of {TIERS}, got {tiers!r}.")
        if scheduled and tuple(tiers) != TIERS:
            raise ValueError("tiers= chooses what budget mode plans; every_n_steps= makes full passes.")
        self.tiers = tuple(tiers)
        self.early_steps = sorted(set(early))
        self.at_end = at_end
        self.data = data
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.preconditioned = preconditioned
        if stabilization and budget is None:
            raise ValueError(
                "stabilization= is a tier of budget mode: pass budget= (e.g. 0.05) with it, or use "
                "lightning_hessian.stabilization.measure_stabilization in a loop of your own."
            )
        self.stabilization = stabilization
        self.warm_start = warm_start
        self.on_alert = on_alert
        self.stop_on = stop_on
        self.on_error = on_error
        self.theory = theory
        self.theory_target = theory_target
        self.theory_samples = theory_samples
        self.name = name
        # Checked here rather than at the first pass, by the function analyze checks them with. Block names
        # need the model: they are checked at setup.
        self.settings = AnalysisSettings(
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
            products=products,
        )
        if max_overhead is not None and not (isinstance(max_overhead, int | float) and max_overhead > 0):
            raise ValueError(
                f"max_overhead must be a positive fraction of training time, e.g. 0.05; got {max_overhead!r}."
            )
        self.max_overhead = max_overhead
        if isinstance(alerts, AlertManager):
            self.alerts = alerts
        elif alerts is True:
            self.alerts = AlertManager()
        elif alerts is False:
            self.alerts = AlertManager(rules=[])
        else:
            self.alerts = AlertManager(rules=list(alerts))
        self._figures = figures
        self._fresh_alerts = self.alerts.state_dict()  # what a new fit starts from
        self._exact_unavailable: str | None = None  # why the strategy rules out exact products (setup)
        self._reset()

    def _check_sharded_settings(self, pl_module: pl.LightningModule) -> None:
        """Under a sharding strategy: refuse ``products="exact"`` and what the sharded path cannot do."""
        reason = self._exact_unavailable
        try:
            products, _ = resolve_products(self.settings.products, pl_module, reason, warn=_warn)
            check_products(products, "hessian", self.settings.split, reason)
        except ValueError as error:
            raise RuntimeError(f"HessianMonitor: {error}") from None
        if self.settings.dtype is not None or self.settings.chunk_size is not None:
            raise RuntimeError(
                f"HessianMonitor: {reason}, so curvature is measured in the parameters' own dtype and on "
                "whole curvature batches: pass dtype=None and chunk_size=None (fewer or smaller curvature "
                "batches, num_batches= / data=, keep a pass inside a memory budget)."
            )

    def _products(self, pl_module: pl.LightningModule) -> None:
        """Resolve the product backend on the model as it trains (compiled or sharded by now), so that
        ``"auto"`` says why it takes finite differences once, on rank 0 (the passes then stay quiet)."""
        resolve_products(self.settings.products, pl_module, self._exact_unavailable, warn=_warn)

    def _reset(self) -> None:
        """Forget everything a fit left: a monitor reused in a second fit starts new curves."""
        self.alerts.load_state_dict(self._fresh_alerts)
        #: Every measurement's scalars, oldest first: read by the alert rules and the dashboards.
        self.history: deque[PassRecord] = deque(maxlen=_HISTORY)
        self.dashboard = CurvatureDashboard(figures=self._figures, prefix=self._prefix)
        self._batches: list[Any] = []
        self._captured = False  # data="fixed": the curvature batches are complete
        self._current: Any = None
        self._batch_idx = 0  # batch_idx of the latest batch that trained: the default loss calls it so
        self._last_step = -1
        self._last_pass_step = -1
        self._in_flight: int | None = None  # the step of a pass under way (interrupted if still set)
        self._resume_pass: int | None = None  # a pass a checkpoint says was interrupted: redo it
        self._last_report: CurvatureReport | None = None
        self._warned: set[str] = set()  # kinds of errors and theory notes already reported
        self._train_start: float | None = None
        self._train_seconds = 0.0  # training time before a resume (from the checkpoint)
        self._pass_seconds = 0.0
        self.passes = 0
        self.skipped = 0
        self._pending: list[str] | None = None  # budget mode: the tiers planned before this step's update
        self._told_schedule = False
        self.tracker = (
            None
            if self.budget is None
            else CurvatureTracker(
                budget=self.budget,
                shares={
                    **{
                        k: v
                        for k, v in DEFAULT_SHARES.items()
                        if k in self.tiers and (k != "model" or self.settings.full)
                    },
                    **({FIGURES: FIGURES_SHARE} if self._figures else {}),
                },
                analysis={**self.settings.kwargs(), "exact_unavailable": self._exact_unavailable},
                preconditioned=self.preconditioned,
                stabilization=self.stabilization,
                note=self._note,
            )
        )

    @property
    def _prefix(self) -> str:
        return f"{self.name}/" if self.name else ""

    @property
    @override
    def state_key(self) -> str:
        # Unnamed: the class name, as before (old checkpoints load). Named: one state per name.
        return self._generate_state_key(name=self.name) if self.name else super().state_key

    # --- schedule ------------------------------------------------------------------------------------------

    def _due(self, step: int) -> bool:
        if step in self.early_steps:
            return True
        return self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before training starts: a strategy no product backend can measure is refused with what to use
        # instead, and FSDP2 (ModelParallelStrategy) takes finite differences (exact products are refused).
        self._exact_unavailable = _strategy_reason(trainer.strategy)
        if self._exact_unavailable is not None:
            self._check_sharded_settings(pl_module)
        if stage != "fit":
            return
        # What needs the model or the Trainer is checked here, before the first step, not at the first pass.
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "HessianMonitor: with manual optimization training_step does not return the loss alone: pass "
                "loss_fn=lambda module, batch: <the loss> to HessianMonitor."
            )
        names = [b for b in self.settings.blocks or () if isinstance(b, str)]
        if names and not isinstance(self.settings.blocks, str):
            known = [b.name for b in find_blocks(pl_module, self.settings.rules, warn=False)]
            # The first pass reads fused layouts off the attention: a projection left whole here may then
            # become the blocks <module>.q / .k / .v.
            splits = {f"{name.rpartition('.')[0]}.{s}" for name in known for s in ("q", "k", "v")}
            missing = [n for n in names if n not in known and n not in splits]
            if missing:
                raise ValueError(
                    f"HessianMonitor(blocks=...): no block named {', '.join(map(repr, missing))} in "
                    f"{type(pl_module).__name__}. Known blocks: {', '.join(known)} (lightning_hessian."
                    "find_blocks(model) lists them; pass rules= to split parameters differently)."
                )
        twins = [
            c
            for c in trainer.callbacks
            if isinstance(c, HessianMonitor) and c is not self and c.name == self.name
        ]
        if twins:
            raise ValueError(
                f"Two HessianMonitors with name={self.name!r} in one Trainer would log the same tags and "
                "share one checkpoint state: give each its own name= (e.g. name='cheap' and name='full')."
            )
        # A new fit starts new curves; a resumed one gets its state from the checkpoint right after this.
        self._reset()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run continues the time budget: the training time before the checkpoint counts too.
        self._train_start = time.perf_counter() - self._train_seconds
        total = _total_steps(trainer)
        if self.tracker is None and total is not None and not self.early_steps:
            first = self.every_n_steps
            if (first == 0 or first > total) and not self.at_end:
                self._note(
                    f"every_n_steps={self.every_n_steps} schedules no pass within this run's {total} steps "
                    "and at_end=False: nothing will be measured. Lower every_n_steps or drop it (the "
                    "monitor then plans within a time budget)"
                )
            elif first == 0 or first > total:
                self._note(
                    f"every_n_steps={self.every_n_steps} schedules no pass within this run's {total} steps: "
                    "only the end-of-training pass will measure"
                )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._resume_pass is not None:
            # The checkpoint was written while the pass of this step was under way (e.g. Ctrl-C with
            # OnExceptionCheckpoint): it never finished, so make it now, on the checkpoint's weights.
            step, self._resume_pass = self._resume_pass, None
            self._measure(trainer, pl_module, step)

    def _over_budget(self) -> bool:
        if self.max_overhead is None or self._train_start is None or self.passes == 0:
            return False
        training = time.perf_counter() - self._train_start - self._pass_seconds
        return self._pass_seconds > self.max_overhead * max(training, 1e-9)

    def _training_seconds(self) -> float:
        if self._train_start is None:
            return 0.0
        return time.perf_counter() - self._train_start - self._pass_seconds

    def _plan(self, trainer: pl.Trainer) -> list[str]:
        """Budget mode: the tiers due now (rank 0 decides: time differs per process)."""
        assert self.tracker is not None
        steps = _optimizer_steps(trainer, ending_batch=False)
        kinds = self.tracker.plan(self._training_seconds(), steps) if self._ready() else []
        if trainer.world_size > 1:
            kinds = trainer.strategy.broadcast(kinds, src=0)
        return kinds

    def _ready(self) -> bool:
        """Whether a curvature batch exists for a pass now (data="fixed" completes its capture first)."""
        if self.data == "fixed":
            return self._captured
        return self.data != "current" or self._current is not None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Budget mode: plan before the update, so the weights it starts from can be kept to measure it.
        if self.tracker is None or self._pending is not None:
            return
        self._pending = self._plan(trainer)
        if self._pending and ("update" in self._pending or "model" in self._pending):
            self.tracker.snapshot(pl_module)

    def _tell_schedule(self, trainer: pl.Trainer, step: int) -> None:
        """Budget mode: say once, as soon as the costs are known, what this run is too short to measure."""
        assert self.tracker is not None
        total = _total_steps(trainer)
        planner = self.tracker.planner
        if total is None or planner.step_seconds is None or step < 3:
            return
        budget = f"budget={self.budget:g}"
        if not self._told_schedule:
            self._told_schedule = True
            late = {
                kind: round(interval)
                for kind in TIERS
                if planner.spent.get(kind, 0.0) == 0.0
                and (interval := planner.interval(kind)) is not None
                and interval > total
            }
            if late:
                listed = ", ".join(
                    f"{kind!r} (first due after ~{steps} steps)" for kind, steps in late.items()
                )
                self._note(
                    f"at {budget} this run of {total} steps is too short for the tier(s) {listed}: raise "
                    "budget=, or pass at_end=True for one full pass at the end"
                )
        rotation = self.tracker.rotation_steps()
        if rotation is not None and rotation > total:
            self._note(
                f"at {budget} one rotation over every block takes about {rotation:.0f} steps, longer than "
                f"this run's {total}: some blocks will not be measured. Raise budget=, or pass at_end=True "
                "for one full pass at the end"
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A batch training skipped (training_step returned None) is neither captured nor given to the loss.
        trained = outputs is not None or not pl_module.automatic_optimization
        if trained:
            self._batch_idx = batch_idx
            if self.tracker is not None:  # k of the stabilisation criterion: samples seen, all processes
                self.tracker.count_samples(batch_size(batch) * trainer.world_size)
        if self.data == "fixed" and not self._captured and trained:
            self._batches.append(_detached_copy(batch))
            self._captured = len(self._batches) >= self.num_batches
        elif self.data == "current":
            self._current = batch if trained else None
        step = _optimizer_steps(trainer)
        if step == self._last_step:  # a gradient-accumulation micro-batch: no optimizer step happened
            return
        self._last_step = step
        if self.tracker is not None:
            kinds, self._pending = self._pending, None
            if kinds is None:  # no optimizer step hook ran (manual optimisation): plan now, no update known
                kinds = self._plan(trainer)
            if kinds:
                self._measure(trainer, pl_module, step, kinds)
            if kinds or not self._told_schedule:  # not at every step: the estimates change only here
                self._tell_schedule(trainer, step)
            return
        if self._due(step):
            over_budget = self._over_budget()
            if trainer.world_size > 1:  # time differs per process: follow rank 0 so all make the same calls
                over_budget = trainer.strategy.broadcast(over_budget, src=0)
            if over_budget:
                self.skipped += 1
                return
            self._measure(trainer, pl_module, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_capture("the first training epoch had")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = _optimizer_steps(trainer, ending_batch=False)
        if self.at_end and step > 0 and step != self._last_pass_step:
            self._close_capture("training ended after")
            self._measure(trainer, pl_module, step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.html_report or not trainer.is_global_zero or not self.history:
            return
        for logger in trainer.loggers:
            log_dir = None if isinstance(logger, DummyLogger) else getattr(logger, "log_dir", None)
            if log_dir is None:
                continue
            try:
                logger.save()
                flush = getattr(getattr(logger, "experiment", None), "flush", None)
                if callable(flush):
                    flush()
                path = write_html_report(log_dir)
            except Exception as error:  # a report must never fail the run
                self._note(
                    f"the HTML report of the run could not be written ({type(error).__name__}: {error})"
                )
            else:
                _LOG.info("HessianMonitor: curvature report written to %s", path)
            return

    def _close_capture(self, what: str) -> None:
        """``data="fixed"`` saw fewer than ``num_batches`` batches: every pass from now on uses those."""
        if self.data == "fixed" and not self._captured and self._batches:
            self._captured = True
            self._note(
                f"{what} {len(self._batches)} batch(es), fewer than num_batches={self.num_batches}: every "
                f"curvature pass uses those {len(self._batches)} (no sample is repeated)"
            )

    # --- one pass ------------------------------------------------------------------------------------------

    def _curvature_data(self, step: int) -> Batches | None:
        if self.data == "current":
            return None if self._current is None else Batches([self._current])
        if self.data == "fixed":
            if self._batches and not self._captured:
                self.skipped += 1
                self._note(
                    f"the pass at step {step} was skipped: data='fixed' had seen {len(self._batches)} of its "
                    f"num_batches={self.num_batches} curvature batches, and every pass of a curve uses the "
                    "same batches. To measure this early, pass the curvature batches yourself (data=[...] or "
                    "a DataLoader) or lower num_batches"
                )
                return None
            return Batches(self._batches) if self._batches else None
        if isinstance(self.data, Sequence):
            return Batches(self.data)
        return self._read_loader()

    def _read_loader(self) -> Batches:
        """A DataLoader's first ``num_batches`` batches, the same at every pass, random streams untouched.

        Creating a DataLoader iterator draws from the global random generator (the sampler's shuffle seed
        and the workers' base seed, also with ``shuffle=False``), and a loader or sampler may have its own
        generator: all of them are seeded with ``seed`` for the read and put back afterwards.
        """
        loader = self.data
        owners = (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None))
        found = (getattr(owner, "generator", None) for owner in owners)
        generators = list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())
        states = [g.get_state() for g in generators]
        seed = self.settings.seed
        try:
            with isolated_rng():
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)  # noqa: NPY002 - datasets draw from it
                for g in generators:
                    g.manual_seed(seed)
                batches = [batch for batch, _ in zip(loader, range(self.num_batches))]
        finally:
            for g, state in zip(generators, states):
                g.set_state(state)
        if not batches:
            raise ValueError("The DataLoader given as data= gave no batches.")
        if len(batches) < self.num_batches:
            self._note(
                f"the DataLoader given as data= has {len(batches)} batch(es), fewer than "
                f"num_batches={self.num_batches}: every pass uses those {len(batches)}"
            )
        return Batches(batches)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, kinds: list[str] | None = None
    ) -> None:
        # Until a full pass has finished (or failed), a checkpoint records it as under way: an interrupted
        # pass (KeyboardInterrupt with OnExceptionCheckpoint) is made again by the resumed run. A budget
        # mode's tiers are short and planned again instead.
        self._in_flight = step if kinds is None else None
        began = time.perf_counter()
        booked = self.tracker.planner.seconds if self.tracker is not None else 0.0
        try:
            self._pass(trainer, pl_module, step, kinds)
        finally:
            elapsed = time.perf_counter() - began
            self._pass_seconds += elapsed  # not training time
            if kinds and self.tracker is not None:
                # What the tiers' own timing left out (theory, logging, figures, a failure) counts too, or
                # a failing tier would be planned again at every step.
                unbooked = max(0.0, elapsed - (self.tracker.planner.seconds - booked))
                for kind in kinds:
                    self.tracker.planner.charge(kind, unbooked / len(kinds))
        self._in_flight = None
        self._last_pass_step = step

    def _pass(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, kinds: list[str] | None = None
    ) -> None:
        """One measurement: a full pass (``kinds=None``) or the budget mode's tiers ``kinds``."""
        data = self._curvature_data(step)
        if data is None:
            return
        start = time.perf_counter()
        guard = None
        if self.loss_fn is None:
            loggers = [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]
            guard = TrainingStepGuard(pl_module, loggers)
        measurement = None
        try:
            with guard if guard is not None else contextlib.nullcontext(), self._progress(trainer) as say:
                self._products(pl_module)
                if kinds is None:
                    say("full pass over every block")
                    report, preconditioned = self._analyze(trainer, pl_module, data)
                    theorised = report
                else:
                    assert self.tracker is not None
                    rotations = self.tracker.rotations
                    measurement = self.tracker.measure(
                        kinds,
                        pl_module,
                        self._loss_fn(),
                        data,
                        step,
                        self._optimizer(trainer),
                        reduce=self._reduce(trainer),
                        progress=say,
                    )
                    report, preconditioned = self.tracker.latest, False
                    # The theory comparison needs every attention block: once per rotation over them.
                    theorised = report if self.tracker.rotations > rotations else None
                theory = (
                    self._theory(trainer, pl_module, data, theorised, step)
                    if self.theory and theorised is not None
                    else None
                )
                block_bound = (
                    self._block_theory(trainer, pl_module, data, theorised, step)
                    if self.theory and theorised is not None and self.theory_target is not None
                    else None
                )
        except NonFiniteLossError:
            if self.on_error == "raise":
                raise
            # Not a fault of the pass: the model itself has diverged. Skip the pass and let the alert rules
            # see it (the NonFinite rule fires on the NaN loss).
            self._record(trainer, PassRecord(step=step, scalars={tags.PASS_LOSS: math.nan}), None)
            return
        except Exception as error:  # a monitoring pass must never stop training
            if self.on_error == "raise":
                raise
            message = self._cause(trainer, error)
            hint = (
                " Pass chunk_size= (samples per chunk) to keep a pass inside a memory budget, or measure "
                "fewer or smaller curvature batches."
                if "OutOfMemoryError" in message
                else ""
            )
            self._warn_once(
                message,
                f"HessianMonitor: the curvature pass at step {step} failed and was skipped ({message})."
                f"{hint} Training goes on; pass on_error='raise' to see the traceback.",
            )
            return
        finally:
            reshard(pl_module)  # FSDP2: training's next forward gathers the shards it updated
            if guard is not None and guard.changed:
                self._note(
                    "the default curvature loss re-runs training_step, which changed "
                    f"{', '.join(guard.changed[:8])} of the module during the pass (put back afterwards; "
                    "torchmetrics states are always put back). Side effects outside the module, such as "
                    "forward hooks' counters, are not: pass loss_fn=lambda module, batch: <the loss> to "
                    "measure without re-running training_step"
                )
        if measurement is not None:
            scalars = dict(measurement.scalars)
        else:
            scalars = report.scalars()
            if report.full is not None:
                scalars.update(
                    stability_scalars(
                        self._optimizer(trainer),
                        report.full.top_eigenvalue,
                        report.full.preconditioned_top if preconditioned else None,
                    )
                )
        if theory is not None:
            scalars.update(theory.scalars())
        if block_bound is not None:
            scalars.update(block_bound.scalars())
        if report.settings.get("density"):
            densities = [b.density for b in report.blocks.values() if b.density is not None]
            if len(densities) >= 2:
                scalars[tags.HETEROGENEITY] = block_heterogeneity(densities)
        seconds = time.perf_counter() - start
        scalars[tags.PASS_SECONDS] = seconds
        if measurement is None:
            scalars[tags.PASS_MATVECS] = float(report.matvecs)
            self._last_report = report if self.warm_start else None
        scalars[tags.PASS_LOSS] = report.loss if measurement is None else measurement.loss
        self.passes += 1
        table = theory.table() if theory is not None and theory.layers else None
        if block_bound is not None and block_bound.layers:
            table = "\n\n".join(t for t in (table, block_bound.table()) if t)
        layout = None if self.tracker is None else self.tracker.expected_tags()
        # In budget mode figures are drawn when their own share of the budget allows (after a whole-model or
        # block measurement: the cheap tier's scalars are charted anyway).
        draw = kinds is None or (
            bool({"model", "blocks"} & set(kinds))
            and self.tracker is not None
            and self.tracker.planner.due(FIGURES)
        )
        began = time.perf_counter()
        self._record(trainer, PassRecord(step=step, scalars=scalars), report, table, layout, draw)
        if draw and kinds is not None and self.tracker is not None and self._figures:
            self.tracker.planner.spend(FIGURES, time.perf_counter() - began)

    @staticmethod
    def _cause(trainer: pl.Trainer, error: Exception) -> str:
        """The error of a failed pass; under DDP the causes of the processes where it failed, for rank 0.

        Every process reaches this together: a failure inside the products or the curvature loss is raised
        on all of them at the same collective call (see :class:`~lightning_hessian.CurvatureOperator`).
        """
        message = f"{type(error).__name__}: {error}"
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return message
        local = None if isinstance(error, PassFailedElsewhere) else message
        gathered: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        causes = [f"process {rank}: {cause}" for rank, cause in enumerate(gathered) if cause is not None]
        return "; ".join(causes) if causes else message

    def _theory(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Any,
        report: CurvatureReport,
        step: int,
    ) -> TheoryComparison | None:
        """The theory-versus-measured comparison of this pass; problems are reported once, never raised."""
        if is_sharded(pl_module):
            self._note(
                "the theory comparison is not made on sharded (FSDP2) parameters: it reads every attention "
                "layer's whole weights; the measured curvature is logged as usual"
            )
            return None
        loss_fn = self._loss_fn()
        target = self.theory_target
        if target is not None and trainer.world_size > 1:
            target = None
            self._note(
                "the theory's proven setting is checked in a single process only; under DDP each "
                "process would bound its own share of the curvature data"
            )
        try:
            comparison = compare_attention(
                pl_module,
                loss_fn,
                data,
                report,
                target=target,
                rules=self.settings.rules,
                jacobian_samples=self.theory_samples,
                mode=self.settings.mode,
            )
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._note(
                f"the theory comparison failed at step {step} and was left out "
                f"({type(error).__name__}: {error}); the measured curvature is logged as usual"
            )
            return None
        by_reason: dict[str, list[str]] = {}
        for layer, reason in comparison.skipped.items():
            by_reason.setdefault(reason, []).append(layer)
        for reason, layers in by_reason.items():
            self._note(f"attention layer(s) {', '.join(layers)} not compared with the theory: {reason}")
        if target is not None and comparison.proven_reason is not None:
            self._note(
                f"theory_target was given but the bounds are not proven for this model: "
                f"{comparison.proven_reason}; bound_ratio is not logged"
            )
        return comparison

    def _block_theory(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Any,
        report: CurvatureReport,
        step: int,
    ) -> BlockBoundComparison | None:
        """[P] Thm 6 on the model's post-norm layers (needs ``theory_target``); problems noted, not raised."""
        if trainer.world_size > 1:
            return None  # noted by _theory: the proven setting is checked in a single process only
        try:
            comparison = compare_block_bound(
                pl_module, self._loss_fn(), data, report, target=self.theory_target, mode=self.settings.mode
            )
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._note(
                f"the full-block bound failed at step {step} and was left out "
                f"({type(error).__name__}: {error})"
            )
            return None
        for layer, reason in comparison.skipped.items():
            self._note(f"layer {layer}: no full-block bound ([P] Thm 6): {reason}")
        return comparison

    def _loss_fn(self) -> Callable[[nn.Module, Any], Any]:
        """``loss_fn``, or ``training_step`` called with the batch index of the latest batch that trained (a
        ``training_step`` may return ``None`` for some indices, e.g. 0, to skip them)."""
        if self.loss_fn is not None:
            return self.loss_fn
        return functools.partial(training_step_loss, batch_idx=self._batch_idx)

    def _note(self, message: str) -> None:
        self._warn_once(message, f"HessianMonitor: {message}.")

    def _warn_once(self, kind: str, message: str) -> None:
        """Warn ``message`` once per kind: ``kind`` strings that differ only in numbers (steps, sizes,
        losses) are one kind."""
        key = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", kind)
        if key not in self._warned:
            self._warned.add(key)
            _warn(message)

    def _record(
        self,
        trainer: pl.Trainer,
        record: PassRecord,
        report: CurvatureReport | None,
        theory: str | None = None,
        layout: Iterable[str] | None = None,
        draw: bool = True,
    ) -> None:
        """Run the alert rules on a pass, publish its scalars and deliver its alerts."""
        self.history.append(as_record(record))
        fired = self.alerts.evaluate(self.history)
        scalars, step = record.scalars, record.step
        for name in _MONITORED:
            if name in scalars:
                trainer.callback_metrics[self._prefix + name] = torch.tensor(scalars[name])
        if trainer.is_global_zero:
            loggers = [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]
            if loggers and report is not None:
                self.dashboard.log_pass(
                    loggers,
                    step,
                    scalars,
                    report,
                    fired,
                    list(self.history),
                    theory,
                    layout_tags=layout,
                    draw=draw,
                )
            elif loggers:
                metrics = {**scalars, tags.ALERT_COUNT: float(len(fired))}
                for logger in loggers:
                    logger.log_metrics({self._prefix + k: v for k, v in metrics.items()}, step)
            for alert in fired:
                line = f"HessianMonitor [{alert.severity}] {alert.rule} at step {alert.step}: {alert.message}"
                if (
                    self.console is not None
                    and _SEVERITY_RANK[alert.severity] >= _SEVERITY_RANK[self.console]
                ):
                    _warn(line)
                else:
                    _LOG.info(line)
                if self.on_alert is not None:
                    self.on_alert(alert)
        if self.stop_on is not None and any(
            _SEVERITY_RANK[a.severity] >= _SEVERITY_RANK[self.stop_on] for a in fired
        ):
            trainer.should_stop = True

    def _analyze(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Any
    ) -> tuple[CurvatureReport, bool]:
        loss_fn = self._loss_fn()
        kwargs = self.settings.kwargs()
        preconditioner = None
        if self.preconditioned and kwargs["full"]:
            preconditioner, missing = adam_preconditioners(self._optimizer(trainer), pl_module)
            if missing:
                listed = ", ".join(missing[:3]) + (
                    f", ... ({len(missing) - 3} more)" if len(missing) > 3 else ""
                )
                self._note(
                    f"{len(missing)} trainable parameter(s) have no Adam state (they never got a gradient, "
                    f"or the optimiser does not hold them): {listed}. The preconditioned sharpness treats "
                    "them as not moving (P = inf); freeze them (requires_grad_(False)) if they are unused"
                )
        report = analyze(
            pl_module,
            loss_fn,
            data,
            init=self._last_report,
            preconditioner=preconditioner,
            reduce=self._reduce(trainer),
            exact_unavailable=self._exact_unavailable,
            **kwargs,
        )
        return report, preconditioner is not None

    @staticmethod
    def _reduce(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        # Under DDP every process measures its own curvature batches; summing the products across processes
        # gives the curvature of the union, identical on every process.
        return (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None

    @contextlib.contextmanager
    def _progress(self, trainer: pl.Trainer) -> Iterator[Callable[[str], None]]:
        """Say what a measurement is doing in the progress bar (a pass can take seconds: the bar would
        freeze with no word); the bar's next update puts its metrics back."""
        bar = getattr(trainer.progress_bar_callback, "train_progress_bar", None)
        if not trainer.is_global_zero or bar is None or not hasattr(bar, "set_postfix_str"):
            yield lambda what: None
            return
        prefix = f"HessianMonitor{f' {self.name}' if self.name else ''}: "

        def say(what: str) -> None:
            bar.set_postfix_str(prefix + what + " ...", refresh=True)

        yield say

    @staticmethod
    def _optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer | None:
        return trainer.optimizers[0] if trainer.optimizers else None

    # --- checkpointing -------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": [_to_cpu(b) for b in self._batches],
            "captured": self._captured,
            "batch_idx": self._batch_idx,
            "last_step": self._last_step,
            "last_pass_step": self._last_pass_step,
            "interrupted_step": self._in_flight,
            "passes": self.passes,
            "skipped": self.skipped,
            "pass_seconds": self._pass_seconds,
            "train_seconds": (
                time.perf_counter() - self._train_start
                if self._train_start is not None
                else self._train_seconds
            ),
            "history": [{"step": r.step, "scalars": dict(r.scalars)} for r in self.history],
            "alerts": self.alerts.state_dict(),
            "dashboard": self.dashboard.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches = list(state_dict.get("batches", []))
        self._captured = state_dict.get("captured", len(self._batches) >= self.num_batches)
        self._batch_idx = state_dict.get("batch_idx", 0)
        self._last_step = state_dict.get("last_step", -1)
        self._last_pass_step = state_dict.get("last_pass_step", -1)
        self._resume_pass = state_dict.get("interrupted_step")
        self.passes = state_dict.get("passes", 0)
        self.skipped = state_dict.get("skipped", 0)
        self._pass_seconds = state_dict.get("pass_seconds", 0.0)
        self._train_seconds = state_dict.get("train_seconds", 0.0)
        if "alerts" in state_dict:
            self.alerts.load_state_dict(state_dict["alerts"])
        # Checkpoints before the monitor owned its history kept it in the alert manager's state.
        saved = state_dict.get("history", state_dict.get("alerts", {}).get("history", []))
        self.history.clear()
        self.history.extend(PassRecord(int(r["step"]), dict(r["scalars"])) for r in saved)
        if "dashboard" in state_dict:
            self.dashboard.load_state_dict(state_dict["dashboard"])
        if self.tracker is not None and state_dict.get("tracker"):
            self.tracker.load_state_dict(state_dict["tracker"])
