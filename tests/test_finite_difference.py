"""Finite-difference Hessian-vector products against the exact (double-backward) ones.

Tolerances are what the step rule of :mod:`lightning_hessian.finite_difference` gives on these models
(measured max relative product error per block for random vectors: 5e-8 in float64, 4e-2 in float32, 2e-2
for bf16 weights in float32 arithmetic, 20-300% in bf16 arithmetic), with headroom; the README's "Large
models" section quotes them.
"""

from __future__ import annotations

import pytest
import torch
from _models import loss_fn, make_batch, make_model
from torch import nn

from lightning_hessian import CurvatureOperator, analyze, find_blocks
from lightning_hessian._context import curvature_context
from lightning_hessian.blocks import model_block
from lightning_hessian.errors import NonFiniteLossError
from lightning_hessian.finite_difference import NonFiniteProductError, step_sizes

SMOOTH = ["mha", "nanogpt", "gpt2", "llama"]  # GELU / SiLU: no kinks for the differences to straddle


def products(model, batch, blocks, backend, columns=2, seed=0, **kwargs):
    """Each block times ``columns`` fixed random vectors, with the given backend."""
    dtype = next(model.parameters()).dtype
    with curvature_context(model, kwargs.pop("mode", "eval"), exact=backend == "exact"):
        op = CurvatureOperator(model, loss_fn, batch, blocks, products=backend, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        vectors = [torch.randn(n, columns, generator=gen, dtype=torch.float64).to(dtype) for n in op.sizes]
        return op.matmat(vectors), op


def relative_errors(actual, expected):
    return [((a.double() - e.double()).norm() / e.double().norm()).item() for a, e in zip(actual, expected)]


def some_blocks(model, count=6):
    found = find_blocks(model)
    return [*found[:: max(1, len(found) // count)], model_block(model)]


@pytest.mark.parametrize("family", SMOOTH)
def test_float64_products_match_exact(family):
    model = make_model(family, torch.float64)
    batch = make_batch(family, dtype=torch.float64)
    blocks = some_blocks(model)
    exact, _ = products(model, batch, blocks, "exact")
    approx, op = products(model, batch, blocks, "finite_difference")
    assert max(relative_errors(approx, exact)) < 1e-7
    assert op.block_matvecs == [2] * len(blocks)


@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_float32_products_match_exact(family):
    model = make_model(family, torch.float32)
    batch = make_batch(family, dtype=torch.float32)
    blocks = some_blocks(model)
    exact, _ = products(model, batch, blocks, "exact")
    approx, _ = products(model, batch, blocks, "finite_difference")
    errors = relative_errors(approx, exact)
    assert max(errors) < 2e-2 and sorted(errors)[len(errors) // 2] < 2e-3


def test_bf16_weights_against_float64_reference():
    """bf16 weights: float32 arithmetic (dtype=torch.float32) is within float32's error of the float64
    products of the same weights; bf16 arithmetic is warned about (its error is 20-300%)."""
    model = make_model("llama", torch.bfloat16)
    blocks = some_blocks(model, count=3)
    reference = make_model("llama", torch.bfloat16).double()
    exact, _ = products(reference, make_batch("llama", dtype=torch.float64), blocks, "exact")
    batch = make_batch("llama", dtype=torch.float32)
    approx, op = products(model, batch, blocks, "finite_difference", dtype=torch.float32)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the model is left as it was
    errors = relative_errors(approx, exact)
    assert max(errors) < 2e-2 and sorted(errors)[len(errors) // 2] < 5e-3, errors
    with pytest.warns(UserWarning, match="dtype=torch.float32"):
        noisy, op = products(model, make_batch("llama", dtype=torch.bfloat16), blocks, "finite_difference")
    assert op.dtype == torch.bfloat16 and all(torch.isfinite(p).all() for p in noisy)
    assert max(relative_errors(noisy, exact)) > 2e-2  # why the warning: bf16 arithmetic is far worse


def test_step_rule():
    """u^(1/3) * max(rms(theta), 1e-2) / max|v|: scale-free in v, floored for zero weights, 0 for v = 0."""
    theta = torch.full((4,), 0.5, dtype=torch.float64)
    columns = torch.tensor([[1.0, 2.0, 0.0]] * 3 + [[1.0, -4.0, 0.0]], dtype=torch.float64)
    steps = step_sizes(theta, columns, torch.float32)
    u = torch.finfo(torch.float32).eps ** (1 / 3)
    assert steps.tolist() == pytest.approx([u * 0.5, u * 0.125, 0.0])
    assert step_sizes(torch.zeros(4), columns[:, :1], torch.float64).item() == pytest.approx(
        torch.finfo(torch.float64).eps ** (1 / 3) * 1e-2
    )


def test_chunks_and_several_batches_give_the_same_products():
    from lightning_hessian import Batches

    model = make_model("nanogpt", torch.float64)
    data = Batches([make_batch("nanogpt", 4, torch.float64, seed=s) for s in range(2)])
    blocks = some_blocks(model, count=3)
    whole, _ = products(model, data, blocks, "finite_difference")
    chunked, _ = products(model, data, blocks, "finite_difference", chunk_size=3)
    exact, _ = products(model, data, blocks, "exact")
    assert max(relative_errors(chunked, whole)) < 1e-9
    assert max(relative_errors(whole, exact)) < 1e-7


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.hidden = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(32, 11)

    def forward(self, tokens):
        return self.head(self.drop(torch.tanh(self.hidden(self.embed(tokens)))))


def test_train_mode_dropout_uses_the_same_masks_for_both_perturbations():
    """With mode="train" every perturbed forward replays the random state, so ±ε see the same masks
    (different masks would make the difference O(1/ε) wrong)."""
    torch.manual_seed(0)
    model = DropoutNet().double()
    batch = make_batch("nanogpt", 4, torch.float64)
    blocks = [*find_blocks(model, rules={"hidden": "ffn_in"}), model_block(model)]
    exact, _ = products(model, batch, blocks, "exact", mode="train")
    approx, _ = products(model, batch, blocks, "finite_difference", mode="train")
    assert max(relative_errors(approx, exact)) < 1e-7
    evaluated, _ = products(model, batch, blocks, "exact")
    assert min(relative_errors(evaluated, exact)) > 1e-2  # the masks matter


def test_a_non_finite_product_raises_the_non_finite_error():
    """A perturbed forward that overflows makes the product NaN: NonFiniteProductError, which is the
    NonFiniteLossError a monitor skips the pass on."""
    model = make_model("nanogpt", torch.float64)
    batch = make_batch("nanogpt", dtype=torch.float64)
    base = model.lm_head.weight.detach().clone()

    def overflowing(model, batch):
        moved = (model.lm_head.weight != base).any()
        return loss_fn(model, batch) * torch.where(moved, torch.inf, 1.0)

    with curvature_context(model, exact=False):
        op = CurvatureOperator(model, overflowing, batch, some_blocks(model), products="finite_difference")
        with pytest.raises(NonFiniteProductError, match="not finite") as error:
            op.matmat([torch.ones(n, dtype=torch.float64) for n in op.sizes])
    assert isinstance(error.value, NonFiniteLossError)


def test_analyze_estimates_match_exact_and_the_report_names_the_backend():
    model = make_model("llama", torch.float64)
    batch = make_batch("llama", dtype=torch.float64)
    settings = dict(blocks=[b.name for b in find_blocks(model)[:6]], full=True, tol=1e-8, trace_matvecs=20)
    exact = analyze(model, loss_fn, batch, **settings)
    approx = analyze(model, loss_fn, batch, products="finite_difference", **settings)
    assert exact.settings["products"] == "exact" and approx.settings["products"] == "finite_difference"
    for e, a in zip(exact, approx):
        assert (e.products, a.products) == ("exact", "finite_difference")
        scale = max(abs(e.top_eigenvalue), abs(e.min_eigenvalue))
        assert a.top_eigenvalue == pytest.approx(e.top_eigenvalue, abs=1e-6 * scale)
        assert a.min_eigenvalue == pytest.approx(e.min_eigenvalue, abs=1e-6 * scale)
        assert a.trace == pytest.approx(e.trace, abs=1e-6 * scale * e.numel)


def test_analyze_float32_within_stated_tolerance():
    """float32: λ_max within 1%, λ_min and the trace within 2% of the block's spectral scale."""
    model = make_model("nanogpt", torch.float32)
    batch = make_batch("nanogpt", dtype=torch.float32)
    settings = dict(blocks=[b.name for b in find_blocks(model)[:5]], full=True, tol=1e-3, trace_matvecs=12)
    exact = analyze(model, loss_fn, batch, **settings)
    approx = analyze(model, loss_fn, batch, products="finite_difference", **settings)
    for e, a in zip(exact, approx):
        scale = max(abs(e.top_eigenvalue), abs(e.min_eigenvalue))
        assert a.top_eigenvalue == pytest.approx(e.top_eigenvalue, abs=1e-2 * scale), e.name
        assert a.min_eigenvalue == pytest.approx(e.min_eigenvalue, abs=2e-2 * scale), e.name
        assert a.trace == pytest.approx(e.trace, abs=2e-2 * scale * e.numel**0.5), e.name


def test_finite_differences_leave_the_attention_kernels_alone():
    model = make_model("mha", torch.float64)
    with curvature_context(model):
        assert not torch.backends.cuda.flash_sdp_enabled()  # exact products: the math kernel only
    with curvature_context(model, exact=False):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


FAST = dict(smallest=False, trace=False, max_iter=6, tol=1e-12)


def test_a_compiled_model_runs_its_compiled_graph(monkeypatch):
    """products="auto" on a compiled model: finite differences through the compiled graph (compiled once,
    as in training: no recompile per block), said once, and the same numbers as the eager model's exact
    products."""
    from torch._dynamo.backends.registry import lookup_backend

    from lightning_hessian import products as backends

    monkeypatch.setattr(backends, "_SAID", set())
    calls = {"compile": 0, "run": 0}

    def counting(graph, example):  # aot_eager: compiled autograd graphs, which refuse double backward
        calls["compile"] += 1
        compiled = lookup_backend("aot_eager")(graph, example)

        def run(*args):
            calls["run"] += 1
            return compiled(*args)

        return run

    torch._dynamo.reset()
    model = make_model("nanogpt", torch.float64)
    batch = make_batch("nanogpt", dtype=torch.float64)
    settings = dict(blocks=[b.name for b in find_blocks(model)[3:6]], full=True, **FAST)
    compiled = torch.compile(model, backend=counting)
    with pytest.warns(UserWarning, match="compiled with torch.compile"):
        report = analyze(compiled, loss_fn, batch, products="auto", **settings)
    assert (
        report.settings["products"] == "finite_difference"
        and "compiled" in report.settings["products_reason"]
    )
    assert calls["compile"] == 1 and calls["run"] >= 2 * report.matvecs
    exact = analyze(model, loss_fn, batch, **settings)
    for a, e in zip(report, exact):
        assert a.top_eigenvalue == pytest.approx(e.top_eigenvalue, rel=1e-6), e.name
    runs = calls["run"]
    analyze(compiled, loss_fn, batch, products="exact", **settings)  # exact products run it eagerly
    assert calls["run"] == runs


def test_auto_takes_the_callers_reason_and_exact_refuses_it(monkeypatch):
    from lightning_hessian import products as backends

    monkeypatch.setattr(backends, "_SAID", set())
    model = make_model("mha", torch.float64)
    batch = make_batch("mha", dtype=torch.float64)
    reason = "the FSDPStrategy shards the parameters"
    assert (
        analyze(model, loss_fn, batch, blocks=None, full=True, products="auto", **FAST).settings["products"]
        == "exact"
    )
    with pytest.warns(UserWarning, match=reason):
        report = analyze(
            model, loss_fn, batch, blocks=None, full=True, products="auto", exact_unavailable=reason, **FAST
        )
    assert (report.settings["products_reason"], report.full.products) == (reason, "finite_difference")
    with pytest.raises(ValueError, match='products="finite_difference"'):
        analyze(model, loss_fn, batch, blocks=None, full=True, exact_unavailable=reason, **FAST)
    with pytest.raises(ValueError, match="Hessian products only"):
        analyze(model, loss_fn, batch, full=True, products="finite_difference", split=True)
    with pytest.raises(ValueError, match="products must be one of"):
        analyze(model, loss_fn, batch, full=True, products="fd")


def test_fsdp1_is_refused_with_the_reason():
    class FullyShardedDataParallel(nn.Module):  # what the check looks for: FSDP1's wrapper class
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    model = FullyShardedDataParallel(make_model("mha", torch.float64))
    batch = make_batch("mha", dtype=torch.float64)
    for backend in ("exact", "finite_difference", "auto"):
        with pytest.raises(ValueError, match="ModelParallelStrategy"):
            analyze(model, loss_fn, batch, blocks=None, full=True, products=backend, **FAST)
