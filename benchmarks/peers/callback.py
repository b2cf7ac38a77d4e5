"""Task 7: the training-time overhead of ``HessianMonitor(every_n_steps=100)`` at its defaults.

The reference model trains ``steps`` AdamW steps under Lightning, once without the callback and once
with it (after a warm-up fit); the overhead is the difference over the plain time. Optionally a profile
of one pass's analysis: every block and the whole model, then the whole model alone.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from _models import SPECS, Classifier, loss_fn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import lightning_hessian
from lightning_hessian import analyze

from . import common

DEFAULTS = ("top_k", "smallest", "trace", "density", "tol")  # the callback's settings the results quote


@dataclass
class PassProfile:
    """One pass's analysis at the callback's settings: all blocks and the model, then the model alone."""

    all_blocks_seconds: float
    all_blocks_products: int
    whole_seconds: float
    whole_products: int


@dataclass
class CallbackResult:
    """Seconds of ``steps`` training steps without and with the callback, and its passes."""

    steps: int
    plain: float
    monitored: float
    passes: int
    pass_seconds: float  # the callback's own timer, summed over its passes (NaN if it has none)
    defaults: dict[str, Any]  # DEFAULTS -> the callback's values
    profile: PassProfile | None = None


def measure_callback(steps: int, breakdown: bool) -> CallbackResult | None:
    """Task 7 (``None`` if this version has no ``HessianMonitor``); ``breakdown``: also profile one pass."""
    if not hasattr(lightning_hessian, "HessianMonitor"):
        return None
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit([], 10, logdir)  # warm-up
        plain = _fit([], steps, logdir)
        monitor = lightning_hessian.HessianMonitor(every_n_steps=100)
        monitored = _fit([monitor], steps, logdir)
    settings = {k: v for k, v in monitor.settings.kwargs().items() if k != "rules"}
    pass_seconds = getattr(monitor, "_pass_seconds", math.nan)
    result = CallbackResult(
        steps, plain, monitored, monitor.passes, pass_seconds, {k: settings[k] for k in DEFAULTS}
    )
    if breakdown:
        model, batch = common.build(SPECS["reference"])
        with sdpa_kernel(SDPBackend.MATH):
            all_blocks, report = common.timed(lambda: analyze(model, loss_fn, batch, **settings))
            whole, lean = common.timed(lambda: analyze(model, loss_fn, batch, **{**settings, "blocks": None}))
        result.profile = PassProfile(all_blocks, report.matvecs, whole, lean.matvecs)
    return result


def _fit(callbacks: list, max_steps: int, logdir: str) -> float:
    """Seconds of ``trainer.fit`` on the reference model, 64 batches of random tokens, seed 0."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    spec = SPECS["reference"]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = Classifier(spec.d, spec.heads, spec.layers, spec.vocab, spec.classes, spec.ffn)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.model(tokens)

        def training_step(self, batch: Any, index: int) -> Tensor:
            loss = loss_fn(self.model, batch)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, spec.vocab, (64 * spec.batch, spec.seq), generator=gen),
        torch.randint(0, spec.classes, (64 * spec.batch,), generator=gen),
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="gpu" if common.on_cuda() else "cpu",
        devices=1,
        logger=TensorBoardLogger(logdir),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    loader = DataLoader(data, batch_size=spec.batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    return common.timed(lambda: trainer.fit(Module(), loader))[0]
