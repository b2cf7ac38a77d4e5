"""What every task shares: the run's device, timers that see the GPU, and the gradient unit of time."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _models import ModelSpec, loss_fn
from torch import Tensor, nn

from lightning_hessian import Block, BlockPart

DEVICE = torch.device("cpu")  # set by --device (``set_device``); every model, batch and vector lives there


def set_device(device: torch.device) -> None:
    """Makes ``device`` the run's device: read at every call, so set it before measuring."""
    global DEVICE
    DEVICE = device


def on_cuda() -> bool:
    """Whether the run is on a GPU (PyHessian's ``cuda`` flag)."""
    return DEVICE.type == "cuda"


def synchronize() -> None:
    """Waits for the GPU's queued work, so that wall-clock timers measure it (no-op on the CPU)."""
    if on_cuda():
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``, the GPU synchronised before the clock starts and before it stops."""
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return time.perf_counter() - start, out


def build(spec: ModelSpec) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """``spec.build()`` on the run's device."""
    model, (tokens, labels) = spec.build()
    return model.to(DEVICE), (tokens.to(DEVICE), labels.to(DEVICE))


def relative(value: float, reference: float) -> float:
    """``|value - reference| / |reference|``."""
    return abs(value - reference) / abs(reference)


def max_error(values: dict[str, float], reference: dict[str, float]) -> float:
    """The worst relative error over the keys of ``reference``."""
    return max(relative(values[k], reference[k]) for k in reference)


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy in eval mode: the references never touch the measured model."""
    return copy.deepcopy(model).double().eval()


def params_of(model: nn.Module) -> list[str]:
    """The names of the model's parameter tensors, in order."""
    return [n for n, _ in model.named_parameters()]


def per_tensor_blocks(model: nn.Module, names: Sequence[str] | None = None) -> list[Block]:
    """One block per parameter tensor: the granularity of the peers' per-block operators."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    return [Block(n, "other", None, params[n].numel(), (BlockPart(n),)) for n in names]


class GradientUnit:
    """One gradient of the loss on the same model and batch: the unit of every time in a section.

    Sampled between measurements (``sample``) and reported as the median, so that it drifts with them.
    """

    def __init__(self, model: nn.Module, batch: Any) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.batch, self.times = model, batch, []

    def sample(self, n: int = 3) -> None:
        """Times ``n`` more gradients."""
        for _ in range(n):
            self.times.append(
                timed(lambda: torch.autograd.grad(loss_fn(self.model, self.batch), self.params))[0]
            )

    @property
    def seconds(self) -> float:
        """The median gradient time (five samples first if none was taken)."""
        if not self.times:
            self.sample(5)
        return statistics.median(self.times)
