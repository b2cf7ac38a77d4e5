"""[KG] curvature-aligned stabilisation: closed form, Monte Carlo and the i.i.d. expectation, in float64."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, vmap

from lightning_hessian.formulas import convergence, stabilization

DT = torch.float64

# torch's forward-mode AD (jacfwd) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def _problem(n: int = 12, seed: int = 0):
    """A tiny tanh network (3-4-3, 28 parameters) with per-sample cross-entropy, at a partly trained w*."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).to(DT)

    def loss(theta, xi, yi):
        w1, b1, w2 = theta[:12].reshape(4, 3), theta[12:16], theta[16:28].reshape(3, 4)
        logits = w2 @ torch.tanh(w1 @ xi + b1)
        return torch.logsumexp(logits, 0) - logits @ yi

    theta = 0.7 * torch.randn(28, generator=g, dtype=DT)
    for _ in range(50):  # a few gradient steps: away from initialisation, not at a minimum
        theta = theta - 0.5 * vmap(grad(loss), (None, 0, 0))(theta, x, y).mean(0)
    return loss, theta, x, y


def _dense(loss, theta, x, y, d):
    """Per-sample values, and gradients / Hessians projected on the top-d eigenvectors of the mean Hessian."""
    values = vmap(loss, (None, 0, 0))(theta, x, y)
    grads = vmap(grad(loss), (None, 0, 0))(theta, x, y)
    hessians = vmap(hessian(loss), (None, 0, 0))(theta, x, y)
    _, vectors = torch.linalg.eigh(hessians.mean(0))
    u = vectors[:, -d:]
    return values, grads @ u, u.T @ hessians @ u, u


