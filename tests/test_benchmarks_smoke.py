"""Smoke test of ``benchmarks/compare_peers.py`` (the package ``benchmarks/peers/``) on a micro model.

Skipped unless the peers are installed (``pip install -e ".[bench]"`` plus the README's ``--no-deps`` line).
Runs each task's measurement once with minimal settings (no subprocesses, no Lightning training) and checks
that its numbers are sane, then renders them and checks the Markdown: this guards the calls into PyHessian,
hessian-eigenthings and curvlinops and the rendering of what they measured, not the speed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _scripts import importing_from
from torch.nn.attention import SDPBackend, sdpa_kernel

for peer in ("pyhessian", "hessian_eigenthings", "curvlinops", "scipy"):
    pytest.importorskip(peer)
pytestmark = pytest.mark.slow  # a benchmark's smoke test

with importing_from("benchmarks"):  # its own _models, not the tests' one
    from _models import ModelSpec
    from peers import common
    from peers.blocks import measure_blocks
    from peers.density import OURS as OURS_DENSITY
    from peers.density import measure_density
    from peers.hvp import OURS_HVP, measure_hvp
    from peers.references import dense_hessian, reference_tops
    from peers.render.blocks import render_blocks
    from peers.render.costs import render_hvp
    from peers.render.spectra import render_density, render_trace
    from peers.render.top_eigenvalue import render_top_eigenvalue
    from peers.top_eigenvalue import measure_top_eigenvalue
    from peers.trace import measure_trace

# d=8, 1 layer: 525 parameters, a dense Hessian in well under a second.
MICRO = ModelSpec("micro", 8, 2, 1, 8, 6, 3, 4, 4, torch.float64)


@pytest.fixture(autouse=True)
def _one_thread_math_attention():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.set_num_threads(threads)


def _rows(lines: list[str], first_cell: str) -> list[list[str]]:
    """The cells of the Markdown rows whose first cell starts with ``first_cell``."""
    return [
        [c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith(f"| {first_cell}")
    ]


def _check_top_blocks_and_hvp() -> None:
    top = measure_top_eigenvalue(MICRO, seeds=[0], quick=True)
    assert common.relative(top.crosscheck, top.reference) < 1e-8
    # Ours at its default tol, and the peers' tightest settings, find the top eigenvalue.
    assert top.fastest_accurate("ours") is not None
    assert top.fastest_accurate("PyHessian") is not None
    assert top.fastest_accurate("eigenthings") is not None
    assert all(m.products > 0 for m in top.measured) and top.profile
    lines, targets = render_top_eigenvalue(top)
    assert any("Task 1" in line for line in lines) and len(targets) == 2
    assert len(_rows(lines, "ours: Lanczos")) == 4  # the quick sweep: one row per tol

    blocks = measure_blocks(MICRO, top, repeats=1, peers=True, tensor_subset=None)
    assert set(blocks.tensors) == set(common.params_of(MICRO.build()[0]))
    assert blocks.ours["whole"].error < 1e-3 and blocks.ours["cold"].products > 0
    assert {p.tool for p in blocks.peers} == {"hessian-eigenthings", "curvlinops"}
    lines, targets = render_blocks(blocks)
    assert len(targets) == 2 and len(_rows(lines, "curvlinops: ")) == 1
    # Eigenthings: task 1's choice, and its accurate run if the step search had to run.
    assert len(_rows(lines, "hessian-eigenthings: ")) == min(len(blocks.peer_runs("hessian-eigenthings")), 2)
    assert len(_rows(lines, f"`{next(iter(blocks.tensors))}`")) == 1  # the per-tensor profile
    # Rendering alone: of eigenthings' step search, the table keeps task 1's choice and the last run,
    # and the target compares with the last.
    he = blocks.peer_runs("hessian-eigenthings")[0]
    searched = [replace(he, setting=f"lanczos k=1, max_iter={s}, LA") for s in (98, 99)]
    lines, targets = render_blocks(replace(blocks, peers=[he, *searched, *blocks.peer_runs("curvlinops")]))
    shown = [row[0] for row in _rows(lines, "hessian-eigenthings: ")]
    assert len(shown) == 2 and shown[0].endswith(he.setting) and shown[1].endswith("max_iter=99, LA")
    assert "max_iter=98" not in "\n".join(lines) and "(lanczos k=1, max_iter=99, LA)" in targets[0][2]

    hvp = measure_hvp(MICRO, rounds=1)
    assert hvp.errors["ours"] < 1e-10  # float64: ours equals the reference
    assert all(len(t) == 1 for t in hvp.times.values()) and hvp.median(OURS_HVP) > 0
    lines, targets = render_hvp(hvp)
    agreement = _rows(lines, "ours |")
    assert agreement and float(agreement[0][1]) < 1e-10 and len(targets) == 1


def _check_trace_and_density() -> None:
    model, batch = common.build(MICRO)
    hessian = dense_hessian(model, batch)
    top = reference_tops(model, batch, None)["model"]
    assert common.relative(top, float(torch.linalg.eigvalsh(hessian)[-1])) < 1e-8

    trace = measure_trace(model, batch, hessian, (12,), [0, 1], "micro")
    assert trace.exact == pytest.approx(float(hessian.trace()))
    assert len(trace.methods) == 8 and all(len(e) == 2 for e in trace.errors.values())
    lines, targets = render_trace(trace)
    assert len(targets) == 1 and len(_rows(lines, "curvlinops")) == 3

    density = measure_density(model, batch, hessian, ((2, 5),), [0, 1], "micro")
    assert 0 < density.mean(OURS_DENSITY, (2, 5)) < 1 and density.n_eigenvalues == hessian.shape[0]
    lines, targets = render_density(density)
    assert len(targets) == 1 and len(_rows(lines, "PyHessian: density")) == 1


@pytest.mark.slow  # about 35 s on a busy 2-core machine: every peer and ours, per tensor too
def test_top_eigenvalue_blocks_and_hvp():
    _check_top_blocks_and_hvp()


def test_trace_and_density_against_the_dense_hessian():
    _check_trace_and_density()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_task_runs_on_cuda(monkeypatch):
    """``--device cuda``: the same measurements with every model, batch and product on the GPU."""
    monkeypatch.setattr(common, "DEVICE", torch.device("cuda"))
    model, batch = common.build(MICRO)
    assert next(model.parameters()).is_cuda and batch[0].is_cuda
    assert dense_hessian(model, batch).is_cuda
    _check_top_blocks_and_hvp()
    _check_trace_and_density()
