"""Helpers for tests that run several processes on CPU with gloo (DDP, FSDP2)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on localhost, for ``MASTER_PORT``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The ``reduce`` of ``analyze``: the sum of ``tensor`` over all processes, on each of them."""
    dist.all_reduce(tensor)
    return tensor
