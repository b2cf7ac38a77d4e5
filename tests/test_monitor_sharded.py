"""The monitor on FSDP2 (2 CPU gloo processes): finite-difference curvature equal to exact on the union.

Two runs: Lightning's ``ModelParallelStrategy`` with ``HessianMonitor`` (full passes), and a plain
``fully_shard`` loop with ``CurvatureTracker`` (every budget tier). Each is compared with the same
measurement made in one process, with exact products, on the union of both processes' curvature data.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import loss_fn, make_batch, make_model
from _processes import free_port, sum_over_processes
from torch import nn
from torch.utils.data import DataLoader

from lightning_hessian import Batches, CurvatureTracker, HessianMonitor, analyze, tags
from lightning_hessian.optimizers import adam_preconditioners
from lightning_hessian.sharded import full_tensors

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]

SIZES = (2, 3)  # curvature samples per process: the union's mean must weight them
BLOCKS = ["model.transformer.h.0.attn.k", "model.transformer.h.1.ln_2"]
PASS = dict(blocks=BLOCKS, full=True, trace=False, tol=1e-8, max_iter=40)  # converged: compare values
LR = 3e-3


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _curvature_batch(rank: int):
    return make_batch("nanogpt", SIZES[rank], torch.float64, seed=10 + rank)


def _training_batch(rank: int, step: int = 0):
    return make_batch("nanogpt", 4, torch.float64, seed=100 * step + rank)


class Wrapped(L.LightningModule):
    """nanoGPT (float64) as ``self.model``, sharded by FSDP2 in ``configure_model`` under the strategy."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_model("nanogpt", torch.float64)

    def configure_model(self) -> None:
        _shard(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return loss_fn(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader([_training_batch(self.global_rank)], batch_size=None)


def _shard(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.transformer.h:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def wrapped_loss(module: nn.Module, batch):
    return loss_fn(module.model, batch)


def _gathered_state(module: nn.Module, optimizer) -> dict:
    """The full weights and Adam's preconditioner (a collective call on every process)."""
    preconditioner, _ = adam_preconditioners(optimizer, module)
    weights = full_tensors({n: p.detach() for n, p in module.named_parameters()})
    return {"weights": weights, "preconditioner": full_tensors(preconditioner)}


def _lightning_worker(rank: int, port: int, out: str) -> None:
    """One process of a ``ModelParallelStrategy`` run launched from outside, as torchrun would."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        monitor = HessianMonitor(
            every_n_steps=1,
            products="auto",
            loss_fn=wrapped_loss,
            data=[_curvature_batch(rank)],
            figures=False,
            theory=False,
            html_report=False,
            on_error="raise",
            **PASS,
        )
        module = Wrapped()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = L.Trainer(
                max_steps=1,
                strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                accelerator="cpu",
                devices=2,
                logger=False,
                callbacks=[monitor],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                use_distributed_sampler=False,
            )
            trainer.fit(module)
        state = _gathered_state(module, trainer.optimizers[0])
        report = monitor._last_report
        if rank == 0:
            torch.save(state, Path(out, "state.pt"))
        result = {
            "steps": [r.step for r in monitor.history],
            "report": report.to_dict(),
            "announced": [str(w.message) for w in caught if 'products="auto"' in str(w.message)],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _reference(state: dict) -> tuple[nn.Module, Batches]:
    """The gathered model in one process, and the union of both processes' curvature batches."""
    module = Wrapped()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(state["weights"][name])
    return module, Batches([_curvature_batch(rank) for rank in range(2)])


@pytest.mark.skipif(not _has_fsdp2(), reason="this PyTorch has no FSDP2 fully_shard")
def test_model_parallel_strategy_monitor_measures_the_union_with_finite_differences(tmp_path):
    mp.start_processes(_lightning_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["steps"] == second["steps"] == [1]
    # "auto" took finite differences because of the strategy, said once and on rank 0 only.
    assert len(first["announced"]) == 1 and "ModelParallelStrategy" in first["announced"][0]
    assert second["announced"] == []
    got = first["report"]
    assert got["settings"]["products"] == "finite_difference"
    assert "ModelParallelStrategy" in got["settings"]["products_reason"]
    assert {b["products"] for b in [*got["blocks"].values(), got["full"]]} == {"finite_difference"}
    assert second["report"]["full"]["top_eigenvalues"] == got["full"]["top_eigenvalues"]

    state = torch.load(tmp_path / "state.pt")
    module, union = _reference(state)
    exact = analyze(module, wrapped_loss, union, preconditioner=state["preconditioner"], **PASS).to_dict()
    assert exact["settings"]["products"] == "exact"
    assert got["loss"] == pytest.approx(exact["loss"], rel=1e-12)
    for name in [*BLOCKS, "full"]:
        a = got["full"] if name == "full" else got["blocks"][name]
        b = exact["full"] if name == "full" else exact["blocks"][name]
        scale = max(abs(b["top_eigenvalues"][0]), abs(b["min_eigenvalue"]))
        # float64 finite differences: within 1e-6 of the exact pass (README "Large models")
        assert a["top_eigenvalues"][0] == pytest.approx(b["top_eigenvalues"][0], abs=1e-6 * scale), name
        assert a["min_eigenvalue"] == pytest.approx(b["min_eigenvalue"], abs=1e-6 * scale), name
    assert got["full"]["preconditioned_top"] == pytest.approx(exact["full"]["preconditioned_top"], rel=1e-6)


TIERS = ["update", "model", "blocks"]
TRACKED = dict(blocks=BLOCKS[:1], trace=False, tol=1e-3)


def _step(model: nn.Module, optimizer, tracker: CurvatureTracker, losses) -> None:
    """One AdamW step on the mean of ``losses`` (FSDP2 averages the processes' gradients the same way)."""
    (sum(losses) / len(losses)).backward()
    tracker.snapshot(model)
    optimizer.step()
    optimizer.zero_grad()


def _tracker_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        module = Wrapped()
        _shard(module.model, init_device_mesh("cpu", (2,)))
        optimizer = torch.optim.AdamW(module.parameters(), lr=LR)
        tracker = CurvatureTracker(analysis={**TRACKED, "products": "auto"})
        notes = []
        tracker._note = notes.append
        _step(module, optimizer, tracker, [wrapped_loss(module, _training_batch(rank))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "auto" announcement (tested with the monitor)
            found = tracker.measure(
                TIERS, module, wrapped_loss, _curvature_batch(rank), 1, optimizer, reduce=sum_over_processes
            )
        state = _gathered_state(module, optimizer)
        if rank == 0:
            torch.save(state, Path(out, "state.pt"))
        result = {
            "scalars": found.scalars,
            "products": [tracker.latest.full.products, tracker.latest.settings["products"]],
            "notes": notes,
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not _has_fsdp2(), reason="this PyTorch has no FSDP2 fully_shard")
def test_tracker_tiers_on_fully_shard_equal_exact_products_on_the_union(tmp_path):
    mp.start_processes(_tracker_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["products"] == ["finite_difference", "finite_difference"]
    timing = {tags.MONITOR_SECONDS, tags.MONITOR_OVERHEAD}
    assert {t: v for t, v in first["scalars"].items() if t not in timing} == {
        t: v for t, v in second["scalars"].items() if t not in timing
    }

    # One process: the same AdamW step on the mean of both processes' losses, exact products on the union.
    module = Wrapped()
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR)
    tracker = CurvatureTracker(analysis={**TRACKED, "products": "exact"})
    _step(module, optimizer, tracker, [wrapped_loss(module, _training_batch(rank)) for rank in range(2)])
    state = torch.load(tmp_path / "state.pt")
    for name, p in module.named_parameters():  # the same step, to rounding
        assert torch.allclose(p, state["weights"][name], rtol=0, atol=1e-12), name
    _, union = _reference(state)
    exact = tracker.measure(TIERS, module, wrapped_loss, union, 1, optimizer).scalars
    assert tracker.latest.full.products == "exact"

    # The preconditioned gradient curvature needs the whole gradient: left out on sharded parameters, said.
    left_out = {tags.PRECONDITIONED_GRADIENT_CURVATURE, tags.PRECONDITIONED_GRADIENT_RATIO}
    assert set(exact) - set(first["scalars"]) == left_out
    assert any("preconditioned curvature along the gradient" in n for n in first["notes"])
    compared = sorted(set(exact) - left_out - timing)
    assert {tags.UPDATE_CURVATURE, tags.SHARPNESS, tags.PRECONDITIONED_SHARPNESS} <= set(compared)
    assert any(t.startswith("curvature/model.transformer.h.0.attn.k/") for t in compared)
    for tag in compared:
        assert first["scalars"][tag] == pytest.approx(exact[tag], rel=1e-5, abs=1e-8), tag
