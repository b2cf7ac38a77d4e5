"""``HessianTrainerCallback``: the curvature tiers in a Hugging Face ``transformers.Trainer``.

A thin adapter of :class:`~lightning_hessian.CurvatureTracker` to the ``Trainer``'s callback events (the
tiers, their maths and the time budget are described there and in ``FORMULAS.md``)::

    from lightning_hessian.huggingface import HessianTrainerCallback

    batch = collator([train_dataset[i] for i in range(8)])     # the curvature batch, fixed for the run
    trainer = Trainer(model, args, train_dataset=train_dataset, data_collator=collator,
                      callbacks=[HessianTrainerCallback(batch)])

The events used, in the order ``Trainer`` calls them once per optimiser step (after the last micro-batch
when gradients are accumulated):

* ``on_pre_optimizer_step`` (after backward and clipping): the tracker plans and, if the update will be
  measured, copies the weights;
* ``on_optimizer_step`` (right after ``optimizer.step()``, before the learning-rate scheduler steps and the
  gradients are zeroed): the tiers due are measured, so the update is divided by the learning rate it was
  taken with. The measurement works on detached copies of the weights and restores ``.grad``, buffers,
  train/eval flags and RNG streams (:func:`~lightning_hessian._context.curvature_context`);
* ``on_step_end`` (``state.global_step`` now counts this step): the scalars are recorded at that step, the
  step the ``Trainer`` logs its loss at.

``transformers`` is an optional dependency: this module is not imported by ``lightning_hessian``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.tracker import DEFAULT_SHARES, TIERS, CurvatureTracker, Measurement

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "lightning_hessian.huggingface needs Hugging Face transformers: pip install transformers "
        "(and accelerate, which transformers.Trainer needs)."
    ) from error

__all__ = ["HessianTrainerCallback", "causal_lm_loss"]


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The default loss: the model's own, ``model(**batch).loss`` (a batch with ``labels``)."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError(
            "model(**batch).loss is None: the curvature batch has no 'labels'. Build it with the data "
            "collator that makes the training batches, or pass loss_fn=lambda model, batch: ... returning a "
            "scalar loss."
        )
    return loss


class HessianTrainerCallback(TrainerCallback):
    """Measures curvature tiers within a time budget while a ``transformers.Trainer`` trains.

    Args:
        batch: the curvature batch, measured at every point so that curves follow the model, not the data:
            a dict as the data collator makes it, e.g. ``collator([dataset[i] for i in range(8)])``, or a
            :class:`~lightning_hessian.Batches` of several. It is required rather than read from the training
            dataloader because drawing from that dataloader advances its sampler's and workers' random
            streams: the training batches, hence the run, would differ from a run without the callback.
            Tensors are moved to the model's device once, at the first measurement.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default :func:`causal_lm_loss`
            (``model(**batch).loss``).
        budget: the fraction of training time the measurements may take together (0.05: 5%).
        tiers: the tiers to run, of ``("update", "model", "blocks")`` (see
            :class:`~lightning_hessian.CurvatureTracker`); each keeps its default share of the budget.
        logdir: a TensorBoard directory for the scalars. Default, when ``"tensorboard"`` is in
            ``args.report_to``: ``$TENSORBOARD_LOGGING_DIR`` if set (the Trainer's own run), else
            ``output_dir/runs/<date>_<host>_curvature``, next to the Trainer's
            ``output_dir/runs/<date>_<host>`` (``tensorboard --logdir output_dir/runs`` shows both).
            Otherwise nothing is written (``history`` still holds every measurement).
        analysis: keyword arguments of :func:`~lightning_hessian.analyze` for the ``"blocks"`` tier.
        preconditioned, model_max_iter, trace_probes: as in :class:`~lightning_hessian.CurvatureTracker`.
        on_measurement: called with each :class:`~lightning_hessian.tracker.Measurement` (its ``step`` is
            ``state.global_step``), e.g. to forward the scalars to another logger.

    Attributes:
        tracker: the :class:`~lightning_hessian.CurvatureTracker`. history: ``(global_step, scalars)`` per
        measurement, scalars keyed by the tags of :mod:`lightning_hessian.tags`.

    The scalars are not added to ``state.log_history`` nor passed to the ``Trainer``'s other loggers:
    ``Trainer.log`` appends to ``log_history`` and calls the integrations (TensorBoard, W&B, ...) before a
    user callback's ``on_log`` sees the logs, and asking the ``Trainer`` to log at a measured step would move
    its loss averaging windows. Forward ``history`` or use ``on_measurement`` for other loggers.

    One process only: with ``args.world_size > 1`` (DDP, FSDP, DeepSpeed) training stops with an error at
    ``on_train_begin``; multi-process runs are not supported yet.
    """

    def __init__(
        self,
        batch: Any,
        *,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        budget: float = 0.05,
        tiers: Sequence[str] = TIERS,
        logdir: str | None = None,
        analysis: Mapping[str, Any] | None = None,
        preconditioned: bool = True,
        model_max_iter: int = 8,
        trace_probes: int = 4,
        on_measurement: Callable[[Measurement], None] | None = None,
    ) -> None:
        if batch is None:
            raise ValueError(
                "HessianTrainerCallback needs a curvature batch, "
                "e.g. collator([dataset[i] for i in range(8)])."
            )
        if isinstance(tiers, str):
            tiers = (tiers,)
        unknown = [t for t in tiers if t not in TIERS]
        if unknown or not tiers:
            raise ValueError(f"tiers: {list(tiers)!r}; choose one or more of {TIERS}.")
        self.batch = batch
        self.loss_fn = loss_fn or causal_lm_loss
        self.logdir = logdir
        self.on_measurement = on_measurement
        self.tracker = CurvatureTracker(
            budget=budget,
            shares={t: DEFAULT_SHARES[t] for t in tiers},
            analysis=analysis,
            preconditioned=preconditioned,
            model_max_iter=model_max_iter,
            trace_probes=trace_probes,
        )
        self.history: list[tuple[int, dict[str, float]]] = []
        self._found: Measurement | None = None
        self._device_batch: Any = None
        self._writer: Any = None
        self.writer_dir: str | None = None  # where the scalars go (set when training begins)

    # --- Trainer events ------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size > 1:
            raise RuntimeError(
                f"HessianTrainerCallback runs in a single process; this run has {args.world_size} "
                "(DDP / FSDP / DeepSpeed are not supported). Train on one device, or measure a "
                "checkpoint afterwards with lightning_hessian.analyze."
            )
        if self._writer is not None or not state.is_world_process_zero:
            return
        logdir = self.logdir
        if logdir is None and "tensorboard" in (args.report_to or []):
            logdir = _tensorboard_dir(args)
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer_dir = str(logdir)
            self._writer = SummaryWriter(self.writer_dir)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.tracker.before_step(_model(kwargs))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = _model(kwargs)
        if self._device_batch is None:
            self._device_batch = _to_device(self.batch, next(model.parameters()).device)
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        self._found = self.tracker.after_step(model, self.loss_fn, self._device_batch, optimizer)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        found, self._found = self._found, None
        if found is None:
            return
        found.step = state.global_step
        self.history.append((state.global_step, dict(found.scalars)))
        if self._writer is not None:
            for tag, value in found.scalars.items():
                if math.isfinite(value):
                    self._writer.add_scalar(tag, value, state.global_step)
            self._writer.flush()
        if self.on_measurement is not None:
            self.on_measurement(found)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _model(kwargs: Mapping[str, Any]) -> nn.Module:
    model = kwargs.get("model")
    if model is None:
        raise RuntimeError("the Trainer passed no model to the callback event (transformers >= 5 passes it).")
    return model


def _tensorboard_dir(args: TrainingArguments) -> str:
    """Next to the Trainer's own TensorBoard run: ``$TENSORBOARD_LOGGING_DIR`` (the Trainer's run itself)
    if set, else ``output_dir/runs/<date>_<host>_curvature`` (the Trainer's is
    ``output_dir/runs/<date>_<host>``; a callback cannot read its exact name)."""
    shared = os.getenv("TENSORBOARD_LOGGING_DIR")
    if shared:
        return os.path.expanduser(shared)
    from transformers.integrations.integration_utils import default_logdir  # what TensorBoardCallback uses

    return os.path.join(args.output_dir, default_logdir() + "_curvature")


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimiser inside accelerate's ``AcceleratedOptimizer`` (its state holds Adam's moments)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (dicts, lists and tuples walked; their types kept)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
