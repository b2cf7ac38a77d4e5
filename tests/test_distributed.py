"""Curvature over data split across processes (gloo, 2 CPU processes): equal to one process on the union."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import loss_fn, make_batch, make_model

from lightning_hessian import Batches, analyze

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]

SETTINGS = dict(full=True, top_k=2, tol=1e-10, max_iter=300, density=True, density_steps=8, trace_matvecs=30)
SIZES = (2, 3)  # different batch sizes per process: the union's mean must weight them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def _worker(rank: int, world: int, port: int, out: str, fail_on: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = make_model("encoder", torch.float64)
        batch = make_batch("encoder", SIZES[rank], torch.float64, seed=rank)
        fn = loss_fn
        if rank == fail_on:

            def fn(model, batch):
                raise RuntimeError("broken on this process")

        try:
            report = analyze(model, fn, batch, reduce=_sum, **SETTINGS)
            result = {"report": report.to_dict()}
        except RuntimeError as error:
            result = {"error": str(error)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, fail_on: int = -1) -> list[dict]:
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path), fail_on), nprocs=2, start_method="spawn"
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


def test_hessian_monitor_under_ddp_spawn(tmp_path):
    """Two gloo processes train with the callback: no hang, one event file, the stability scalars logged."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_callback import TinyTransformer

    from lightning_hessian import HessianMonitor, tags

    L.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="ddp")
    monitor = HessianMonitor(every_n_steps=2, density=False, figures=False)
    trainer = L.Trainer(
        max_steps=4,
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyTransformer())
    files = list(tmp_path.rglob("events.out.tfevents.*"))  # the spawned rank 0 picked the version
    assert len(files) == 1
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars(tags.SHARPNESS_RATIO)] == [2, 4]


def _nan_on_rank_one(module, batch):
    """The curvature loss of TinyTransformer, NaN on process 1 only."""
    import torch.nn.functional as F

    loss = F.cross_entropy(module(batch[0]), batch[1])
    return loss * float("nan") if dist.get_rank() == 1 else loss


def _fit_ddp(tmp_path: Path, monitor, max_steps: int = 6):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_callback import TinyTransformer

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=max_steps,
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        logger=TensorBoardLogger(tmp_path, name="ddp"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyTransformer())
    (events,) = [EventAccumulator(str(f), size_guidance={"scalars": 0}) for f in tmp_path.rglob("events.*")]
    events.Reload()
    return events


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
