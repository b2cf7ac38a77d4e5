"""CurvatureOperator against dense float64 references: every block's matrix, entry by entry."""

from __future__ import annotations

import pytest
import torch
from _dense import dense_gauss_newton, dense_hessian
from _models import criterion, forward_fn, loss_fn, make_batch, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import Batches, CurvatureOperator, find_blocks
from lightning_hessian._context import curvature_context
from lightning_hessian.batches import map_tensors

FAMILIES = ["encoder", "mha", "vit", "nanogpt", "gpt2", "bert", "llama"]


def loss_and_output(model, batch):
    output = forward_fn(model, batch)
    return criterion(output, batch), output


def operator_matrices(op: CurvatureOperator) -> list[torch.Tensor]:
    """Each block's matrix, from products with the identity (all blocks in one call)."""
    eye = [torch.eye(n, dtype=op.dtype) for n in op.sizes]
    return op.matmat(eye)


def assert_close_matrix(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, scale: torch.Tensor | None = None
) -> None:
    """Max-entry error relative to ``scale`` (default: the largest entry of ``expected``)."""
    scale = (expected if scale is None else scale).abs().max().clamp_min(1e-30)
    error = (actual - expected).abs().max() / scale
    assert error < rtol, f"relative error {error:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_hessian_blocks_match_dense(family):
    model = make_model(family, torch.float64)
    batch = make_batch(family, dtype=torch.float64)
    blocks = find_blocks(model)
    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, batch, blocks)
        matrices = operator_matrices(op)
    with sdpa_kernel(SDPBackend.MATH):
        for block, matrix in zip(blocks, matrices):
            expected = dense_hessian(model.eval(), loss_fn, batch, block)
            assert_close_matrix(matrix, expected)
            assert torch.allclose(matrix, matrix.T, atol=1e-12 * expected.abs().max())
    assert op.block_matvecs == list(op.sizes)


@pytest.mark.parametrize("family", ["encoder", "vit", "llama"])
def test_gauss_newton_and_functional_match_dense(family):
    model = make_model(family, torch.float64)
    batch = make_batch(family, dtype=torch.float64)
    blocks = [b for b in find_blocks(model) if b.kind in ("query", "value", "ffn_in", "norm", "head")]
    with curvature_context(model):
        op = CurvatureOperator(model, loss_and_output, batch, blocks, split=True)
        hessians = operator_matrices(op)
        gauss_newton = operator_matrices(op.using("gauss_newton"))
        functional = operator_matrices(op.using("functional"))
    with sdpa_kernel(SDPBackend.MATH):
        for block, h, g, f in zip(blocks, hessians, gauss_newton, functional):
            expected = dense_gauss_newton(model.eval(), forward_fn, criterion, batch, block)
            assert_close_matrix(g, expected)
            assert_close_matrix(f, h - expected, scale=h)
            # Cross-entropy is convex in the logits, so the Gauss-Newton part is positive semi-definite.
            assert torch.linalg.eigvalsh(g).min() > -1e-10 * h.abs().max()
    if family != "llama":
        # The head is linear in its weights: no functional part.
        head = [f for b, f in zip(blocks, functional) if b.kind == "head"]
        assert head and head[0].abs().max() < 1e-12


def test_gauss_newton_operator_without_split():
    model = make_model("encoder", torch.float64)
    batch = make_batch("encoder", dtype=torch.float64)
    block = find_blocks(model)[1]
    with curvature_context(model):
        g = operator_matrices(
            CurvatureOperator(model, loss_and_output, batch, [block], curvature="gauss_newton")
        )
    assert_close_matrix(g[0], dense_gauss_newton(model.eval(), forward_fn, criterion, batch, block))


