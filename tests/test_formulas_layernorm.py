"""LayerNorm formulas ([P] Thm 2-3 and lemma; docs/formulas.md §4) against autograd; bounds' validity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_hessian.formulas import layernorm as ln

DT = torch.float64

# torch's forward-mode AD (jacfwd) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
TOL = 1e-10
CASES = [  # (L, d, eps, affine)
    (3, 4, 0.0, False),
    (2, 5, 0.1, True),
    (4, 3, 1e-3, True),
    (3, 2, 0.0, False),
    (2, 6, 0.0, True),
    (5, 3, 0.5, False),
]


def _draw(L, d, affine, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(L, d, generator=g, dtype=DT)
    gamma = torch.randn(d, generator=g, dtype=DT) if affine else None
    beta = torch.randn(d, generator=g, dtype=DT) if affine else None
    return X, gamma, beta


def _autograd(X, gamma, beta, eps):
    L, d = X.shape

    def f(x):
        return F.layer_norm(x, (d,), gamma, beta, eps).reshape(-1)

    jac = torch.func.jacrev(f)(X).reshape(L * d, L * d)
    hess = torch.func.jacfwd(torch.func.jacrev(f))(X).reshape(L * d, L * d, L * d)
    return jac, hess


@pytest.mark.parametrize("case", CASES)
def test_forward_jacobian_hessian_match_autograd(case):
    L, d, eps, affine = case
    X, gamma, beta = _draw(L, d, affine, seed=L * 10 + d)
    jac, hess = _autograd(X, gamma, beta, eps)
    assert (ln.layernorm(X, gamma, beta, eps) - F.layer_norm(X, (d,), gamma, beta, eps)).abs().max() < TOL
    assert (ln.jacobian(X, gamma, eps, dense=True) - jac).abs().max() < TOL
    assert (ln.hessian(X, gamma, eps, dense=True) - hess.reshape((L * d) ** 2, L * d)).abs().max() < TOL
    # Per-row forms are the diagonal blocks; rows do not interact.
    rows_j = ln.jacobian(X, gamma, eps)
    rows_h = ln.hessian(X, gamma, eps)
    for i in range(L):
        sl = slice(i * d, (i + 1) * d)
        assert (rows_j[i] - jac[sl, sl]).abs().max() < TOL
        assert (rows_h[i] - hess[sl, sl, sl]).abs().max() < TOL
    # Exact norms: the flat norm of the (Ld)^2 x Ld second derivative, the spectral norm of the Jacobian.
    assert abs(ln.jacobian_norm(X, gamma, eps) - float(torch.linalg.matrix_norm(jac, 2))) < TOL
    flat = float(torch.linalg.matrix_norm(hess.reshape((L * d) ** 2, L * d), 2))
    assert abs(ln.hessian_norm(X, gamma, eps, chunk=2) - flat) < TOL


def test_paper_jacobian_form_matches_autograd():
    """[P] Thm 2's printed Kronecker form (no eps, no affine) is correct."""
    for L, d in [(3, 4), (2, 5), (4, 3)]:
        X, _, _ = _draw(L, d, False, seed=L + d)
        jac, _ = _autograd(X, None, None, 0.0)
        assert (ln.jacobian(X, variant="paper") - jac).abs().max() < TOL
    with pytest.raises(ValueError):
        ln.jacobian(X, eps=1e-5, variant="paper")


def test_jacobian_norm_is_max_inverse_std():
    X, _, _ = _draw(5, 7, False, seed=3)
    sigma = X.std(-1, unbiased=False)
    assert abs(ln.jacobian_norm(X) - float((1 / sigma).max())) < TOL
    assert abs(ln.jacobian_norm_bound(X) - float((1 / sigma).max())) < TOL


