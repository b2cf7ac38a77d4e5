"""Calling ``loss_fn(model, batch)`` on the operators' own tensors, and checking what it returns.

``loss_fn`` is the user's code: what it returns is validated once per batch (a finite scalar with a graph,
or ``(loss, output)`` for the Gauss-Newton split), and a device or dtype mismatch inside it is reported with
what to do instead of PyTorch's bare message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian.errors import REENTRANT_MESSAGE, NonFiniteLossError, ReentrantCheckpointError

__all__ = ["LossCall", "LossFn", "call_loss", "check_loss", "split_loss"]

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, Tensor]"]

_DEVICE_ERRORS = re.compile(
    r"same device|expected device|device type|on the expected device|must be on|on a different device", re.I
)
_DTYPE_ERRORS = re.compile(r"same dtype|expected scalar type|expected .*dtype|found dtype", re.I)
# Convolutions say "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)": either one.
_EITHER_ERRORS = re.compile(r"Input type .* and (weight|bias) type", re.I)
_REENTRANT_ERROR = "Checkpointing is not compatible with .grad()"


class LossCall(nn.Module):
    """Calls ``loss_fn(model, batch)``; a module so that ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def call_loss(
    call: LossCall,
    tensors: Mapping[str, Tensor],
    batch: Any,
    index: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Any:
    """``loss_fn`` on batch ``index`` with ``tensors`` (``"model.<name>"``) in place of the model's own.

    Raises:
        ReentrantCheckpointError: the model checkpoints with ``use_reentrant=True``.
        RuntimeError: a device or dtype mismatch, with what to do (other errors propagate unchanged).
    """
    try:
        return functional_call(call, dict(tensors), (batch,))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        message = str(error)
        if _REENTRANT_ERROR in message:
            raise ReentrantCheckpointError(REENTRANT_MESSAGE) from error
        if _EITHER_ERRORS.search(message):
            kind = "device or dtype"
        elif _DEVICE_ERRORS.search(message):
            kind = "device"
        elif _DTYPE_ERRORS.search(message):
            kind = "dtype"
        else:
            raise
        raise RuntimeError(
            f"loss_fn failed on batch {index} with a {kind} mismatch: {message.strip()} The curvature "
            f"is computed on {device} in {dtype}: the batch's tensors are moved there (and "
            "floating ones cast) when they sit in tuples, lists, dicts, other Mappings or dataclasses, "
            "but tensors held by other objects are passed as they are. Pass the batch in such a "
            "container, or move and cast it inside loss_fn (e.g. x.to(next(model.parameters()))); "
            "tensors created inside the model should follow its inputs (torch.zeros(..., "
            "device=x.device, dtype=x.dtype))."
        ) from error


def split_loss(value: Any) -> tuple[Tensor, Any]:
    """``(loss, output)`` from an already checked ``loss_fn`` result (``output`` ``None`` if not returned)."""
    if isinstance(value, tuple | list) and len(value) == 2:
        return value[0].reshape(()), value[1]
    return value.reshape(()), None


def check_loss(value: Any, index: int, need_output: bool) -> tuple[Tensor, Tensor | None]:
    """Validate what ``loss_fn`` returned and split it into ``(loss, output)``."""
    output = None
    if isinstance(value, tuple | list) and len(value) == 2:
        value, output = value
    elif need_output:
        raise TypeError(
            "The Gauss-Newton / functional split needs the model output: make loss_fn return "
            "(loss, output), where output is the tensor the loss is computed from (e.g. the logits)."
        )
    if not isinstance(value, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor (or a pair (loss, output)); got {type(value).__name__}."
        )
    if value.numel() != 1:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(value.shape)} on batch {index}; the curvature is "
            "defined for a scalar loss: reduce it (e.g. .mean()) inside loss_fn."
        )
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"loss_fn returned {value.item()} on batch {index}; the curvature of a non-finite loss is "
            "undefined. Check the batch and the model, or analyse another batch."
        )
    if not value.requires_grad:
        raise ValueError(
            "The loss does not depend on the parameters being analysed (it has no grad_fn). Make sure "
            "loss_fn computes the loss from model(...) without .detach(), torch.no_grad() or .item(), and "
            "that the analysed parameters are trainable."
        )
    if need_output and (not isinstance(output, Tensor) or not output.requires_grad):
        raise TypeError(
            "The second element returned by loss_fn must be the model output tensor the loss is computed "
            "from (with a grad_fn)."
        )
    return value.reshape(()), output
