"""The environment a curvature pass runs in, and the promise that it leaves the model as it found it.

A curvature pass needs second derivatives, so it must run with gradients on, outside inference mode, with
autocast off and with the scaled-dot-product-attention math kernel (the fused flash / memory-efficient /
CPU-flash kernels have no double backward). It must also never disturb training: no change to weights,
``.grad``, buffers, random number streams or train/eval flags. The operators achieve the first three by
working on detached copies of the parameters and buffers (``torch.func.functional_call``); this module
restores the rest.

Two kinds of model code cannot be differentiated twice and are dealt with here: ``torch.compile``d
modules run eagerly during a pass (``torch.compiler.set_stance("force_eager")``; compiled graphs have no
double backward), and reentrant activation checkpointing (``checkpoint(..., use_reentrant=True)``) is
refused with :class:`ReentrantCheckpointError` (it has no double backward either, and when its inputs do
not require grad it silently drops the parameters inside it from the graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian._rng import isolated_rng
from lightning_hessian.errors import REENTRANT_MESSAGE, ReentrantCheckpointError

MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def _refuse_reentrant_checkpoint() -> Iterator[None]:
    """Make reentrant ``checkpoint`` calls raise :class:`ReentrantCheckpointError` inside the context.

    ``checkpoint(use_reentrant=True)`` looks up ``torch.utils.checkpoint.CheckpointFunction`` at call time;
    it is swapped for a subclass that refuses to run, and put back on exit.
    """
    module = torch.utils.checkpoint
    original = getattr(module, "CheckpointFunction", None)
    if original is None:  # a torch without it: the double-backward error is translated instead
        yield
        return

    class _Refused(original):  # type: ignore[misc, valid-type]
        @staticmethod
        def forward(ctx, *args):  # type: ignore[no-untyped-def]
            raise ReentrantCheckpointError(REENTRANT_MESSAGE)

    module.CheckpointFunction = _Refused
    try:
        yield
    finally:
        module.CheckpointFunction = original


@contextlib.contextmanager
def curvature_context(model: nn.Module, mode: str = "eval", exact: bool = True) -> Iterator[None]:
    """Run a curvature pass on ``model`` and restore everything it could have changed.

    Args:
        model: the model whose curvature is measured.
        mode: ``"eval"`` (default) puts every module in eval mode so dropout is off and normalisation layers
            use their running statistics: the curvature is that of a deterministic function. ``"train"``
            measures the training-mode function (one fixed dropout draw per pass), ``"keep"`` leaves the
            flags as they are. The original flags of every submodule are restored afterwards.
        exact: whether the pass takes exact (double-backward) products. ``False`` (finite-difference
            products, :mod:`lightning_hessian.finite_difference`) leaves the attention kernel choice and
            compiled code alone: the model runs with its own kernels and graphs.

    Inside the context: gradients enabled, inference mode off, autocast off on CPU and CUDA, the math
    attention kernel selected and ``torch.compile``d code run eagerly (with ``exact=True``), reentrant
    activation checkpointing refused (:class:`ReentrantCheckpointError`), and the random number generators
    (torch, CUDA, numpy, python) isolated so that random draws inside the pass leave the user's streams.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flags = [(module, module.training) for module in model.modules()]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(isolated_rng())
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            if exact:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            stack.enter_context(_refuse_reentrant_checkpoint())
            if mode != "keep":
                model.train(mode == "train")
            yield
    finally:
        for module, training in flags:
            module.training = training