def test_several_batches_give_the_weighted_mean_hessian():
    model = make_model("vit", torch.float64)
    first, second = make_batch("vit", 3, torch.float64, seed=1), make_batch("vit", 5, torch.float64, seed=2)
    small = [b for b in find_blocks(model) if b.kind in ("key", "norm")][:2]
    with curvature_context(model):
        combined = operator_matrices(CurvatureOperator(model, loss_fn, Batches([first, second]), small))
        iterator = operator_matrices(CurvatureOperator(model, loss_fn, iter([first, second]), small))
    for b, matrix, again in zip(small, combined, iterator):
        expected = (
            3 * dense_hessian(model.eval(), loss_fn, first, b)
            + 5 * dense_hessian(model.eval(), loss_fn, second, b)
        ) / 8
        assert_close_matrix(matrix, expected)
        assert torch.equal(matrix, again)


def test_vmap_batching_equals_loop():
    model = make_model("nanogpt", torch.float64)
    batch = make_batch("nanogpt", dtype=torch.float64)
    blocks = find_blocks(model)
    vectors = [
        torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        for n in (b.numel for b in blocks)
    ]
    with curvature_context(model):
        loop = CurvatureOperator(model, loss_fn, batch, blocks, batching="loop").matmat(vectors)
        vmap = CurvatureOperator(model, loss_fn, batch, blocks, batching="vmap").matmat(vectors)
    for a, b in zip(loop, vmap):
        assert_close_matrix(b, a, 1e-12)


def test_auto_batching_picks_vmap_only_where_it_was_measured_faster():
    """``batching="auto"``: one batched backward for several vectors on CUDA, a loop on CPU, for one vector
    and under ``chunk_size`` (vmap's memory grows with the vectors)."""
    model = make_model("encoder", torch.float64)
    batch = make_batch("encoder", dtype=torch.float64)
    blocks = find_blocks(model)[:2]
    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, batch, blocks)
        chunked = CurvatureOperator(model, loss_fn, batch, blocks, chunk_size=2)
        forced = CurvatureOperator(model, loss_fn, batch, blocks, batching="vmap")
    assert op.batching == "auto" and not op._vmap(1) and not op._vmap(8)  # CPU
    assert forced._vmap(1) and forced._vmap(8)
    op.device = chunked.device = torch.device("cuda")  # the decision only; no product is run
    assert op._vmap(2) and op._vmap(8) and not op._vmap(1)
    assert not chunked._vmap(8)


def test_auto_batching_falls_back_to_the_loop_when_vmap_fails(monkeypatch):
    """An out-of-memory error (vmap holds all vectors' graphs at once) or a missing batching rule: "auto"
    recomputes with the loop and keeps looping; an explicit "vmap" raises."""
    import lightning_hessian.operators as operators

    model = make_model("encoder", torch.float64)
    batch = make_batch("encoder", dtype=torch.float64)
    blocks = find_blocks(model)[:2]
    columns = torch.randn(blocks[0].numel, 3, dtype=torch.float64)
    real_grad = operators.grad

    def failing_when_batched(*args, batched=False, **kwargs):
        if batched:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_grad(*args, **kwargs)

    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, batch, blocks)
        forced = CurvatureOperator(model, loss_fn, batch, blocks, batching="vmap")
        loop = CurvatureOperator(model, loss_fn, batch, blocks, batching="loop")
        expected = loop._hessian(loop._graph, blocks[0], columns)
        monkeypatch.setattr(operators, "grad", failing_when_batched)
        op.device = torch.device("cuda")  # as if on a GPU: "auto" tries vmap first
        assert op._vmap(3)
        got = op._hessian(op._graph, blocks[0], columns)
        assert not op._vmap(3)  # for good
        with pytest.raises(torch.OutOfMemoryError):
            forced._hessian(forced._graph, blocks[0], columns)
    assert_close_matrix(got, expected, 1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_batching_on_cuda_equals_the_loop():
    model = make_model("nanogpt", torch.float64).cuda()
    batch = map_tensors(make_batch("nanogpt", dtype=torch.float64), lambda t: t.cuda())
    blocks = find_blocks(model)
    vectors = [torch.randn(b.numel, 3, dtype=torch.float64, device="cuda") for b in blocks]
    with curvature_context(model):
        auto = CurvatureOperator(model, loss_fn, batch, blocks).matmat(vectors)
        loop = CurvatureOperator(model, loss_fn, batch, blocks, batching="loop").matmat(vectors)
    for a, b in zip(loop, auto):
        assert_close_matrix(b, a, 1e-12)


def test_skipped_blocks_and_vectors():
    model = make_model("encoder", torch.float64)
    batch = make_batch("encoder", dtype=torch.float64)
    blocks = find_blocks(model)[:3]
    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, batch, blocks)
        out = op.matmat([None, torch.ones(blocks[1].numel, dtype=torch.float64), None])
    assert out[0] is None and out[2] is None and out[1].shape == (blocks[1].numel, 1)
    assert op.block_matvecs == [0, 1, 0] and op.matvecs == 1


