"""Stability thresholds, Adam's preconditioner and block heterogeneity (docs/formulas.md §7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from lightning_hessian.formulas import stability

DT = torch.float64


def test_threshold_values():
    assert stability.sgd_threshold(0.1) == pytest.approx(20.0)
    assert stability.adam_threshold(0.01, 0.9) == pytest.approx(3800.0)  # 38 / lr
    assert stability.adam_threshold(0.5, 0.0) == pytest.approx(stability.sgd_threshold(0.5))
    with pytest.raises(ValueError):
        stability.sgd_threshold(0.0)
    with pytest.raises(ValueError):
        stability.adam_threshold(0.1, 1.0)


def _max_abs_after(step, w0, iters=3000):
    w = w0.clone()
    state = None
    for _ in range(iters):
        w, state = step(w, state)
    return float(w.abs().max())


def test_gd_threshold_separates_stable_from_divergent():
    lr = 0.1
    for factor, stable in [(0.98, True), (1.02, False)]:
        lam = factor * stability.sgd_threshold(lr)
        h = torch.diag(torch.tensor([lam, 0.5 * lam, 1.0], dtype=DT))

        def step(w, state, h=h):
            return w - lr * h @ w, state

        assert (_max_abs_after(step, torch.ones(3, dtype=DT)) < 1.0) == stable


def test_adam_threshold_separates_stable_from_divergent():
    """Adam with a frozen preconditioner is EMA-momentum GD on P^{-1} H: stable iff λ_max(P^{-1} H) is below
    (2 + 2 β_1) / ((1 - β_1) η)."""
    lr, beta1 = 0.01, 0.9
    g = torch.Generator().manual_seed(0)
    p_diag = torch.rand(4, generator=g, dtype=DT) + 0.5
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    for factor, stable in [(0.98, True), (1.02, False)]:
        top = factor * stability.adam_threshold(lr, beta1)
        s_mat = q @ torch.diag(torch.tensor([top, 0.3 * top, 0.1 * top, 1.0], dtype=DT)) @ q.T
        h = p_diag.sqrt()[:, None] * s_mat * p_diag.sqrt()[None, :]  # P^{-1} H is similar to s_mat
        op = stability.preconditioned_matvec(lambda v, h=h: h @ v, p_diag)
        dense = torch.stack([op(e) for e in torch.eye(4, dtype=DT)], 1)
        assert abs(float(torch.linalg.eigvalsh(dense).max()) - top) < 1e-8 * top

        def step(w, m, h=h):
            m = torch.zeros_like(w) if m is None else m
            m = beta1 * m + (1 - beta1) * (h @ w)
            return w - lr * m / p_diag, m

        assert (_max_abs_after(step, torch.ones(4, dtype=DT), iters=6000) < 1.0) == stable


def test_adam_preconditioner_reproduces_torch_adam_update():
    g = torch.Generator().manual_seed(1)
    lr, betas, eps = 0.05, (0.9, 0.99), 1e-6
    param = torch.nn.Parameter(torch.randn(7, generator=g, dtype=DT))
    opt = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    for _ in range(5):
        before = param.detach().clone()
        param.grad = torch.randn(7, generator=g, dtype=DT)
        opt.step()
        state = opt.state[param]
        p_diag = stability.adam_preconditioner(state["exp_avg_sq"], state["step"], *betas, eps)
        expected = before - lr * state["exp_avg"] / p_diag
        assert torch.allclose(param.detach(), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        stability.adam_preconditioner(state["exp_avg_sq"], 0)


def test_preconditioned_matvec_has_the_eigenvalues_of_p_inverse_h():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 5, generator=g, dtype=DT)
    h = a @ a.T - 2 * torch.eye(5, dtype=DT)
    p_diag = torch.rand(5, generator=g, dtype=DT) + 0.1
    op = stability.preconditioned_matvec(lambda v: h @ v, p_diag)
    sym = torch.stack([op(e) for e in torch.eye(5, dtype=DT)], 1)
    assert torch.allclose(sym, sym.T, atol=1e-12)
    expected = torch.sort(torch.linalg.eigvals(torch.diag(1 / p_diag) @ h).real).values
    assert torch.allclose(torch.linalg.eigvalsh(sym), expected, atol=1e-10)


def test_block_heterogeneity():
    grid = np.linspace(0, 1, 101)
    bump = np.exp(-((grid - 0.3) ** 2) / 0.01)
    assert stability.block_heterogeneity([bump, bump, bump], grid=grid) == pytest.approx(0.0, abs=1e-12)
    left = (grid < 0.4).astype(float)
    right = (grid > 0.6).astype(float)
    # Disjoint supports: the maximum, sqrt(ln 2) with natural logarithms and 1 with base 2.
    assert stability.block_heterogeneity([left, right]) == pytest.approx(math.sqrt(math.log(2)))
    assert stability.block_heterogeneity([left, right], base=2) == pytest.approx(1.0)
    # Agrees with scipy's Jensen-Shannon distance, averaged over pairs.
    rng = np.random.default_rng(0)
    dens = [rng.random(50) for _ in range(4)]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.mean([jensenshannon(dens[i], dens[j]) for i, j in pairs])
    assert stability.block_heterogeneity(torch.tensor(np.stack(dens))) == pytest.approx(expected, rel=1e-10)
    assert stability.jensen_shannon_distance(dens[0], dens[1], base=2) == pytest.approx(
        jensenshannon(dens[0], dens[1], base=2), rel=1e-10
    )
    # (grid, values) pairs on different grids: interpolated onto the union grid.
    g1 = np.linspace(0, 1, 11)
    g2 = np.linspace(0, 1, 21)
    same = stability.block_heterogeneity([(g1, np.ones(11)), (g2, np.ones(21))])
    assert same == pytest.approx(0.0, abs=1e-12)
    apart = stability.block_heterogeneity(
        [(np.linspace(0, 1, 11), np.ones(11)), (np.linspace(2, 3, 7), np.ones(7))]
    )
    assert apart == pytest.approx(math.sqrt(math.log(2)))
    with pytest.raises(ValueError):
        stability.block_heterogeneity([bump])
    with pytest.raises(ValueError):
        stability.block_heterogeneity([bump, -bump])
