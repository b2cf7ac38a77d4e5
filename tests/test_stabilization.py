"""Live [KG] stabilisation: per-sample subspace terms against dense float64 Hessians, the whole-model Ritz
subspace, and a measurement that leaves the model exactly as it found it."""

from __future__ import annotations

import pytest
import torch
from _dense import dense_hessian
from _models import loss_fn, make_batch, make_model
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import tags
from lightning_hessian.batches import split_batch
from lightning_hessian.blocks import find_blocks, model_block
from lightning_hessian.formulas.stabilization import expected_criterion, probe_variance
from lightning_hessian.stabilization import measure_stabilization, subspace_terms
from lightning_hessian.tracking import track_model

DT = torch.float64

# torch's forward-mode AD (jacfwd) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def _hessian(model, batch, whole):
    with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD needs the math attention kernel
        return dense_hessian(model, loss_fn, batch, whole)


def _setup(batch_size: int = 5):
    model = make_model("mha", DT)
    batch = make_batch("mha", batch_size=batch_size, dtype=DT, seed=3)
    whole = model_block(model, "model")
    return model, batch, whole


def _dense_terms(model, batch, whole, u):
    values, grads, hessians = [], [], []
    params = [dict(model.named_parameters())[n] for n in whole.params]
    for sample, _ in split_batch(batch, 1):
        loss = loss_fn(model, sample)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        values.append(loss.detach())
        grads.append(u.T @ g)
        hessians.append(u.T @ _hessian(model, sample, whole) @ u)
    return torch.stack(values), torch.stack(grads), torch.stack(hessians)


def test_subspace_terms_match_dense_per_sample_hessians():
    model, batch, whole = _setup()
    mean_hessian = _hessian(model, batch, whole)
    _, vectors = torch.linalg.eigh(mean_hessian)
    u = vectors[:, -3:]  # the top-3 eigenspace
    values, grads, hessians = subspace_terms(model, loss_fn, batch, u)
    ref = _dense_terms(model, batch, whole, u)
    assert values.shape == (5,) and grads.shape == (5, 3) and hessians.shape == (5, 3, 3)
    for got, want in zip((values, grads, hessians), ref):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # the samples' projected Hessians average to the batch's (the loss is the mean over equal samples)
    assert torch.allclose(hessians.mean(0), u.T @ mean_hessian @ u, atol=1e-12)


def test_measurement_is_the_closed_form_on_the_dense_terms_and_changes_nothing():
    model, batch, whole = _setup()
    model.train()
    u, _ = torch.linalg.qr(torch.randn(whole.numel, 2, generator=torch.Generator().manual_seed(0), dtype=DT))
    loss_fn(model, batch).backward()  # a .grad that must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    found = measure_stabilization(model, loss_fn, batch, u, samples_seen=40, sigma=0.3)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG stream is untouched
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    variance = probe_variance(*_dense_terms(model, batch, whole, u), 0.3)
    assert found.variance == pytest.approx(float(variance), rel=1e-10)
    assert found.criterion == pytest.approx(float(expected_criterion(40, variance)), rel=1e-10)
    assert found.value_variance < found.variance  # the probes add the curvature's spread
    assert (found.dim, found.samples, found.products, found.samples_seen) == (2, 5, 10, 40)
    scalars = found.scalars(reference=2 * found.variance)
    assert scalars[tags.STABILIZATION_REFERENCE] == pytest.approx(2 * found.criterion)
    assert scalars[tags.STABILIZATION_SAMPLES] == 40
    assert tags.STABILIZATION_REFERENCE not in found.scalars()


def test_track_model_keeps_the_top_ritz_subspace():
    model, batch, whole = _setup()
    blocks = find_blocks(model)
    found = track_model(model, loss_fn, batch, blocks, subspace=3, cold_max_iter=64, tol=1e-8, trace_probes=0)
    u = found.subspace
    assert u.shape == (whole.numel, 3) and u.dtype == DT
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=DT), atol=1e-10)
    assert abs(float(u[:, 0] @ found.top_vector.to(DT))) == pytest.approx(1.0, abs=1e-8)
    _, vectors = torch.linalg.eigh(_hessian(model, batch, whole))
    # converged: the Ritz space is the top-3 eigenspace (cosines of the principal angles ~1)
    cosines = torch.linalg.svdvals(vectors[:, -3:].T @ u)
    assert cosines.min() > 1 - 1e-6
    assert track_model(model, loss_fn, batch, blocks, trace_probes=0).subspace is None
    with pytest.raises(ValueError, match="subspace"):
        track_model(model, loss_fn, batch, blocks, subspace=-1)


def test_bad_input_says_what_to_do():
    model, batch, whole = _setup()
    u = torch.zeros(whole.numel, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"\(P, D\)"):
        measure_stabilization(model, loss_fn, batch, torch.zeros(7, 1), samples_seen=1)
    with pytest.raises(ValueError, match="samples_seen"):
        measure_stabilization(model, loss_fn, batch, u, samples_seen=0)
    with pytest.raises(ValueError, match="sigma"):
        measure_stabilization(model, loss_fn, batch, u, samples_seen=1, sigma=float("nan"))
    with pytest.raises(ValueError, match="at least 2 samples"):
        measure_stabilization(model, loss_fn, make_batch("mha", batch_size=1, dtype=DT), u, samples_seen=1)


def test_a_batch_without_a_shared_first_dimension_gets_an_error_about_the_criterion():
    model = nn.Linear(3, 1).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64))

    def loss(m, b):
        return ((m(b[0]).squeeze(-1) - b[1][: b[0].shape[0]]) ** 2).mean()

    with pytest.raises(ValueError, match=r"stabilisation criterion .* \(\[\(4, 3\), \(5,\)\]\)") as caught:
        subspace_terms(model, loss, batch, torch.randn(4, 1, dtype=torch.float64))
    assert "chunk_size" not in str(caught.value)
