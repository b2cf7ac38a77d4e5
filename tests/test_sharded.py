"""FSDP2 (``fully_shard``) on 2 CPU gloo processes: shard-local finite-difference curvature of the union."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import loss_fn, make_batch, make_model
from _processes import free_port, sum_over_processes

from lightning_hessian import Batches, CurvatureOperator, analyze, find_blocks
from lightning_hessian._context import curvature_context
from lightning_hessian.blocks import model_block
from lightning_hessian.sharded import ShardedOperator

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]

SIZES = (2, 3)  # different batch sizes per process: the union's mean must weight them
SETTINGS = dict(full=True, smallest=True, trace=False, tol=1e-8, max_iter=25)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


def _blocks(model):
    found = find_blocks(model)
    return [*found[1:4], model_block(model)]


def _vectors(sizes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in sizes]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        model = make_model("nanogpt", torch.float64)
        blocks = _blocks(model)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.transformer.h:
            _fully_shard()(layer, mesh=mesh)
        _fully_shard()(model, mesh=mesh)
        before = [p.to_local().clone() for p in model.parameters()]
        batch = make_batch("nanogpt", SIZES[rank], torch.float64, seed=rank)
        with curvature_context(model, exact=False):
            op = ShardedOperator(model, loss_fn, batch, blocks, reduce=sum_over_processes)
            products = op.matmat(_vectors(op.sizes))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = analyze(
                model,
                loss_fn,
                batch,
                blocks=blocks[:1],
                products="auto",
                reduce=sum_over_processes,
                **SETTINGS,
            )
        try:
            analyze(model, loss_fn, batch, products="exact", reduce=sum_over_processes, **SETTINGS)
            refused = ""
        except ValueError as error:
            refused = str(error)
        unchanged = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
        result = {
            "products": [p.tolist() for p in products],
            "loss": op.loss,
            "report": report.to_dict(),
            "warnings": [str(w.message) for w in caught],
            "refused": refused,
            "unchanged": unchanged and all(p.grad is None for p in model.parameters()),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(_fully_shard() is None, reason="this PyTorch has no FSDP2 fully_shard")
def test_fsdp2_two_processes_equal_exact_curvature_of_the_union(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    model = make_model("nanogpt", torch.float64)
    blocks = _blocks(model)
    union = Batches([make_batch("nanogpt", n, torch.float64, seed=rank) for rank, n in enumerate(SIZES)])
    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, union, blocks)
        exact = op.matmat(_vectors(op.sizes))
    assert first["products"] == second["products"] and first["unchanged"] and second["unchanged"]
    assert first["loss"] == pytest.approx(op.loss, rel=1e-12)
    for got, expected in zip(first["products"], exact):
        error = (torch.tensor(got) - expected).norm() / expected.norm()
        assert error < 1e-7, error
    assert any("sharded DTensors" in w for w in first["warnings"])
    assert "sharded DTensors" in first["refused"] and "finite_difference" in second["refused"]
    single = analyze(model, loss_fn, union, blocks=blocks[:1], **SETTINGS).to_dict()
    distributed = first["report"]
    assert distributed["settings"]["products"] == "finite_difference"
    for name, expected in [*single["blocks"].items(), ("model", single["full"])]:
        got = distributed["blocks"].get(name) or distributed["full"]
        scale = max(abs(expected["top_eigenvalues"][0]), abs(expected["min_eigenvalue"]))
        assert got["top_eigenvalues"][0] == pytest.approx(expected["top_eigenvalues"][0], abs=1e-6 * scale)
        assert got["min_eigenvalue"] == pytest.approx(expected["min_eigenvalue"], abs=1e-6 * scale)
