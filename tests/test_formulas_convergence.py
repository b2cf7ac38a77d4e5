"""[P] Thm 7 and the loss-difference identity (docs/formulas.md §6) on synthetic problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_hessian.formulas import convergence

DT = torch.float64

# torch's forward-mode AD (jacfwd) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def test_loss_differences_are_prefix_mean_differences():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(30, generator=g, dtype=DT)
    means = torch.stack([losses[:k].mean() for k in range(1, 31)])
    assert torch.allclose(convergence.loss_differences(losses), means[1:] - means[:-1], atol=1e-14)
    out = convergence.loss_difference_terms(losses)
    assert set(out) == {"k", "observed"}
    assert out["k"].tolist() == list(range(1, 30))


def test_theorem7_bound_formula():
    assert convergence.theorem7_bound(3, 1.0, 2.0, 0.5) == 2 * 1.0 / 4 + 2.0 * 0.25 / 4
    k = torch.arange(1, 5, dtype=DT)
    bound = convergence.theorem7_bound(k, 1.0, 2.0, 0.5)
    assert torch.allclose(bound, (2 + 0.5) / (k + 1))


def test_bound_and_identity_on_noise_free_regression():
    """l_i(w) = (x_i^T w - y_i)^2 with y = X w*: Assumption 1 holds exactly, the identity has no remainder and
    |L_{k+1}(w) - L_k(w)| <= 2 l_max/(k+1) + M ||w - w*||^2/(k+1) with M = max_i ||2 x_i x_i^T||."""
    g = torch.Generator().manual_seed(1)
    n, p = 60, 4
    x = torch.randn(n, p, generator=g, dtype=DT)
    w_star = torch.randn(p, generator=g, dtype=DT)
    y = x @ w_star
    for scale in (0.1, 1.0, 10.0):
        d = scale * torch.randn(p, generator=g, dtype=DT)
        losses = (x @ (w_star + d) - y) ** 2
        quad = 2 * (x @ d) ** 2  # D^T H_i D
        out = convergence.loss_difference_terms(
            losses, torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT), quad
        )
        assert out["remainder"].abs().max() < 1e-10 * max(1.0, float(out["observed"].abs().max()))
        assert torch.allclose(out["observed"], out["curvature"], atol=1e-12 * scale**2)
        m_bound = float((2 * (x * x).sum(1)).max())
        bound = convergence.theorem7_bound(out["k"].to(DT), 0.0, m_bound, float(d.norm()))
        assert torch.all(out["observed"].abs() <= bound * (1 + 1e-12))


def test_identity_terms_on_noisy_regression():
    """w* minimises the full data set only: the gradient term is needed; quadratics leave no remainder."""
    g = torch.Generator().manual_seed(2)
    n, p = 50, 3
    x = torch.randn(n, p, generator=g, dtype=DT)
    y = x @ torch.randn(p, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    w_star = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    d = 0.3 * torch.randn(p, generator=g, dtype=DT)
    resid = x @ w_star - y
    out = convergence.loss_difference_terms(
        (x @ (w_star + d) - y) ** 2,
        losses_at_optimum=resid**2,
        directional_gradients=2 * resid * (x @ d),
        quadratic_forms=2 * (x @ d) ** 2,
    )
    assert out["remainder"].abs().max() < 1e-12
    assert out["gradient"].abs().max() > 1e-3  # Assumption 1 fails for prefixes here
    # At w = w* the curvature term vanishes and the identity is trivial (the caveat of docs/formulas.md §6).
    at_opt = convergence.loss_difference_terms(
        resid**2, resid**2, torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT)
    )
    assert torch.allclose(at_opt["observed"], at_opt["value"], atol=1e-14)


def test_remainder_is_third_order_for_logistic_loss():
    g = torch.Generator().manual_seed(3)
    n, p = 40, 3
    x = torch.randn(n, p, generator=g, dtype=DT)
    labels = torch.sign(torch.randn(n, generator=g, dtype=DT))
    w_star = torch.randn(p, generator=g, dtype=DT)
    direction = torch.randn(p, generator=g, dtype=DT)

    def per_sample(w):
        return F.softplus(-labels * (x @ w))

    grads = torch.func.jacrev(per_sample)(w_star)  # (n, p)
    hessians = torch.func.jacfwd(torch.func.jacrev(per_sample))(w_star)  # (n, p, p)

    def remainder(eps):
        d = eps * direction
        out = convergence.loss_difference_terms(
            per_sample(w_star + d), per_sample(w_star), grads @ d, torch.einsum("i,nij,j->n", d, hessians, d)
        )
        return float(out["remainder"].abs().max())

    r1, r2 = remainder(1e-2), remainder(5e-3)
    assert 0.1 < r2 / r1 < 0.15  # O(||D||^3): halving D divides the remainder by about 8
