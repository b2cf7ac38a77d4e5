"""The whole-model tier (lightning_hessian.tracking): every number against the dense float64 Hessian."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _dense import _call, _rows, _substitute, block_vector, dense_hessian
from _models import loss_fn, make_batch, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import find_blocks, tags
from lightning_hessian.blocks import Block, BlockPart, model_block
from lightning_hessian.estimators import draws
from lightning_hessian.estimators._operator import DenseBlockOperator
from lightning_hessian.tracking import _top, track_model


@pytest.fixture(scope="module")
def setup():
    """The 291-parameter attention probe (fused in_proj_bias sliced into q / k / v), its dense Hessian."""
    model = make_model("mha", torch.float64).eval()
    batch = make_batch("mha", dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        hessian = dense_hessian(model, loss_fn, batch, model_block(model))
    return model, batch, hessian


def whole_indices(model, block: Block) -> torch.Tensor:
    """Positions of the block's entries in the whole-model vector, from the parts' ranges (not select)."""
    offsets, offset = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(offset, offset + p.numel()).reshape(p.shape)
        offset += p.numel()
    pieces = []
    for part in block.parts:
        t = offsets[part.param]
        if part.dim is not None:
            t = t.index_select(part.dim, torch.tensor(_rows(part, t.shape[part.dim])))
        pieces.append(t.reshape(-1))
    return torch.cat(pieces)


def dense_gradient(model, batch) -> torch.Tensor:
    whole = model_block(model)

    def loss(theta):
        return _call(model, loss_fn, batch, _substitute(model, whole, theta))

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.grad(loss)(block_vector(model, whole))


def interleaved(model) -> list[Block]:
    """Hand-built blocks with non-contiguous index runs, leaving some entries out."""
    odd = BlockPart.along("head.weight", 1, [1, 3, 4, 7])
    rows = BlockPart.along("attn.in_proj_bias", 0, [0, 5, 6, 17, 23])
    return [
        Block("odd", "other", None, 12 + 5, (odd, rows)),
        Block("out", "other", None, 72, (BlockPart("attn.out_proj.weight"), BlockPart("attn.out_proj.bias"))),
    ]


def test_top_and_preconditioned_top_match_dense(setup):
    model, batch, hessian = setup
    exact = torch.linalg.eigvalsh(hessian)
    gen = torch.Generator().manual_seed(0)
    diagonal = {
        n: 0.1 + torch.rand(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()
    }
    diagonal["head.bias"][:] = float("inf")  # frozen entries: P^-1/2 = 0 there
    result = track_model(
        model, loss_fn, batch, [], preconditioner=diagonal, max_iter=300, tol=1e-9, trace_probes=0
    )
    scale = model_block(model).vector(diagonal).rsqrt()
    preconditioned = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1].item()
    assert result.top_converged and result.preconditioned_converged
    assert result.top_eigenvalue == pytest.approx(exact[-1].item(), rel=1e-8)
    assert result.preconditioned_top == pytest.approx(preconditioned, rel=1e-8)
    assert result.top_residual <= 1e-9 * result.top_eigenvalue
    # Loose and converged: the Ritz value lies within its residual (<= tol * λ_max) of λ_max.
    loose = track_model(
        model, loss_fn, batch, [], preconditioner=diagonal, max_iter=300, tol=1e-2, trace_probes=0
    )
    assert loose.top_converged and loose.top_residual <= 1e-2 * loose.top_eigenvalue
    assert abs(loose.top_eigenvalue - exact[-1].item()) <= loose.top_residual
    assert abs(loose.preconditioned_top - preconditioned) <= loose.preconditioned_residual
    assert loose.matvecs < result.matvecs


def test_tol_is_relative_to_the_top_eigenvalue_not_to_a_larger_negative_one():
    # λ_min = -100 sets lanczos' own scale: at tol 1e-2 it would accept a residual of 1 on λ_max = 1.
    values = torch.cat(
        [torch.tensor([-100.0]), torch.linspace(-1, 0.9, 200, dtype=torch.float64), torch.ones(1)]
    )
    q = torch.linalg.qr(
        torch.randn(202, 202, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ).Q
    op = DenseBlockOperator([q @ torch.diag(values.double()) @ q.T])
    start = torch.ones(202, dtype=torch.float64)
    value, residual, converged, vector = _top(op, start, 1e-2, 200, seed=0)
    assert converged and residual <= 1e-2 * abs(value)
    assert abs(value - 1.0) <= residual
    assert vector.shape == (202,)


def test_a_warm_start_on_changed_weights_needs_far_fewer_products(setup):
    model, batch, _ = setup
    settings = dict(max_iter=300, tol=1e-2, trace_probes=0)  # the tracking regime
    before = track_model(model, loss_fn, batch, [], **settings)
    stepped = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(stepped.parameters(), lr=1e-3)
    loss_fn(stepped, batch).backward()
    optimizer.step()
    with sdpa_kernel(SDPBackend.MATH):
        exact = torch.linalg.eigvalsh(dense_hessian(stepped, loss_fn, batch, model_block(stepped)))[-1].item()
    cold = track_model(stepped, loss_fn, batch, [], **settings)
    warm = track_model(stepped, loss_fn, batch, [], init=before, **settings)
    assert cold.top_converged and warm.top_converged
    assert abs(warm.top_eigenvalue - exact) <= warm.top_residual <= 1e-2 * exact
    assert 3 * warm.matvecs <= cold.matvecs, (warm.matvecs, cold.matvecs)  # measured: 2 against 8


def test_a_cold_call_gets_cold_max_iter_products_and_a_warm_one_max_iter(setup):
    model, batch, _ = setup
    cold = track_model(model, loss_fn, batch, [], max_iter=2, cold_max_iter=10, tol=1e-12, trace_probes=0)
    assert cold.matvecs == 10 and not cold.top_converged
    warm = track_model(
        model, loss_fn, batch, [], init=cold, max_iter=2, cold_max_iter=10, tol=1e-12, trace_probes=0
    )
    assert warm.matvecs == 2
    assert warm.top_eigenvalue == pytest.approx(cold.top_eigenvalue, rel=1e-3)  # 2 products suffice warm


def test_shares_and_alignments_match_the_dense_top_eigenvector(setup):
    model, batch, hessian = setup
    blocks = find_blocks(model)
    gen = torch.Generator().manual_seed(3)
    update = {
        n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()
    }
    del update["head.bias"]  # a missing parameter counts as zero
    result = track_model(model, loss_fn, batch, blocks, update=update, max_iter=300, tol=1e-10)
    runs = track_model(
        model, loss_fn, batch, interleaved(model), max_iter=300, tol=1e-10
    )  # blocks may not overlap
    v = torch.linalg.eigh(hessian).eigenvectors[:, -1]
    for block in blocks + interleaved(model):
        expected = v[whole_indices(model, block)].square().sum().item()
        share = (result if block in blocks else runs).top_shares[block.name]
        assert share == pytest.approx(expected, abs=1e-8), block.name
    assert sum(result.top_shares[b.name] for b in blocks) == pytest.approx(1.0, abs=1e-12)
    g = dense_gradient(model, batch)
    assert result.gradient_alignment == pytest.approx(abs(g @ v).item() / g.norm().item(), abs=1e-8)
    u = torch.cat([update.get(n, torch.zeros_like(p)).reshape(-1) for n, p in model.named_parameters()])
    assert result.update_alignment == pytest.approx(abs(u @ v).item() / u.norm().item(), abs=1e-8)
    assert result.top_vector.shape == (model_block(model).numel,) and result.top_vector.device.type == "cpu"


def test_block_rayleigh_quotients_match_the_dense_blocks_along_the_top_eigenvector(setup):
    model, batch, hessian = setup
    blocks = find_blocks(model) + interleaved(model)[:1]
    plain = track_model(model, loss_fn, batch, blocks[:-1], max_iter=300, tol=1e-10)
    assert plain.block_rayleigh == {}  # opt-in: it costs a product with every block
    result = track_model(model, loss_fn, batch, blocks[:-1], max_iter=300, tol=1e-10, block_rayleigh=True)
    odd = track_model(model, loss_fn, batch, blocks[-1:], max_iter=300, tol=1e-10, block_rayleigh=True)
    assert result.matvecs > plain.matvecs
    v = result.top_vector.to(torch.float64)
    for block in blocks:
        index = whole_indices(model, block)
        piece = v[index]
        expected = (piece @ hessian[index][:, index] @ piece / (piece @ piece)).item()
        found = (odd if block is blocks[-1] else result).block_rayleigh[block.name]
        assert found == pytest.approx(expected, rel=1e-8, abs=1e-10), block.name
        assert result.scalars().get(tags.block_tag(block.name, "top_rayleigh"), found) == found


def test_block_traces_from_shared_probes_are_the_dense_probe_sums(setup):
    model, batch, hessian = setup
    blocks = find_blocks(model) + interleaved(model)
    result = track_model(
        model, loss_fn, batch, blocks[:-2], trace_probes=5, seed=7, max_iter=2, cold_max_iter=2
    )
    runs = track_model(
        model, loss_fn, batch, blocks[-2:], trace_probes=5, seed=7, max_iter=2, cold_max_iter=2
    )
    result.block_traces.update(runs.block_traces)
    result.block_trace_stderr.update(runs.block_trace_stderr)
    n = hessian.shape[0]
    z = torch.stack([draws.rademacher((n,), draws.generator(7, draws.HUTCHINSON, 0, j)) for j in range(5)], 1)
    products = z * (hessian @ z)
    for block in blocks:
        samples = products[whole_indices(model, block)].sum(0)
        assert result.block_traces[block.name] == pytest.approx(samples.mean().item(), rel=1e-10, abs=1e-12)
        assert result.block_trace_stderr[block.name] == pytest.approx(draws.sample_stderr(samples), rel=1e-8)
    assert result.trace == pytest.approx(products.sum(0).mean().item(), rel=1e-10)
    assert result.trace_stderr == pytest.approx(draws.sample_stderr(products.sum(0)), rel=1e-8)
    assert result.matvecs == 2 + 5


def test_block_traces_lie_within_four_standard_errors_of_the_dense_traces(setup):
    model, batch, hessian = setup
    blocks = find_blocks(model)
    result = track_model(model, loss_fn, batch, blocks, trace_probes=400, max_iter=1)
    for block in blocks:
        index = whole_indices(model, block)
        exact = hessian[index][:, index].trace().item()
        error = abs(result.block_traces[block.name] - exact)
        assert error <= 4 * result.block_trace_stderr[block.name], (block.name, error)
        # The docstring's per-probe variance: Hutchinson's on H_bb plus the coupling ||H_b,rest||_F^2.
        rest = torch.ones(hessian.shape[0], dtype=torch.bool)
        rest[index] = False
        inner = hessian[index][:, index]
        variance = (
            2 * (inner.square().sum() - inner.diagonal().square().sum())
            + hessian[index][:, rest].square().sum()
        )
        sampled = 400 * result.block_trace_stderr[block.name] ** 2
        assert sampled == pytest.approx(variance.item(), rel=0.35), (
            block.name
        )  # 4 sd of a 400-sample variance
    assert abs(result.trace - hessian.trace().item()) <= 4 * result.trace_stderr


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_model_is_left_exactly_as_found(setup, mode):
    model, batch, _ = setup
    model = copy.deepcopy(model).train()
    model.attn.eval()  # mixed flags must come back as they were
    loss_fn(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11), random.seed(11), np.random.seed(11)  # noqa: NPY002 (the global streams)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()  # noqa: NPY002
    flags = [m.training for m in model.modules()]
    pre = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    track_model(model, loss_fn, batch, find_blocks(model), preconditioner=pre, update=grads, mode=mode)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])  # noqa: NPY002
    assert [m.training for m in model.modules()] == flags


def test_scalars_use_the_tags_and_leave_out_undefined_values(setup):
    model, batch, _ = setup
    blocks = find_blocks(model)
    pre = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    result = track_model(model, loss_fn, batch, blocks, preconditioner=pre, trace_probes=1, max_iter=3)
    scalars = result.scalars()
    assert (
        scalars[tags.SHARPNESS] == scalars[tags.block_tag("model", "top_eigenvalue")] == result.top_eigenvalue
    )
    assert scalars[tags.PRECONDITIONED_SHARPNESS] == result.preconditioned_top
    assert scalars[tags.GRADIENT_ALIGNMENT] == result.gradient_alignment
    assert tags.UPDATE_ALIGNMENT not in scalars  # no update given
    for block in blocks:
        assert scalars[tags.block_tag(block.name, "top_share")] == result.top_shares[block.name]
        assert scalars[tags.block_tag(block.name, "trace")] == result.block_traces[block.name]
        assert tags.block_tag(block.name, "trace_stderr") not in scalars  # NaN from one probe
    # Unit preconditioner: the same operator, so the same eigenvalue.
    assert result.preconditioned_top == pytest.approx(result.top_eigenvalue, rel=1e-12)


def test_a_warm_start_from_another_model_starts_cold(setup):
    model, batch, _ = setup
    other = make_model("encoder", torch.float64)
    previous = track_model(other, loss_fn, make_batch("encoder", dtype=torch.float64), [], max_iter=3)
    warm = track_model(model, loss_fn, batch, [], init=previous, max_iter=3, trace_probes=0)
    cold = track_model(model, loss_fn, batch, [], max_iter=3, trace_probes=0)
    assert warm.top_eigenvalue == cold.top_eigenvalue


def test_bad_input_is_refused_with_what_to_do(setup):
    model, batch, _ = setup
    with pytest.raises(ValueError, match="trace_probes"):
        track_model(model, loss_fn, batch, [], trace_probes=-1)
    with pytest.raises(ValueError, match="no entry"):
        track_model(model, loss_fn, batch, [], preconditioner={})
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="not positive"):
        track_model(model, loss_fn, batch, [], preconditioner=zero)
    with pytest.raises(ValueError, match="not parameters"):
        track_model(model, loss_fn, batch, [], update={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        track_model(model, loss_fn, batch, [], update={"head.bias": torch.zeros(2)})
    with pytest.raises(TypeError, match="ModelCurvature"):
        track_model(model, loss_fn, batch, [], init={"model": torch.zeros(3)})
    with pytest.raises(ValueError, match="tol"):
        track_model(model, loss_fn, batch, [], tol=2.0)
    frozen = copy.deepcopy(model)
    frozen.head.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        track_model(frozen, loss_fn, batch, find_blocks(model))


@pytest.mark.slow
def test_the_tracking_benchmark_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "tracking.md"
    args = [
        "--steps",
        "2",
        "--every",
        "1",
        "--layers",
        "1",
        "--dim",
        "16",
        "--configs",
        "2:1e-2",
        "--out",
        out,
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, root / "benchmarks" / "bench_tracking.py", *args], check=True, env=env)
    text = out.read_text()
    assert "| warm 2:0.01 |" in text and "| cold 2:0.01 |" in text and "(2 in all)" in text