def test_float64_on_request_from_a_float32_model():
    model = make_model("gpt2")
    batch = make_batch("gpt2")
    block = find_blocks(model)[2]
    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, batch, [block], dtype=torch.float64)
        matrix = operator_matrices(op)[0]
    assert op.dtype == torch.float64 and matrix.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32
    model64 = make_model("gpt2", torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        expected = dense_hessian(model64.eval(), loss_fn, make_batch("gpt2", dtype=torch.float64), block)
    # float32 weights cast up exactly; the batch is integer tokens: only rounding of the weights differs.
    assert_close_matrix(matrix, expected, 1e-5)


def test_unused_parameters_give_zero_curvature():
    model = make_model("encoder", torch.float64)
    model.unused = torch.nn.Linear(2, 2).double()
    batch = make_batch("encoder", dtype=torch.float64)
    blocks = find_blocks(model, rules={"unused": "other"})
    unused = [b for b in blocks if b.name == "unused"]
    with curvature_context(model):
        matrix = operator_matrices(CurvatureOperator(model, loss_fn, batch, unused))[0]
        products = CurvatureOperator(model, loss_fn, batch, [blocks[0], *unused], batching="vmap").matmat(
            [torch.ones(blocks[0].numel, 2, dtype=torch.float64), torch.ones(6, 2, dtype=torch.float64)]
        )
    assert torch.equal(matrix, torch.zeros(6, 6, dtype=torch.float64))
    assert products[0].abs().sum() > 0 and torch.equal(products[1], torch.zeros(6, 2, dtype=torch.float64))


def test_the_model_is_not_touched():
    model = make_model("vit")
    batch = make_batch("vit")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with curvature_context(model):
        op = CurvatureOperator(model, loss_and_output, batch, find_blocks(model), split=True)
        op.matmat([torch.randn(n, 2) for n in op.sizes])
        op.using("functional").matmat([torch.randn(n, 1) for n in op.sizes])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_gauss_newton_with_mse_loss():
    """Mean squared error: the output Hessian is 2/N I, and the split still matches the dense reference."""
    model = make_model("vit", torch.float64)
    batch = make_batch("vit", dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def mse(output, batch):
        return ((output - target) ** 2).mean()

    def mse_loss(model, batch):
        output = forward_fn(model, batch)
        return mse(output, batch), output

    blocks = [b for b in find_blocks(model) if b.kind in ("key", "value", "norm")][:3]
    with curvature_context(model):
        op = CurvatureOperator(model, mse_loss, batch, blocks, split=True)
        hessians = operator_matrices(op)
        gauss_newton = operator_matrices(op.using("gauss_newton"))
    with sdpa_kernel(SDPBackend.MATH):
        for block, h, g in zip(blocks, hessians, gauss_newton):
            assert_close_matrix(h, dense_hessian(model.eval(), mse_loss, batch, block))
            assert_close_matrix(g, dense_gauss_newton(model, forward_fn, mse, batch, block))