def _gauss_hermite(fn, d: int, sigma: float):
    """E_z fn(z) for z ~ N(0, σ² I_d), exact for polynomials of degree <= 5 (3 nodes per coordinate)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)
    weights = weights / weights.sum()
    total = 0.0
    for idx in itertools.product(range(3), repeat=d):
        z = sigma * torch.tensor([nodes[i] for i in idx], dtype=DT)
        total = total + math.prod(weights[i] for i in idx) * fn(z)
    return total


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_closed_form_is_the_gaussian_expectation_of_the_quadratic_model(sigma):
    loss, theta, x, y = _problem()
    values, b, c, _ = _dense(loss, theta, x, y, d=3)

    def squared_increments(z):
        quadratic = values + b @ z + 0.5 * torch.einsum("i,nij,j->n", z, c, z)
        return convergence.loss_differences(quadratic) ** 2

    exact = _gauss_hermite(squared_increments, 3, sigma)
    closed = stabilization.subspace_criterion(values, b, c, sigma)
    assert torch.allclose(closed, exact, rtol=1e-12, atol=0)
    # every term matters at these scales: the curvature terms are not negligible against the value term
    no_curvature = stabilization.subspace_criterion(values, b, 0 * c, sigma)
    assert (closed - no_curvature).abs().max() > 1e-3 * closed.max()


def test_spectral_form_and_any_orthonormal_basis():
    """The closed form depends on U only through U^T g_i and U^T H_i U: rotating U inside its span changes
    nothing, and the eigenvalue form of the docstring gives the same number."""
    loss, theta, x, y = _problem()
    values, b, c, _ = _dense(loss, theta, x, y, d=3)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=DT))
    rotated = stabilization.subspace_criterion(values, b @ q, q.T @ c @ q, 0.8)
    assert torch.allclose(rotated, stabilization.subspace_criterion(values, b, c, 0.8), rtol=1e-12)
    k = 5  # the spectral form at one k
    a = values[k] - values[:k].mean()
    bk, ck = b[k] - b[:k].mean(0), c[k] - c[:k].mean(0)
    mu, e = torch.linalg.eigh(ck)
    s2 = 0.8**2
    spectral = ((a + s2 / 2 * mu.sum()) ** 2 + s2 * ((bk @ e) ** 2).sum() + s2**2 / 2 * (mu**2).sum()) / (
        k + 1
    ) ** 2
    assert torch.allclose(stabilization.subspace_criterion(values, b, c, 0.8)[k - 1], spectral, rtol=1e-12)


@pytest.mark.parametrize("d", [2, 28])
def test_closed_form_against_direct_monte_carlo_on_the_model(d):
    """Direct Monte Carlo with the network's true losses (no Taylor model) at w* + Uz, in the top-2 subspace
    and in the full 28-dimensional space (U = I): within 4 standard errors plus the O(σ³) model error."""
    loss, theta, x, y = _problem()
    values, b, c, u = _dense(loss, theta, x, y, d=d)
    sigma = 0.03
    closed = stabilization.subspace_criterion(values, b, c, sigma)
    z = stabilization.gaussian_probes(4000, d, sigma, torch.Generator().manual_seed(1))
    losses = vmap(lambda t: vmap(loss, (None, 0, 0))(t, x, y))(theta + z @ u.T)
    mc, stderr = stabilization.monte_carlo_criterion(losses)
    assert torch.all((mc - closed).abs() <= 4 * stderr + 0.05 * closed)
    # the value term alone (σ = 0) is far off: the probes see the curvature
    assert ((stabilization.subspace_criterion(values, b, c, 0.0) - mc).abs() / stderr).max() > 10


def test_probe_variance_is_the_expected_sample_variance():
    loss, theta, x, y = _problem()
    values, b, c, _ = _dense(loss, theta, x, y, d=3)
    for sigma in (0.0, 0.5, 2.0):

        def sample_variance(z):
            return (values + b @ z + 0.5 * torch.einsum("i,nij,j->n", z, c, z)).var()

        exact = _gauss_hermite(sample_variance, 3, sigma)
        assert torch.allclose(stabilization.probe_variance(values, b, c, sigma), exact, rtol=1e-12)
    assert torch.allclose(stabilization.probe_variance(values, b, c, 0.0), values.var(), rtol=1e-12)


def test_expected_criterion_for_iid_samples():
    """E[(L_{k+1} - L_k)^2] = Var(l) / (k (k+1)) for i.i.d. losses (simulated: the running mean's k^-2)."""
    g = torch.Generator().manual_seed(3)
    losses = 2.0 + 1.5 * torch.randn(20000, 9, generator=g, dtype=DT)
    observed = torch.stack([convergence.loss_differences(row) for row in losses]).square().mean(0)
    k = torch.arange(1, 9, dtype=DT)
    expected = stabilization.expected_criterion(k, 1.5**2)
    assert torch.allclose(observed, expected, rtol=0.05)
    assert stabilization.expected_criterion(3, 12.0) == 1.0
    with pytest.raises(ValueError, match="k"):
        stabilization.expected_criterion(0, 1.0)


def test_monte_carlo_criterion_and_probes():
    losses = torch.tensor([[1.0, 3.0, 2.0], [0.0, 2.0, 4.0]], dtype=DT)
    mean, stderr = stabilization.monte_carlo_criterion(losses)
    rows = [convergence.loss_differences(r) ** 2 for r in losses]
    assert torch.allclose(mean, (rows[0] + rows[1]) / 2)
    assert torch.allclose(stderr, torch.stack(rows).std(0) / math.sqrt(2))
    assert torch.isnan(stabilization.monte_carlo_criterion(losses[:1])[1]).all()
    z = stabilization.gaussian_probes(6, 4, 0.5, torch.Generator().manual_seed(0))
    assert z.shape == (6, 4) and torch.equal(z[:3], -z[3:])


def test_bad_input_says_what_to_do():
    v, b, c = torch.zeros(4, dtype=DT), torch.zeros(4, 2, dtype=DT), torch.zeros(4, 2, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"\(n, D, D\)"):
        stabilization.subspace_criterion(v, b, c[:, :1], 1.0)
    with pytest.raises(ValueError, match="n >= 2"):
        stabilization.probe_variance(v[:1], b[:1], c[:1], 1.0)
    with pytest.raises(ValueError, match="sigma"):
        stabilization.subspace_criterion(v, b, c, -1.0)
    with pytest.raises(ValueError, match="probes, samples"):
        stabilization.monte_carlo_criterion(torch.zeros(3))
    with pytest.raises(ValueError, match="even"):
        stabilization.gaussian_probes(3, 2, 1.0)


def test_order_average_of_the_closed_form_is_the_probe_variance_rate():
    """Averaged over every order of a finite set of n samples (sampling without replacement), the closed form
    is exactly S_D / (k (k+1)) with S_D = probe_variance (denominator n - 1): the live estimator's target."""
    loss, theta, x, y = _problem(n=6)
    values, b, c, _ = _dense(loss, theta, x, y, d=2)
    orders = [list(p) for p in itertools.permutations(range(6))]
    average = torch.stack(
        [stabilization.subspace_criterion(values[p], b[p], c[p], 0.7) for p in orders]
    ).mean(0)
    k = torch.arange(1, 6, dtype=DT)
    expected = stabilization.expected_criterion(k, stabilization.probe_variance(values, b, c, 0.7))
    assert torch.allclose(average, expected, rtol=1e-12)
