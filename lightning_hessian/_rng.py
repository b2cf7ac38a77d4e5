"""Random number streams: saved, put back, and kept apart from the user's.

A curvature pass draws random vectors and may run dropout; neither may move the streams training reads. Our
own isolation (not Lightning's ``isolate_rng``), so that ``analyze`` needs torch and numpy only.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["DeviceRngState", "device_rng_state", "isolated_rng", "set_device_rng_state"]

DeviceRngState = tuple[Tensor, Tensor | None]


def device_rng_state(device: torch.device) -> DeviceRngState:
    """The CPU generator's state and, for a CUDA ``device``, that device's (what dropout reads)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_device_rng_state(state: DeviceRngState, device: torch.device) -> None:
    """Put back a state from :func:`device_rng_state`: the next forward draws the same dropout masks."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore torch's CPU and every CUDA device's generator, numpy's and python's on exit, even on errors."""
    states = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        np.random.get_state(),  # noqa: NPY002 - the legacy global stream is what user code reads
        random.getstate(),
    )
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])
        np.random.set_state(states[2])  # noqa: NPY002
        random.setstate(states[3])
