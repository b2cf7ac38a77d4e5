"""``HessianMonitor``: the Lightning callback that measures per-block curvature while a model trains.

The callback is thin: it decides when to measure, on which data and with which loss, calls
:func:`~lightning_hessian.analyze`, adds the stability thresholds of the live optimiser, and hands the
numbers to the dashboard (:mod:`lightning_hessian.dashboard`) and the alert rules
(:mod:`lightning_hessian.alerts`). No mathematics lives here.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_hessian import tags
from lightning_hessian.alerts import Alert, AlertManager, AlertRule, PassRecord
from lightning_hessian.analysis import analyze
from lightning_hessian.blocks import Block, FusedLayout
from lightning_hessian.dashboard import CurvatureDashboard
from lightning_hessian.formulas.stability import (
    adam_preconditioner,
    adam_threshold,
    block_heterogeneity,
    sgd_threshold,
)
from lightning_hessian.operators import Batches, NonFiniteLossError
from lightning_hessian.report import CurvatureReport
from lightning_hessian.theory import TheoryComparison, compare_attention

__all__ = ["HessianMonitor"]

_DATA_MODES = ("fixed", "current")
_ON_ERROR = ("warn", "raise")
_STOP_ON = (None, "warning", "critical")
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
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


class _SilencedLogging:
    """Turns ``LightningModule.log`` / ``log_dict`` into no-ops, so a curvature pass logs nothing."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.module.log, self.module.log_dict


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of ``module.training_step(batch, 0)`` with the module's logging silenced.

    Accepts a ``training_step`` that returns the loss tensor or a dict with a ``"loss"`` entry.
    """
    with _SilencedLogging(module):
        out = module.training_step(batch, 0)
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(
                "training_step returned a dict without a 'loss' key; pass loss_fn= to HessianMonitor."
            )
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"training_step returned {type(out).__name__}, not a loss tensor; pass "
            "loss_fn=lambda module, batch: ... to HessianMonitor."
        )
    return out


class HessianMonitor(Callback):
    r"""Measure the Hessian of the loss per parameter block during training, and raise curvature alerts.

    Every ``every_n_steps`` optimizer steps (and at ``early_steps``, and once at the end of training) the
    callback runs :func:`~lightning_hessian.analyze` on a fixed set of curvature batches and logs, through
    every attached logger, ``curvature/<block>/<statistic>`` scalars, the stability ratios, and with
    TensorBoard the dashboards and figures of :class:`~lightning_hessian.dashboard.CurvatureDashboard`.

    Stability (Cohen et al., ICLR 2021; arXiv:2207.14484): the whole model's top eigenvalue
    :math:`\lambda_{\max}` is compared with :math:`2/\eta` (``stability/sharpness_ratio``), and for
    Adam-family optimisers the preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)` with
    :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` (``stability/preconditioned_ratio``), with the live learning
    rate and betas of the first optimiser's first parameter group.

    Curvature data: by default (``data="fixed"``) the first ``num_batches`` training batches are captured
    and reused at every pass, so that curves over time measure the change of the model, not of the batch;
    they are saved in the callback's checkpoint state so a resumed run continues the same curves.
    ``data="current"`` uses the batch of the step that triggers the pass; a sequence of batches or a
    ``DataLoader`` uses those.

    Loss: ``loss_fn(module, batch)`` if given (return ``(loss, output)`` for the Gauss-Newton split);
    otherwise the module's ``training_step(batch, 0)`` with its ``self.log`` calls silenced, so the
    metrics the user logs are unchanged.

    A pass never changes training: weights, ``.grad``, optimiser state, random streams, buffers and
    train/eval flags are left exactly as they were (see :func:`~lightning_hessian.analyze`), and an error
    inside a pass is reported once as a warning and training goes on (``on_error="raise"`` to re-raise).

    Args:
        every_n_steps: measure every this many optimizer steps (0: only ``early_steps`` and the end).
        early_steps: extra optimizer steps to measure at (curvature changes fastest early in training).
        at_end: measure once more at the end of training.
        data: ``"fixed"``, ``"current"``, or the curvature batches themselves: a sequence of batches, or a
            DataLoader whose first ``num_batches`` batches are read afresh at every pass.
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
        warm_start: start each pass's Lanczos from the previous pass's Ritz vectors.
        alerts: ``True`` for the default rules, ``False`` for none, a list of rules, or an ``AlertManager``.
        on_alert: called with every :class:`~lightning_hessian.alerts.Alert` (on rank 0).
        stop_on: stop training at the first alert of this severity or worse (``"warning"``,
            ``"critical"``) or never (``None``).
        figures: draw TensorBoard figures (needs matplotlib).
        theory: evaluate the papers' attention theory on the model's own attention layers at every pass
            (:func:`~lightning_hessian.theory.compare_attention`): per-head Jacobian norms, the corrected
            single-layer bounds and measured / theory ratios as ``theory/...`` scalars, a "Theory vs measured"
            dashboard and a text table. Layers the formulas do not describe are listed once and left out.
        theory_target: ``theory_target(batch) -> Tensor`` for the papers' setting (one attention layer
            trained with the mean-squared error against this target): the bounds are then proven,
            ``theory/<block>/bound_ratio`` is logged and a ratio above 1 raises the ``bound_violation``
            alert. Checked numerically at every pass (see :mod:`lightning_hessian.theory`).
        theory_samples: sequences the Jacobian norms are averaged over.
        max_overhead: a time budget: skip a scheduled pass while the passes so far have taken more than this
            fraction of the training time (e.g. ``0.05``); ``None`` never skips. The end-of-training pass is
            always made.
        on_error: ``"warn"`` (report a failing pass once, keep training) or ``"raise"``. Out-of-memory
            errors are caught like any other; ``chunk_size`` keeps a pass inside a memory budget.
        chunk_size: split every curvature batch into chunks of at most this many samples and keep only one
            chunk's graph alive at a time (see :func:`~lightning_hessian.analyze`): less memory, more time.
        seed: seed of the estimators' random vectors.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        early_steps: Sequence[int] = (),
        at_end: bool = True,
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
        warm_start: bool = True,
        alerts: bool | Sequence[AlertRule] | AlertManager = True,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on: str | None = None,
        figures: bool = True,
        max_overhead: float | None = None,
        on_error: str = "warn",
        seed: int = 0,
        chunk_size: int | None = None,
        theory: bool = True,
        theory_target: Callable[[Any], Tensor] | None = None,
        theory_samples: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(
                f"every_n_steps must be an int >= 0 (0: only early_steps and the end), got {every_n_steps!r}."
            )
        early = list(early_steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in early):
            raise ValueError(f"early_steps must be optimizer steps >= 1, got {early_steps!r}.")
        if every_n_steps == 0 and not early and not at_end:
            raise ValueError("Nothing scheduled: set every_n_steps > 0, early_steps, or at_end=True.")
        if isinstance(data, str) and data not in _DATA_MODES:
            raise ValueError(f'data must be "fixed", "current", or the curvature batches; got {data!r}.')
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
        self.early_steps = sorted(set(early))
        self.at_end = at_end
        self.data = data
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.preconditioned = preconditioned
        self.warm_start = warm_start
        self.on_alert = on_alert
        self.stop_on = stop_on
        self.on_error = on_error
        self.theory = theory
        self.theory_target = theory_target
        self.theory_samples = theory_samples
        # Checked here rather than at the first pass: analyze validates the same arguments.
        self._analyze_kwargs = dict(
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
        if max_overhead is not None and not (isinstance(max_overhead, int | float) and max_overhead > 0):
            raise ValueError(
                f"max_overhead must be a positive fraction of training time, e.g. 0.05; got {max_overhead!r}."
            )
        self.max_overhead = max_overhead
        for name, value in [
            ("top_k", top_k),
            ("max_iter", max_iter),
            ("trace_matvecs", trace_matvecs),
            ("density_probes", density_probes),
            ("density_steps", density_steps),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive int (samples per chunk) or None, got {chunk_size!r}."
            )
        if not isinstance(tol, int | float) or tol <= 0:
            raise ValueError(f"tol must be a positive float, got {tol!r}.")
        if isinstance(alerts, AlertManager):
            self.alerts = alerts
        elif alerts is True:
            self.alerts = AlertManager()
        elif alerts is False:
            self.alerts = AlertManager(rules=[])
        else:
            self.alerts = AlertManager(rules=list(alerts))
        self.dashboard = CurvatureDashboard(figures=figures)

        self._batches: list[Any] = []
        self._current: Any = None
        self._last_step = -1
        self._last_pass_step = -1
        self._last_report: CurvatureReport | None = None
        self._warned: set[str] = set()  # kinds of errors and theory notes already reported
        self._train_start: float | None = None
        self._train_seconds = 0.0  # training time before a resume (from the checkpoint)
        self._pass_seconds = 0.0
        self.passes = 0
        self.skipped = 0

    # --- schedule ------------------------------------------------------------------------------------------

    def _due(self, step: int) -> bool:
        if step in self.early_steps:
            return True
        return self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Sharded strategies hold only a shard of each parameter per process: the per-block products would
        # be wrong or hang. Refuse before training starts, with what to use instead.
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel", "XLA")):
            raise RuntimeError(
                f"HessianMonitor does not support the {strategy} strategy (its parameters are sharded across "
                "processes). Use a single device or DDP (strategy='ddp') for the runs you monitor, or call "
                "lightning_hessian.analyze on a gathered copy of the model."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run continues the time budget: the training time before the checkpoint counts too.
        self._train_start = time.perf_counter() - self._train_seconds

    def _over_budget(self) -> bool:
        if self.max_overhead is None or self._train_start is None or self.passes == 0:
            return False
        training = time.perf_counter() - self._train_start - self._pass_seconds
        return self._pass_seconds > self.max_overhead * max(training, 1e-9)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.data == "fixed" and len(self._batches) < self.num_batches:
            self._batches.append(_detached_copy(batch))
        elif self.data == "current":
            self._current = batch
        step = trainer.global_step
        if step == self._last_step:  # a gradient-accumulation micro-batch: no optimizer step happened
            return
        self._last_step = step
        if self._due(step):
            over_budget = self._over_budget()
            if trainer.world_size > 1:  # time differs per process: follow rank 0 so all make the same calls
                over_budget = trainer.strategy.broadcast(over_budget, src=0)
            if over_budget:
                self.skipped += 1
                return
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and trainer.global_step > 0 and trainer.global_step != self._last_pass_step:
            self._measure(trainer, pl_module)

    # --- one pass ------------------------------------------------------------------------------------------

    def _curvature_data(self) -> Batches | None:
        if self.data == "current":
            return None if self._current is None else Batches([self._current])
        if self.data == "fixed":
            return Batches(self._batches) if self._batches else None
        if isinstance(self.data, Sequence):
            return Batches(self.data)
        # A DataLoader (or other iterable) is read afresh at every pass.
        return Batches(batch for batch, _ in zip(self.data, range(self.num_batches)))

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = self._curvature_data()
        if data is None:
            return
        step = trainer.global_step
        self._last_pass_step = step
        start = time.perf_counter()
        try:
            report, preconditioned = self._analyze(trainer, pl_module, data)
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
            message = f"{type(error).__name__}: {error}"
            hint = (
                " Pass chunk_size= (samples per chunk) to keep a pass inside a memory budget, or measure "
                "fewer or smaller curvature batches."
                if isinstance(error, torch.OutOfMemoryError)
                else ""
            )
            self._warn_once(
                message,
                f"HessianMonitor: the curvature pass at step {step} failed and was skipped ({message})."
                f"{hint} Training goes on; pass on_error='raise' to see the traceback.",
            )
            return
        scalars = report.scalars()
        scalars.update(self._stability(trainer, report, preconditioned))
        theory = self._theory(trainer, pl_module, data, report, step) if self.theory else None
        if theory is not None:
            scalars.update(theory.scalars())
        if report.settings.get("density"):
            densities = [b.density for b in report.blocks.values() if b.density is not None]
            if len(densities) >= 2:
                scalars[tags.HETEROGENEITY] = block_heterogeneity(densities)
        seconds = time.perf_counter() - start
        self._pass_seconds += seconds
        scalars[tags.PASS_SECONDS] = seconds
        scalars[tags.PASS_MATVECS] = float(report.matvecs)
        scalars[tags.PASS_LOSS] = report.loss
        self._last_report = report if self.warm_start else None
        self.passes += 1
        table = theory.table() if theory is not None and theory.layers else None
        self._record(trainer, PassRecord(step=step, scalars=scalars), report, table)

    def _theory(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Any,
        report: CurvatureReport,
        step: int,
    ) -> TheoryComparison | None:
        """The theory-versus-measured comparison of this pass; problems are reported once, never raised."""
        loss_fn = self.loss_fn if self.loss_fn is not None else training_step_loss
        target = self.theory_target
        if target is not None and trainer.world_size > 1:
            target = None
            self._note("the theory's proven setting is checked in a single process only; under DDP each "
                       "process would bound its own share of the curvature data")
        try:
            comparison = compare_attention(
                pl_module,
                loss_fn,
                data,
                report,
                target=target,
                rules=self._analyze_kwargs["rules"],
                jacobian_samples=self.theory_samples,
                mode=self._analyze_kwargs["mode"],
            )
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._note(f"the theory comparison failed at step {step} and was left out "
                       f"({type(error).__name__}: {error}); the measured curvature is logged as usual")
            return None
        by_reason: dict[str, list[str]] = {}
        for layer, reason in comparison.skipped.items():
            by_reason.setdefault(reason, []).append(layer)
        for reason, layers in by_reason.items():
            self._note(f"attention layer(s) {', '.join(layers)} not compared with the theory: {reason}")
        if target is not None and comparison.proven_reason is not None:
            self._note(f"theory_target was given but the bounds are not proven for this model: "
                       f"{comparison.proven_reason}; bound_ratio is not logged")
        return comparison

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
    ) -> None:
        """Run the alert rules on a pass, publish its scalars and deliver its alerts."""
        fired = self.alerts.update(record)
        scalars, step = record.scalars, record.step
        for name in _MONITORED:
            if name in scalars:
                trainer.callback_metrics[name] = torch.tensor(scalars[name])
        if trainer.is_global_zero:
            loggers = [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]
            if loggers and report is not None:
                self.dashboard.log_pass(loggers, step, scalars, report, fired, self.alerts.history, theory)
            elif loggers:
                for logger in loggers:
                    logger.log_metrics({**scalars, tags.ALERT_COUNT: float(len(fired))}, step)
            for alert in fired:
                _warn(f"HessianMonitor [{alert.severity}] {alert.rule} at step {alert.step}: {alert.message}")
                if self.on_alert is not None:
                    self.on_alert(alert)
        if self.stop_on is not None and any(
            _SEVERITY_RANK[a.severity] >= _SEVERITY_RANK[self.stop_on] for a in fired
        ):
            trainer.should_stop = True

    def _analyze(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Any
    ) -> tuple[CurvatureReport, bool]:
        loss_fn = self.loss_fn if self.loss_fn is not None else training_step_loss
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise RuntimeError(
                "With manual optimization the training_step does not return the loss alone: pass loss_fn=."
            )
        preconditioner = self._adam_preconditioner(trainer, pl_module) if self.preconditioned else None
        kwargs = dict(self._analyze_kwargs)
        if preconditioner is not None and not kwargs["full"]:
            preconditioner = None
        # Under DDP every process measures its own curvature batches; summing the products across processes
        # gives the curvature of the union, identical on every process.
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        report = analyze(
            pl_module,
            loss_fn,
            data,
            init=self._last_report,
            preconditioner=preconditioner,
            reduce=reduce,
            **kwargs,
        )
        return report, preconditioner is not None

    @staticmethod
    def _optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer | None:
        return trainer.optimizers[0] if trainer.optimizers else None

    def _adam_preconditioner(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, Tensor] | None:
        """Adam's diagonal preconditioner per parameter, or ``None`` for other optimisers or before step 1."""
        optimizer = self._optimizer(trainer)
        if optimizer is None:
            return None
        diagonals = {}
        for group in optimizer.param_groups:
            if "betas" not in group:
                return None
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "exp_avg_sq" not in state or float(state["step"]) < 1:
                    continue
                diagonals[id(p)] = adam_preconditioner(
                    state["exp_avg_sq"], state["step"], beta1, beta2, group["eps"]
                )
        named = {n: diagonals.get(id(p)) for n, p in pl_module.named_parameters() if p.requires_grad}
        if not named or any(d is None for d in named.values()):
            return None
        return named  # type: ignore[return-value]

    def _stability(
        self, trainer: pl.Trainer, report: CurvatureReport, preconditioned: bool
    ) -> dict[str, float]:
        """The stability thresholds of the live optimiser, and the sharpness ratios against them."""
        optimizer = self._optimizer(trainer)
        if optimizer is None or report.full is None or report.full.top_eigenvalue is None:
            return {}
        group = optimizer.param_groups[0]
        lr = float(group["lr"])
        if lr <= 0 or not math.isfinite(lr):
            return {}
        sharpness = report.full.top_eigenvalue
        out = {
            tags.LEARNING_RATE: lr,
            tags.SHARPNESS: sharpness,
            tags.THRESHOLD: sgd_threshold(lr),
            tags.SHARPNESS_RATIO: sharpness / sgd_threshold(lr),
        }
        if preconditioned and report.full.preconditioned_top is not None:
            threshold = adam_threshold(lr, group["betas"][0])
            out[tags.PRECONDITIONED_SHARPNESS] = report.full.preconditioned_top
            out[tags.PRECONDITIONED_THRESHOLD] = threshold
            out[tags.PRECONDITIONED_RATIO] = report.full.preconditioned_top / threshold
        return out

    # --- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": [_to_cpu(b) for b in self._batches],
            "last_step": self._last_step,
            "last_pass_step": self._last_pass_step,
            "passes": self.passes,
            "skipped": self.skipped,
            "pass_seconds": self._pass_seconds,
            "train_seconds": (
                time.perf_counter() - self._train_start
                if self._train_start is not None
                else self._train_seconds
            ),
            "alerts": self.alerts.state_dict(),
            "dashboard": self.dashboard.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches = list(state_dict.get("batches", []))
        self._last_step = state_dict.get("last_step", -1)
        self._last_pass_step = state_dict.get("last_pass_step", -1)
        self.passes = state_dict.get("passes", 0)
        self.skipped = state_dict.get("skipped", 0)
        self._pass_seconds = state_dict.get("pass_seconds", 0.0)
        self._train_seconds = state_dict.get("train_seconds", 0.0)
        if "alerts" in state_dict:
            self.alerts.load_state_dict(state_dict["alerts"])
        if "dashboard" in state_dict:
            self.dashboard.load_state_dict(state_dict["dashboard"])