def _bilinear_norm_estimate(h_row, steps=60, restarts=4, seed=0):
    """Lower estimate of sup_{|a|=|b|=1} ||H[:, a, b]|| by alternating maximisation."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    d = h_row.shape[-1]
    for _ in range(restarts):
        b = torch.randn(d, generator=g, dtype=DT)
        b = b / b.norm()
        for _ in range(steps):
            m = torch.einsum("kab,b->ka", h_row, b)  # H[., ., b] as a map of a
            a = torch.linalg.svd(m)[2][0]
            m2 = torch.einsum("kab,a->kb", h_row, a)
            b = torch.linalg.svd(m2)[2][0]
        best = max(best, float(torch.einsum("kab,a,b->k", h_row, a, b).norm()))
    return best


def test_norm_bounds_hold_and_paper_lemma_is_loose():
    g = torch.Generator().manual_seed(7)
    ratios_flat, ratios_paper, ratios_jac_paper = [], [], []
    for trial in range(120):
        L = int(torch.randint(1, 5, (1,), generator=g))
        d = int(torch.randint(2, 9, (1,), generator=g))
        eps = [0.0, 1e-3, 0.3][trial % 3]
        scale = float(10 ** torch.empty(1).uniform_(-1, 1, generator=g))
        X = scale * torch.randn(L, d, generator=g, dtype=DT)
        gamma = torch.randn(d, generator=g, dtype=DT) if trial % 2 else None
        exact_flat = ln.hessian_norm(X, gamma, eps)
        assert exact_flat <= ln.hessian_norm_bound(X, gamma, eps) * (1 + 1e-9)
        exact_jac = ln.jacobian_norm(X, gamma, eps)
        assert exact_jac <= ln.jacobian_norm_bound(X, gamma, eps) * (1 + 1e-9)
        ratios_flat.append(exact_flat / ln.hessian_norm_bound(X, gamma, eps))
        if eps == 0.0 and gamma is None and d >= 3:
            paper = ln.hessian_norm_bound(X, variant="paper")
            assert exact_flat <= paper
            ratios_paper.append(exact_flat / paper)
            ratios_jac_paper.append(exact_jac / ln.jacobian_norm_bound(X, variant="paper"))
        # The bilinear bound 3 max|γ| ρ / (d σ^2) <= 3 max|γ| / (sqrt(d) σ^2) (docs/formulas.md §4).
        rows = ln.hessian(X, gamma, eps)
        for i in range(L):
            est = _bilinear_norm_estimate(rows[i], steps=20, restarts=2, seed=trial)
            assert est <= ln.hessian_norm_bound(X[i : i + 1], gamma, eps, kind="bilinear") * (1 + 1e-9)
            assert est <= exact_flat * (1 + 1e-9)  # bilinear norm <= flat norm
    assert max(ratios_flat) > 0.25  # the corrected flat bound is within a small factor
    assert max(ratios_paper) < 0.5  # the paper's lemma is loose (typically by one to two orders)
    assert max(ratios_jac_paper) < 1.0


def test_three_over_sqrt_d_is_not_a_flat_bound_for_large_d():
    """3/(sqrt(d) σ^2) bounds the bilinear norm only; the flat (n^2 x n) norm used by [P] Thm 5-6 grows to
    about 1/σ^2."""
    X, _, _ = _draw(2, 32, False, seed=9)
    sigma_min = float(X.std(-1, unbiased=False).min())
    assert ln.hessian_norm(X) > 3 / (math.sqrt(32) * sigma_min**2)
    assert ln.hessian_norm(X) <= ln.hessian_norm_bound(X, kind="flat")


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_param_hessian_matches_autograd(eps):
    L, d = 4, 3
    X, gamma, beta = _draw(L, d, True, seed=17)
    target = torch.randn(L, d, dtype=DT)

    def loss(theta):
        gm, bt = theta[:d], theta[d:]
        return ((F.layer_norm(X, (d,), gm, bt, eps) - target) ** 2).sum() / (L * d)

    hess = torch.func.hessian(loss)(torch.cat([gamma, beta]))
    blocks = ln.param_hessian(X, eps)
    assert (blocks[("gamma", "gamma")] - hess[:d, :d]).abs().max() < TOL
    assert (blocks[("gamma", "beta")] - hess[:d, d:]).abs().max() < TOL
    assert (blocks[("beta", "gamma")] - hess[d:, :d]).abs().max() < TOL
    assert (blocks[("beta", "beta")] - hess[d:, d:]).abs().max() < TOL


def test_invalid_arguments():
    X, _, _ = _draw(2, 3, False, seed=1)
    with pytest.raises(ValueError):
        ln.hessian_norm_bound(X, kind="spectral")
    with pytest.raises(ValueError):
        ln.hessian_norm_bound(X, variant="printed")
    with pytest.raises(ValueError):
        ln.jacobian_norm_bound(X, variant="printed")
    with pytest.raises(ValueError):
        ln.jacobian(X, variant="printed")
