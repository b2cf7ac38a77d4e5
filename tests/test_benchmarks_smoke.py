"""Smoke test of ``benchmarks/compare_peers.py``: every peer call still works, on a micro model.

Skipped unless the peers are installed (``pip install -e ".[bench]"`` plus the README's ``--no-deps`` line).
Runs each task function once with minimal settings (no subprocesses, no Lightning training) and checks
that the numbers are sane: this guards the calls into PyHessian, hessian-eigenthings and curvlinops, not
the speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

for peer in ("pyhessian", "hessian_eigenthings", "curvlinops", "scipy"):
    pytest.importorskip(peer)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_peers  # noqa: E402
from _models import ModelSpec  # noqa: E402

# d=8, 1 layer: 525 parameters, a dense Hessian in well under a second.
MICRO = ModelSpec("micro", 8, 2, 1, 8, 6, 3, 4, 4, torch.float64)


@pytest.fixture(autouse=True)
def _one_thread_math_attention():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.set_num_threads(threads)


def test_top_eigenvalue_blocks_and_hvp():
    top = compare_peers.task_top_eigenvalue(MICRO, seeds=[0], quick=True)
    assert compare_peers.relative(top.crosscheck, top.reference) < 1e-8
    # Ours at its default tol, and the peers' tightest settings, find the top eigenvalue.
    assert top.fastest_accurate("ours") is not None
    assert top.fastest_accurate("PyHessian") is not None
    assert top.fastest_accurate("eigenthings") is not None
    assert all(m.products > 0 for m in top.measured)
    lines, targets = compare_peers.report_top_eigenvalue(top, [0])
    assert any("Task 1" in line for line in lines) and len(targets) == 2

    lines, targets = compare_peers.task_blocks(MICRO, top, repeats=1, peers=True, tensor_subset=None)
    assert any("hessian-eigenthings" in line for line in lines) and len(targets) == 2

    lines, targets = compare_peers.task_hvp(MICRO, rounds=1)
    agreement = [line for line in lines if line.startswith("| ours |")]
    assert agreement and float(agreement[0].split("|")[2]) < 1e-10  # float64: ours equals the reference


def test_trace_and_density_against_the_dense_hessian():
    model, batch = MICRO.build()
    hessian = compare_peers.dense_hessian(model, batch)
    top = compare_peers.reference_tops(model, batch, None)["model"]
    assert compare_peers.relative(top, float(torch.linalg.eigvalsh(hessian)[-1])) < 1e-8

    lines, targets = compare_peers.task_trace(model, batch, hessian, (12,), [0, 1], "micro")
    assert len(targets) == 1 and sum(line.startswith("| curvlinops") for line in lines) == 3
    lines, targets = compare_peers.task_density(model, batch, hessian, ((2, 5),), [0, 1], "micro")
    assert len(targets) == 1 and any(line.startswith("| PyHessian: density") for line in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_task_runs_on_cuda(monkeypatch):
    """``--device cuda``: the same task functions with every model, batch and product on the GPU."""
    monkeypatch.setattr(compare_peers, "DEVICE", torch.device("cuda"))
    model, batch = compare_peers.build(MICRO)
    assert next(model.parameters()).is_cuda and batch[0].is_cuda
    top = compare_peers.task_top_eigenvalue(MICRO, seeds=[0], quick=True)
    assert top.fastest_accurate("ours") is not None and top.fastest_accurate("PyHessian") is not None
    lines, targets = compare_peers.task_blocks(MICRO, top, repeats=1, peers=True, tensor_subset=None)
    assert len(targets) == 2
    lines, _ = compare_peers.task_hvp(MICRO, rounds=1)
    agreement = [line for line in lines if line.startswith("| ours |")]
    assert agreement and float(agreement[0].split("|")[2]) < 1e-10
    hessian = compare_peers.dense_hessian(model, batch)
    assert hessian.is_cuda
    lines, targets = compare_peers.task_trace(model, batch, hessian, (12,), [0, 1], "micro")
    assert len(targets) == 1
    lines, targets = compare_peers.task_density(model, batch, hessian, ((2, 5),), [0, 1], "micro")
    assert len(targets) == 1
