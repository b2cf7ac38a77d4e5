"""Curvature over data split across processes (gloo, 2 CPU processes): equal to one process on the union."""

from __future__ import annotations

import json
import math
import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import loss_fn, make_batch, make_model
from _processes import free_port, sum_over_processes
from lightning.pytorch.strategies import DDPStrategy

from lightning_hessian import Batches, analyze
from lightning_hessian.operators import CurvatureOperator

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]

SETTINGS = dict(full=True, top_k=2, tol=1e-10, max_iter=300, density=True, density_steps=8, trace_matvecs=30)
SIZES = (2, 3)  # different batch sizes per process: the union's mean must weight them


def _worker(rank: int, world: int, port: int, out: str, fail_on: int, fail_product_on: int = -1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a process left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        model = make_model("encoder", torch.float64)
        batch = make_batch("encoder", SIZES[rank], torch.float64, seed=rank)
        fn = loss_fn
        if rank == fail_on:

            def fn(model, batch):
                raise RuntimeError("broken on this process")

        if rank == fail_product_on:  # out of memory in the middle of the products, at the 12th one
            product, calls = CurvatureOperator._product, [0]

            def failing(self, graph, block, columns):
                calls[0] += 1
                if calls[0] == 12:
                    raise torch.OutOfMemoryError("simulated out of memory at the 12th product call")
                return product(self, graph, block, columns)

            CurvatureOperator._product = failing

        try:
            report = analyze(model, fn, batch, reduce=sum_over_processes, **SETTINGS)
            result = {"report": report.to_dict()}
        except RuntimeError as error:
            result = {"error": str(error)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, fail_on: int = -1, fail_product_on: int = -1) -> list[dict]:
    mp.start_processes(
        _worker,
        args=(2, free_port(), str(tmp_path), fail_on, fail_product_on),
        nprocs=2,
        start_method="spawn",
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    first, second = _run(tmp_path)
    model = make_model("encoder", torch.float64)
    union = Batches([make_batch("encoder", n, torch.float64, seed=rank) for rank, n in enumerate(SIZES)])
    single = analyze(model, loss_fn, union, **SETTINGS).to_dict()

    # Every process ends with the same report (they run the estimators on identical, summed numbers).
    def numbers(report):  # everything but wall times
        return {name: {k: v for k, v in b.items() if k != "seconds"} for name, b in report["blocks"].items()}

    assert numbers(first["report"]) == numbers(second["report"])
    distributed = first["report"]
    assert distributed["loss"] == pytest.approx(single["loss"], rel=1e-12)
    for name, expected in [*single["blocks"].items(), ("model", single["full"])]:
        got = distributed["blocks"].get(name) or distributed["full"]
        scale = max(abs(v) for v in expected["top_eigenvalues"] + [expected["min_eigenvalue"]])
        for key in ("top_eigenvalues", "density_nodes"):
            assert torch.allclose(
                torch.tensor(got[key]), torch.tensor(expected[key]), rtol=0, atol=1e-8 * scale
            )
        assert got["min_eigenvalue"] == pytest.approx(expected["min_eigenvalue"], abs=1e-8 * scale)
        assert got["trace"] == pytest.approx(expected["trace"], rel=1e-8, abs=1e-10 * scale)


def test_an_error_on_one_process_is_raised_on_all_without_hanging(tmp_path):
    first, second = _run(tmp_path, fail_on=1)
    assert "another process" in first["error"]
    assert second["error"] == "broken on this process"


def test_an_error_in_the_middle_of_the_products_is_raised_on_all_without_hanging(tmp_path):
    first, second = _run(tmp_path, fail_product_on=1)
    assert "failed on another process in the middle of its products" in first["error"]
    assert second["error"] == "simulated out of memory at the 12th product call"


class _CleanDDPSpawn(DDPStrategy):
    """``ddp_spawn`` that destroys the gloo process group after a barrier when training ends.

    Lightning leaves the group to the interpreter's exit, where the processes tear down their gloo
    connections while the others may still be exiting; on a loaded 2-core CI machine this once aborted a
    process (SIGABRT). A script that ends its process group cleanly is what we test against.
    """

    def teardown(self) -> None:
        super().teardown()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


@pytest.fixture
def fresh_port(monkeypatch):
    """Lightning's launcher reuses an inherited MASTER_PORT: give every distributed test its own."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")


def _trainer(tmp_path: Path, monitor, max_steps: int, strategy):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    return L.Trainer(
        max_steps=max_steps,
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        logger=TensorBoardLogger(tmp_path, name="ddp"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def _events(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files  # only rank 0 writes
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_hessian_monitor_under_ddp_spawn(tmp_path, fresh_port):
    """Two gloo processes started by Lightning train with the callback: no hang, one event file, the
    stability scalars logged."""
    from _lightning import TinyTransformer

    from lightning_hessian import HessianMonitor, tags

    monitor = HessianMonitor(every_n_steps=2, density=False, figures=False)
    _trainer(tmp_path, monitor, 4, _CleanDDPSpawn(start_method="spawn")).fit(TinyTransformer())
    assert [e.step for e in _events(tmp_path).Scalars(tags.SHARPNESS_RATIO)] == [2, 4]


def _nan_on_rank_one(module, batch):
    """The curvature loss of TinyTransformer, NaN on process 1 only."""
    import torch.nn.functional as F

    loss = F.cross_entropy(module(batch[0]), batch[1])
    return loss * float("nan") if dist.get_rank() == 1 else loss


def _ddp_worker(rank: int, port: int, out: str, monitor, max_steps: int) -> None:
    """One process of a ``strategy="ddp"`` run launched from outside, as torchrun or SLURM would."""
    from _lightning import TinyTransformer

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        _trainer(Path(out), monitor, max_steps, "ddp").fit(TinyTransformer())
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _fit_ddp(tmp_path: Path, monitor, max_steps: int = 6):
    mp.start_processes(
        _ddp_worker, args=(free_port(), str(tmp_path), monitor, max_steps), nprocs=2, start_method="spawn"
    )
    return _events(tmp_path)


def test_an_alert_that_stops_training_stops_every_process(tmp_path):
    """stop_on: every process sees the same (summed) numbers, fires the same alert and stops at the same step,
    so none waits for the others in a collective call."""
    from lightning_hessian import HessianMonitor, tags
    from lightning_hessian.alerts import ThresholdRule

    rule = ThresholdRule("loss_positive", tags.PASS_LOSS, above=0.0, severity="critical")
    monitor = HessianMonitor(every_n_steps=2, figures=False, alerts=[rule], stop_on="critical")
    events = _fit_ddp(tmp_path, monitor)
    assert [e.step for e in events.Scalars(tags.PASS_LOSS)] == [2]  # stopped after the first pass
    assert [e.value for e in events.Scalars(tags.ALERT_COUNT)] == [1.0]


def test_a_nan_curvature_loss_on_one_process_skips_the_pass_on_all(tmp_path):
    from lightning_hessian import HessianMonitor, tags

    monitor = HessianMonitor(every_n_steps=2, figures=False, loss_fn=_nan_on_rank_one, theory=False)
    events = _fit_ddp(tmp_path, monitor, max_steps=4)
    losses = events.Scalars(tags.PASS_LOSS)
    assert [e.step for e in losses] == [2, 4] and all(math.isnan(e.value) for e in losses)
    assert tags.SHARPNESS_RATIO not in events.Tags()["scalars"]  # no pass completed, on any process


_LOSS_CALLS = [0]


def _out_of_memory_on_rank_one(module, batch):
    """TinyTransformer's loss; on process 1 its 12th call (with chunk_size, inside the products) runs out of
    memory."""
    import torch.nn.functional as F

    _LOSS_CALLS[0] += 1
    if dist.get_rank() == 1 and _LOSS_CALLS[0] == 12:
        raise torch.OutOfMemoryError("simulated out of memory in the 12th loss call")
    return F.cross_entropy(module(batch[0]), batch[1])


def _warning_worker(rank: int, port: int, out: str, monitor) -> None:
    """A ``strategy="ddp"`` process (short collective timeout) that records its warnings and final step."""
    from _lightning import TinyTransformer

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer = _trainer(Path(out), monitor, 2, DDPStrategy(timeout=timedelta(seconds=60)))
            trainer.fit(TinyTransformer())
        messages = [str(w.message) for w in record if "HessianMonitor" in str(w.message)]
        result = {"step": trainer.global_step, "warnings": messages}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def test_an_error_in_the_products_of_one_process_skips_the_pass_on_all_with_its_cause(tmp_path):
    """Every process abandons the pass at the same collective call and training goes on; rank 0 warns with
    the failing process's own error."""
    from lightning_hessian import HessianMonitor, tags

    monitor = HessianMonitor(
        every_n_steps=1, loss_fn=_out_of_memory_on_rank_one, chunk_size=2, figures=False, theory=False
    )
    mp.start_processes(
        _warning_worker, args=(free_port(), str(tmp_path), monitor), nprocs=2, start_method="spawn"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in ranks] == [2, 2]
    failed = [m for m in ranks[0]["warnings"] if "failed and was skipped" in m]
    assert len(failed) == 1
    assert "pass at step 1" in failed[0]
    assert "process 1: OutOfMemoryError: simulated out of memory in the 12th loss call" in failed[0]
    assert [e.step for e in _events(tmp_path).Scalars(tags.PASS_LOSS)] == [2]  # the next pass ran


def test_budget_mode_under_ddp_plans_on_rank_zero_and_never_hangs(tmp_path):
    """Budget mode: rank 0's plan is broadcast (each process's clock differs), every tier's collective
    calls line up, and the union's curvature is logged once."""
    from lightning_hessian import HessianMonitor, tags

    monitor = HessianMonitor(budget=0.9, figures=False, theory=False, html_report=False)
    events = _fit_ddp(tmp_path, monitor, max_steps=150)
    logged = set(events.Tags()["scalars"])
    assert {tags.UPDATE_CURVATURE, tags.SHARPNESS, tags.MONITOR_OVERHEAD} <= logged, logged
    assert any(t.endswith("/top_eigenvalue") and not t.startswith("curvature/model/") for t in logged)
