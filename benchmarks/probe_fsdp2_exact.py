"""Does exact double backward work under FSDP2 with resharding after forward turned off? (issue 13)

    python benchmarks/probe_fsdp2_exact.py

Two gloo CPU processes shard the tests' nanoGPT with ``fully_shard(..., reshard_after_forward=False)``,
gather the parameters (``model.unshard()``), take the loss gradient with ``create_graph=True`` and then one
Hessian-vector product by a second backward. Each stage is reported as it is reached, so a crash names the
stage it happened in. Measured with torch 2.13.0 (CPU): the first-order ``create_graph`` gradient works (no
parameter unused when the parameters are read after the forward; read before it, 24 of 28 are unused:
the forward registers other tensors), the second backward kills both processes with SIGSEGV. This is why
``products="exact"`` stays refused on FSDP2 models (``lightning_hessian.products``); finite differences
work there.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' model zoo
from _models import loss_fn, make_batch, make_model

faulthandler.enable()


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def say(stage: str) -> None:
        print(f"process {rank}: {stage}", flush=True)

    model = make_model("nanogpt", torch.float64)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.transformer.h:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.unshard()
    loss = loss_fn(model, make_batch("nanogpt", dtype=torch.float64, seed=rank))
    params = list(model.parameters())  # after the forward: the unsharded tensors it computed with
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    say(f"create_graph gradient: works, {sum(g is None for g in grads)} of {len(grads)} parameters unused")
    gen = torch.Generator().manual_seed(1)
    dot = sum((g * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum() for g, p in zip(grads, params))
    say("second backward (the Hessian-vector product): starting")
    torch.autograd.grad(dot, params, allow_unused=True)
    say("second backward: works")
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        mp.spawn(_worker, args=(29541,), nprocs=2)
    except Exception as error:  # a crashed process: say so, the stages above say where
        print(f"failed: {type(error).__name__}: {error}")
