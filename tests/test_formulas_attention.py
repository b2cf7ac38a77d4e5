"""Self-attention formulas ([O] Thm 3.1-3.2, [P] Thm 1) against autograd, and the bounds' validity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_hessian.formulas import HessianBlock, attention
from lightning_hessian.formulas._linalg import (
    commutation,
    kron,
    softmax_hessian,
    softmax_jacobian,
    vec_r_col,
)

DT = torch.float64

# torch's forward-mode AD (jacfwd) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
TOL = 1e-10
SHAPES = [(2, 2, 2), (3, 2, 3), (4, 3, 2), (5, 4, 3), (3, 4, 4)]  # (L, d_V, d_K)


def _draw(L, d, dk, seed, x_scale=1.0, batch=()):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*batch, *s, generator=g, dtype=DT)

    return r(L, d) * x_scale, r(d, dk), r(d, dk), r(d, d), r(L, d)


def _reference(X, W_Q, W_K, W_V, target, tau=None):
    """Autograd: loss Hessian, Jacobian of vec_r(F) and second derivative of vec_r(F), in θ = (Q, K, V)."""
    shapes = [W_Q.shape, W_K.shape, W_V.shape]
    sizes = [w.numel() for w in (W_Q, W_K, W_V)]

    def f_of(theta):
        q, k, v = (p.reshape(s) for p, s in zip(torch.split(theta, sizes), shapes, strict=True))
        return attention.forward(X, q, k, v, tau)["F"].reshape(-1)

    def loss(theta):
        return ((f_of(theta) - target.reshape(-1)) ** 2).sum() / target.numel()

    theta = torch.cat([W_Q.reshape(-1), W_K.reshape(-1), W_V.reshape(-1)])
    hess = torch.func.hessian(loss)(theta)
    jac = torch.func.jacrev(f_of)(theta)
    second = torch.func.jacfwd(torch.func.jacrev(f_of))(theta)
    slices, start = {}, 0
    for name, n in zip("QKV", sizes, strict=True):
        slices[name] = slice(start, start + n)
        start += n
    return hess, jac, second, slices


def _dense_from_matvec(X, W_Q, W_K, W_V, target, block, part, tau=None, mask=None):
    """Dense block built from matrix-free products with all basis vectors at once (batched)."""
    w = {"Q": W_Q, "K": W_K, "V": W_V}[block[1]]
    shape = w.shape[-2:]
    n_b = shape[0] * shape[1]
    basis = torch.eye(n_b, dtype=DT).reshape(n_b, *shape)
    lead = X.dim() - 2
    expand = [t.unsqueeze(lead) for t in (X, W_Q, W_K, W_V, target)]
    cols = attention.hessian_matvec(*expand, basis, block=block, part=part, tau=tau, mask=mask)
    return cols.reshape(*cols.shape[:-2], -1).transpose(-1, -2)


# ----------------------------------------------------------------------------------------------------------
# Conventions and building blocks
# ----------------------------------------------------------------------------------------------------------


def test_vec_r_and_commutation_conventions():
    g = torch.Generator().manual_seed(0)
    a, x, b = (torch.randn(*s, generator=g, dtype=DT) for s in ((3, 4), (4, 5), (5, 2)))
    assert torch.allclose((a @ x @ b).reshape(-1), kron(a, b.T) @ x.reshape(-1), atol=TOL)
    m = torch.randn(3, 5, generator=g, dtype=DT)  # B is n x m = 3 x 5, so K_{5,3}
    assert torch.equal(commutation(5, 3, m) @ m.reshape(-1), m.T.reshape(-1))
    # S maps vec_r(M) to vec_r(M ⊗ I_d) row by row: (I_L ⊗ S) vec_r(M) = vec_r(M ⊗ I_d) for M of shape L x d.
    d, n = 3, 2
    s_mat = attention.shuffle_matrix(d, m)
    assert s_mat.shape == (d**3, d)
    mm = torch.randn(n, d, generator=g, dtype=DT)
    assert torch.allclose(
        kron(torch.eye(n, dtype=DT), s_mat) @ mm.reshape(-1), kron(mm, torch.eye(d, dtype=DT)).reshape(-1)
    )


def test_softmax_derivatives_match_autograd():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 4, generator=g, dtype=DT) * 2

    def sm(x):
        return torch.softmax(x.reshape(4, 4), -1).reshape(-1)

    a = torch.softmax(t, -1)
    jac = torch.func.jacrev(sm)(t.reshape(-1))
    assert torch.allclose(softmax_jacobian(a), jac, atol=TOL)
    second = torch.func.jacfwd(torch.func.jacrev(sm))(t.reshape(-1))  # [(i,j), (i',k), (i'',l)]
    assert torch.allclose(softmax_hessian(a), second.reshape(16 * 16, 16), atol=TOL)
    # s = ||dA/dT||_2 exactly, and s_2 bounds ||d^2A/dT^2||_2, for random and peaked rows.
    for scale in (0.1, 1.0, 5.0, 50.0):
        a = torch.softmax(torch.randn(5, 5, generator=g, dtype=DT) * scale, -1)
        s = attention.softmax_jacobian_norm(a)
        assert abs(float(s) - float(torch.linalg.matrix_norm(softmax_jacobian(a), 2))) < TOL
        assert float(s) <= 0.5 + TOL
        exact2 = float(torch.linalg.matrix_norm(softmax_hessian(a), 2))
        assert exact2 <= float(attention.softmax_hessian_norm_bound(a)) * (1 + 1e-9)
        assert exact2 <= 6.0  # [P]'s constant is valid, merely loose


def test_z1_row_blocks_are_attention_covariances():
    X, W_Q, W_K, W_V, _ = _draw(4, 3, 2, seed=2)
    a = attention.forward(X, W_Q, W_K, W_V)["A"]
    z = attention.z1(X, a)
    d = X.shape[1]
    for i in range(X.shape[0]):
        ai = a[i]
        c_i = X.T @ torch.diag(ai) @ X - torch.outer(X.T @ ai, X.T @ ai)
        assert torch.allclose(z[i * d : (i + 1) * d], kron(X[i : i + 1], c_i), atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# Dense formulas against autograd
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [None, 2.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_formulas_match_autograd(shape, tau):
    L, d, dk = shape
    X, W_Q, W_K, W_V, target = _draw(L, d, dk, seed=10 * L + d + dk)
    hess, jac, second, sl = _reference(X, W_Q, W_K, W_V, target, tau)
    jacs = attention.jacobians(X, W_Q, W_K, W_V, tau)
    phis = attention.second_derivatives(X, W_Q, W_K, W_V, tau)
    blocks = attention.hessian_blocks(X, W_Q, W_K, W_V, target, tau)
    c = 2.0 / (L * d)
    assert set(blocks) == {(a, b) for a in "QKV" for b in "QKV"}
    for a in "QKV":
        assert (jacs[a] - jac[:, sl[a]]).abs().max() < TOL
        for b in "QKV":
            n_b = sl[b].stop - sl[b].start
            ref_phi = second[:, sl[a], sl[b]].reshape(-1, n_b)
            assert (phis[(a, b)] - ref_phi).abs().max() < TOL, (a, b)
            blk = blocks[(a, b)]
            assert isinstance(blk, HessianBlock)
            assert (blk.total - hess[sl[a], sl[b]]).abs().max() < TOL, (a, b)
            assert (blk.outer - c * jac[:, sl[a]].T @ jac[:, sl[b]]).abs().max() < TOL, (a, b)
            # H_f = c R_{n_a} Φ_ab ([P] appendix lemma), checked against the contracted [O] forms.
            n_a = sl[a].stop - sl[a].start
            r_mat = kron(
                vec_r_col(attention.forward(X, W_Q, W_K, W_V, tau)["F"] - target).T, torch.eye(n_a, dtype=DT)
            )
            assert (blk.functional - c * r_mat @ phis[(a, b)]).abs().max() < TOL, (a, b)
    assert blocks[("V", "V")].functional.abs().max() == 0


# ----------------------------------------------------------------------------------------------------------
# Matrix-free forms
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_matvec_matches_dense(shape):
    L, d, dk = shape
    X, W_Q, W_K, W_V, target = _draw(L, d, dk, seed=100 + L)
    blocks = attention.hessian_blocks(X, W_Q, W_K, W_V, target, tau=1.7)
    weights = {"Q": W_Q, "K": W_K, "V": W_V}
    g = torch.Generator().manual_seed(3)
    for a in "QKV":
        for b in "QKV":
            for part in ("outer", "functional", "total"):
                dense = getattr(blocks[(a, b)], part)
                built = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, b), part, tau=1.7)
                assert (built - dense).abs().max() < TOL, (a, b, part)
            # Flat and matrix-shaped directions, with a batch of three.
            v = torch.randn(3, *weights[b].shape, generator=g, dtype=DT)
            out_m = attention.hessian_matvec(X, W_Q, W_K, W_V, target, v, block=(a, b), tau=1.7)
            out_f = attention.hessian_matvec(
                X, W_Q, W_K, W_V, target, v.reshape(3, -1), block=(a, b), tau=1.7
            )
            ref = v.reshape(3, -1) @ blocks[(a, b)].total.T
            assert out_m.shape == (3, *weights[a].shape)
            assert (out_m.reshape(3, -1) - ref).abs().max() < TOL
            assert (out_f - ref).abs().max() < TOL


def test_block_and_jacobian_norms_match_dense():
    X, W_Q, W_K, W_V, target = _draw(4, 3, 2, seed=7)
    blocks = attention.hessian_blocks(X, W_Q, W_K, W_V, target)
    for a in "QKV":
        for b in "QKV":
            for part in ("outer", "functional", "total"):
                dense = getattr(blocks[(a, b)], part)
                two = attention.hessian_block_norm(X, W_Q, W_K, W_V, target, (a, b), part, ord=2)
                fro = attention.hessian_block_norm(X, W_Q, W_K, W_V, target, (a, b), part, ord="fro")
                assert abs(two - float(torch.linalg.matrix_norm(dense, 2))) < 1e-9 * max(1.0, two), (
                    a,
                    b,
                    part,
                )
                assert abs(fro - float(torch.linalg.matrix_norm(dense))) < 1e-9 * max(1.0, fro), (a, b, part)
    jacs = attention.jacobians(X, W_Q, W_K, W_V)
    norms = attention.jacobian_norms(X, W_Q, W_K, W_V)
    for a in "QKV":
        assert abs(norms[a] - float(torch.linalg.matrix_norm(jacs[a], 2))) < 1e-9 * max(1.0, norms[a])
    with pytest.raises(ValueError):
        attention.hessian_block_norm(X, W_Q, W_K, W_V, target, ("Q", "X"))
    with pytest.raises(ValueError):
        attention.hessian_block_norm(X, W_Q, W_K, W_V, target, ord=1)
    with pytest.raises(ValueError):
        attention.hessian_matvec(X, W_Q, W_K, W_V, target, W_Q, part="gauss-newton")
    with pytest.raises(ValueError):
        attention.hessian_matvec(X, W_Q, W_K, W_V, target, torch.ones(5, dtype=DT))


def test_matrix_free_at_realistic_size():
    """L = 128, d = 64: nothing of size (d_V d_K)^2 or Z_2 is formed; the norms are consistent."""
    g = torch.Generator().manual_seed(11)
    L, d = 128, 64
    X = torch.randn(L, d, generator=g, dtype=DT)
    W_Q, W_K, W_V = (torch.randn(d, d, generator=g, dtype=DT) / math.sqrt(d) for _ in range(3))
    target = torch.randn(L, d, generator=g, dtype=DT)
    two_a = attention.hessian_block_norm(X, W_Q, W_K, W_V, target, ("Q", "Q"), iters=30)
    two_b = attention.hessian_block_norm(X, W_Q, W_K, W_V, target, ("Q", "Q"), iters=60, seed=1)
    assert abs(two_a - two_b) < 1e-6 * two_b  # Lanczos has converged on the top eigenvalue
    v = torch.randn(d, d, generator=g, dtype=DT)
    hv = attention.hessian_matvec(X, W_Q, W_K, W_V, target, v, block=("Q", "Q"))
    assert float(hv.norm() / v.norm()) <= two_b * (1 + 1e-9)
    off = attention.hessian_block_norm(X, W_Q, W_K, W_V, target, ("V", "K"), part="outer", iters=40)
    assert off > 0
    norms = attention.jacobian_norms(X, W_Q, W_K, W_V, iters=40)
    a = attention.forward(X, W_Q, W_K, W_V)["A"]
    assert abs(norms["V"] - float(torch.linalg.matrix_norm(a @ X, 2))) < 1e-9 * norms["V"]
    # Outer part of the V-V block: c ||AX||_2^2 exactly.
    vv = attention.hessian_block_norm(X, W_Q, W_K, W_V, target, ("V", "V"), part="outer", iters=40)
    assert abs(vv - 2 / (L * d) * norms["V"] ** 2) < 1e-8 * vv


# ----------------------------------------------------------------------------------------------------------
# Bounds
# ----------------------------------------------------------------------------------------------------------


def _adversarial_batches():
    """Random draws plus peaked and two-point attention (duplicated rows at large input scale)."""
    cases = []
    seed = 1000
    for L, d, dk in [(2, 2, 2), (3, 2, 2), (4, 3, 2), (3, 3, 3), (5, 2, 2)]:
        for x_scale, dup in [(0.3, False), (1.0, False), (3.0, False), (3.0, True), (10.0, True)]:
            seed += 1
            X, W_Q, W_K, W_V, target = _draw(L, d, dk, seed, x_scale, batch=(200,))
            if dup:
                X[:, 1] = X[:, 0]  # two equal keys: each row's attention concentrates on two tokens
            cases.append((X, W_Q, W_K, W_V, target))
    for L in (3, 4, 6):  # perturbed two-point attention, the extremal case of the o_QQ bound
        g = torch.Generator().manual_seed(L)
        base = _two_point(L, lam=50.0)
        X, W_Q, W_K, W_V = (w + 0.05 * torch.randn(200, *w.shape, generator=g, dtype=DT) for w in base)
        cases.append((X, W_Q, W_K, W_V, torch.randn(200, L, 3, generator=g, dtype=DT)))
    return cases


def _true_norms(X, W_Q, W_K, W_V, target):
    out = {}
    for a in "QKV":
        for b in "QKV":
            outer = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, b), "outer")
            func = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, b), "functional")
            out[(a, b)] = {
                "outer": torch.linalg.matrix_norm(outer, 2),
                "functional": torch.linalg.matrix_norm(func, 2),
                "total": torch.linalg.matrix_norm(outer + func, 2),
            }
    return out


def test_corrected_bounds_never_violated():
    """5600 draws (random, peaked, duplicated keys, perturbed two-point attention): every corrected per-block
    bound holds, and so does M."""
    worst = 0.0
    n_draws = 0
    for X, W_Q, W_K, W_V, target in _adversarial_batches():
        true = _true_norms(X, W_Q, W_K, W_V, target)
        bounds = attention.block_bounds(X, W_Q, W_K, W_V, target, variant="corrected")
        for key, parts in true.items():
            for part, value in parts.items():
                bound = bounds[key][part]
                assert torch.all(value <= bound * (1 + 1e-9) + 1e-300), (key, part)
                ratio = value / bound.clamp_min(1e-300)
                worst = max(worst, float(ratio.max()))
        full_h = torch.cat(
            [
                torch.cat([_dense_from_matvec(X, W_Q, W_K, W_V, target, (a, b), "total") for b in "QKV"], -1)
                for a in "QKV"
            ],
            -2,
        )
        m = attention.hessian_bound(X, W_Q, W_K, W_V, target)
        assert torch.all(torch.linalg.matrix_norm(full_h, 2) <= m * (1 + 1e-9))
        n_draws += X.shape[0]
    assert n_draws >= 5600
    assert 0.9 < worst <= 1 + 1e-9  # tight: the V-V outer bound is exact


def _two_point(L, r=1.0, lam=200.0):
    """Every query row i >= 2 attends half-and-half to tokens x_0 = r e_1 and x_1 = -r e_1 (tied logits,
    all other logits -lam eps^2), so ||dA/dT|| = 1/2 and the attention covariance is r^2 e_1 e_1^T, while
    ||X||_2 stays sqrt(2) r. W_K = W_V = I: the query weights do not enter [P]'s o_QQ."""
    d = 3
    eps = math.sqrt(2 * r * r / (L - 2))
    X = torch.zeros(L, d, dtype=DT)
    X[0, 0], X[1, 0] = r, -r
    X[2:, 1] = eps
    W_Q = torch.zeros(d, d, dtype=DT)
    W_Q[1, 1] = -lam
    return X, W_Q, torch.eye(d, dtype=DT), torch.eye(d, dtype=DT)


@pytest.mark.parametrize("L", [4, 6, 8])
def test_paper_bounds_are_violated_by_two_point_attention(L):
    """[P]'s proof uses ||dA/dT|| <= 1/L; two-point attention has ||dA/dT|| = 1/2. The printed o_QQ is then
    exceeded by (L/2)^2 (9x at L = 6, docs/formulas.md §3), ||Z_1|| <= x^3/L by L/2, and the paper's ||G_Q||
    bound by L/2; the corrected bounds hold with equality."""
    X, W_Q, W_K, W_V = _two_point(L)
    target = _draw(L, 3, 3, seed=L)[4]
    a = attention.forward(X, W_Q, W_K, W_V)["A"]
    assert abs(float(attention.softmax_jacobian_norm(a)) - 0.5) < 1e-9
    x = float(torch.linalg.matrix_norm(X, 2))
    z1 = float(torch.linalg.matrix_norm(attention.z1(X, a), 2))
    assert z1 / (x**3 / L) > 0.99 * L / 2
    blocks = attention.hessian_blocks(X, W_Q, W_K, W_V, target)
    true_qq = float(torch.linalg.matrix_norm(blocks[("Q", "Q")].outer, 2))
    paper = attention.block_bounds(X, W_Q, W_K, W_V, target, variant="paper")[("Q", "Q")]["outer"]
    corrected = attention.block_bounds(X, W_Q, W_K, W_V, target)[("Q", "Q")]["outer"]
    assert true_qq / paper > 0.99 * (L / 2) ** 2
    assert 0.99 < true_qq / corrected <= 1 + 1e-9
    g_q = float(torch.linalg.matrix_norm(attention.jacobians(X, W_Q, W_K, W_V)["Q"], 2))
    assert g_q / attention.jacobian_bounds(X, W_Q, W_K, W_V, variant="paper")["Q"] > 0.99 * L / 2
    assert g_q <= attention.jacobian_bounds(X, W_Q, W_K, W_V)["Q"] * (1 + 1e-9)


def test_bound_api_and_consistency():
    X, W_Q, W_K, W_V, target = _draw(4, 3, 2, seed=21)
    blocks = attention.hessian_blocks(X, W_Q, W_K, W_V, target)
    for variant in ("corrected", "paper"):
        bounds = attention.block_bounds(X, W_Q, W_K, W_V, target, variant=variant)
        assert set(bounds) == set(blocks)
        for parts in bounds.values():
            assert set(parts) == {"outer", "functional", "total"}
            assert all(isinstance(v, float) for v in parts.values())
            assert abs(parts["total"] - parts["outer"] - parts["functional"]) < 1e-12 * max(
                1.0, parts["total"]
            )
        m = attention.hessian_bound(X, W_Q, W_K, W_V, target, variant=variant)
        assert abs(m - 3 * max(p["total"] for p in bounds.values())) < 1e-12 * m
        # Batched evaluation gives the same numbers.
        batched = attention.block_bounds(
            X[None], W_Q[None], W_K[None], W_V[None], target[None], variant=variant
        )
        assert (
            abs(float(batched[("Q", "K")]["total"][0]) - bounds[("Q", "K")]["total"])
            < 1e-12 * bounds[("Q", "K")]["total"]
        )
    corrected = attention.block_bounds(X, W_Q, W_K, W_V, target)
    vv = float(torch.linalg.matrix_norm(blocks[("V", "V")].outer, 2))
    assert abs(corrected[("V", "V")]["outer"] - vv) < 1e-12 * vv  # c ||AX||^2 is exact
    full = torch.cat([torch.cat([blocks[(a, b)].total for b in "QKV"], 1) for a in "QKV"], 0)
    assert float(torch.linalg.matrix_norm(full, 2)) <= attention.hessian_bound(X, W_Q, W_K, W_V, target)
    jb = attention.jacobian_bounds(X, W_Q, W_K, W_V)
    for name, jac in attention.jacobians(X, W_Q, W_K, W_V).items():
        assert float(torch.linalg.matrix_norm(jac, 2)) <= jb[name] * (1 + 1e-9)
    with pytest.raises(ValueError):
        attention.block_bounds(X, W_Q, W_K, W_V, target, variant="printed")


# ----------------------------------------------------------------------------------------------------------
# Scaling laws of docs/formulas.md §2
# ----------------------------------------------------------------------------------------------------------


def test_growth_slopes_with_input_scale():
    X, W_Q, W_K, W_V, target = _draw(4, 3, 3, seed=31)
    scales = np.logspace(-3, -2, 5)
    cases = {
        (("V", "V"), "outer"): 2,
        (("Q", "Q"), "outer"): 6,
        (("Q", "Q"), "functional"): 5,
        (("V", "Q"), "outer"): 4,
        (("V", "Q"), "functional"): 3,
        (("K", "K"), "total"): 5,
    }
    logs = {key: [] for key in cases}
    for s in scales:
        blocks = attention.hessian_blocks(float(s) * X, W_Q, W_K, W_V, target)
        for key in cases:
            logs[key].append(math.log(float(torch.linalg.matrix_norm(getattr(blocks[key[0]], key[1])))))
    for key, slope in cases.items():
        fitted = np.polyfit(np.log(scales), logs[key], 1)[0]
        assert abs(fitted - slope) < 0.1, (key, fitted)


def test_value_block_dominates_query_block_at_small_scale():
    X, W_Q, W_K, W_V, target = _draw(4, 3, 3, seed=31)

    def ratio(s):
        blocks = attention.hessian_blocks(s * X, W_Q, W_K, W_V, target)
        return float(
            torch.linalg.matrix_norm(blocks[("V", "V")].total)
            / torch.linalg.matrix_norm(blocks[("Q", "Q")].total)
        )

    small, unit = ratio(0.01), ratio(1.0)
    assert small > 1e4
    assert small / unit > 1e4  # H_VV ~ s^2 against H_QQ ~ s^5: the gap closes as the input grows


def test_temperature_scaling_at_fixed_attention():
    """Replacing sqrt(d_K) by τ with A fixed (W_Q scaled with τ): H_o(Q,Q) and the Z_2 term ~ τ^-2,
    H_o(V,Q) ~ τ^-1 (docs/formulas.md §2)."""
    X, W_Q, W_K, W_V, target = _draw(3, 3, 2, seed=41)
    t0 = math.sqrt(2)
    base = attention.hessian_blocks(X, W_Q, W_K, W_V, target, tau=t0)
    for alpha in (0.5, 3.0):
        other = attention.hessian_blocks(X, alpha * W_Q, W_K, W_V, target, tau=alpha * t0)
        assert torch.allclose(other[("Q", "Q")].outer, base[("Q", "Q")].outer / alpha**2, atol=TOL)
        assert torch.allclose(other[("Q", "Q")].functional, base[("Q", "Q")].functional / alpha**2, atol=TOL)
        assert torch.allclose(other[("V", "Q")].outer, base[("V", "Q")].outer / alpha, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# Beyond the papers' setting: one head of a multi-head layer (rectangular W_V) and attention masks
# ----------------------------------------------------------------------------------------------------------


def _masks(L, g):
    """No mask, causal, and a random mask with the diagonal kept (every row attends somewhere)."""
    random = (torch.rand(L, L, generator=g) < 0.5) | torch.eye(L, dtype=torch.bool)
    return {"none": None, "causal": torch.ones(L, L, dtype=torch.bool).tril(), "random": random}


def _independent_loss(X, shapes, target, mask):
    """The single-layer MSE written out independently of the package: masked softmax attention."""
    sizes = [math.prod(s) for s in shapes]

    def f_of(theta):
        q, k, v = (p.reshape(s) for p, s in zip(torch.split(theta, sizes), shapes, strict=True))
        scores = (X @ q) @ (X @ k).T / math.sqrt(q.shape[1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, -1) @ X @ v).reshape(-1)

    def loss(theta):
        return ((f_of(theta) - target.reshape(-1)) ** 2).sum() / target.numel()

    return f_of, loss, sizes


@pytest.mark.parametrize("mask_name", ["none", "causal", "random"])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (5, 4, 3, 1), (3, 2, 2, 4)])  # (L, d_V, d_K, d_O)
def test_rectangular_values_and_masks_match_autograd(shape, mask_name):
    """Products, Jacobian norms and c = 2/(L d_O) for W_V of shape d_V x d_O and masked attention."""
    L, d, dk, do = shape
    g = torch.Generator().manual_seed(L * 100 + do)
    X, W_Q, W_K = (torch.randn(*s, generator=g, dtype=DT) for s in ((L, d), (d, dk), (d, dk)))
    W_V, target = torch.randn(d, do, generator=g, dtype=DT), torch.randn(L, do, generator=g, dtype=DT)
    mask = _masks(L, g)[mask_name]
    f_of, loss, sizes = _independent_loss(X, [W_Q.shape, W_K.shape, W_V.shape], target, mask)
    theta = torch.cat([W_Q.reshape(-1), W_K.reshape(-1), W_V.reshape(-1)])
    hess = torch.func.hessian(loss)(theta)
    jac = torch.func.jacrev(f_of)(theta)
    gn = 2.0 / (L * do) * jac.T @ jac
    edges = np.cumsum([0, *sizes])
    sl = {n: slice(int(edges[i]), int(edges[i + 1])) for i, n in enumerate("QKV")}
    assert torch.allclose(attention.forward(X, W_Q, W_K, W_V, mask=mask)["F"].reshape(-1), f_of(theta))
    for a in "QKV":
        for b in "QKV":
            total = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, b), "total", mask=mask)
            outer = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, b), "outer", mask=mask)
            scale = hess.abs().max()
            assert torch.allclose(total, hess[sl[a], sl[b]], atol=TOL * scale), (a, b)
            assert torch.allclose(outer, gn[sl[a], sl[b]], atol=TOL * scale), (a, b)
    norms = attention.jacobian_norms(X, W_Q, W_K, W_V, mask=mask)
    for n in "QKV":
        dense = torch.linalg.matrix_norm(jac[:, sl[n]], 2)
        assert norms[n] == pytest.approx(float(dense), rel=1e-9), n


def test_corrected_bounds_hold_for_rectangular_values_and_masks():
    """2700 draws: heads of width d_O != d_V, causal and random masks, input scales up to 10 with duplicated
    keys (peaked attention). Every corrected per-block bound holds for the diagonal blocks' parts."""
    n_draws, worst = 0, 0.0
    seed = 5000
    for L, d, dk, do in [(4, 3, 2, 2), (5, 3, 2, 1), (3, 2, 2, 3), (6, 4, 2, 2)]:
        for x_scale, dup in [(0.3, False), (1.0, False), (3.0, True), (10.0, True)]:
            seed += 1
            g = torch.Generator().manual_seed(seed)

            def r(*s, g=g):
                return torch.randn(60, *s, generator=g, dtype=DT)

            X, W_Q, W_K, W_V, target = r(L, d) * x_scale, r(d, dk), r(d, dk), r(d, do), r(L, do)
            if dup:
                X[:, 1] = X[:, 0]
            for mask in _masks(L, g).values():
                bounds = attention.block_bounds(X, W_Q, W_K, W_V, target, mask=mask)
                for a in "QKV":
                    outer = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, a), "outer", mask=mask)
                    func = _dense_from_matvec(X, W_Q, W_K, W_V, target, (a, a), "functional", mask=mask)
                    for part, mat in (("outer", outer), ("functional", func), ("total", outer + func)):
                        value = torch.linalg.matrix_norm(mat, 2)
                        bound = bounds[(a, a)][part]
                        assert torch.all(value <= bound * (1 + 1e-9) + 1e-300), (a, part, L, do, x_scale)
                        worst = max(worst, float((value / bound.clamp_min(1e-300)).max()))
                n_draws += X.shape[0]
    assert n_draws >= 2700
    assert 0.5 < worst <= 1 + 1e-9


@pytest.mark.parametrize("mask_name", ["none", "causal"])
def test_batched_jacobian_norms_equal_the_unbatched_ones(mask_name):
    """Sequences x heads at once (broadcast), exact once iters >= d_V d_K, equal to one-at-a-time Lanczos."""
    g = torch.Generator().manual_seed(11)
    L, d, dk, heads, seqs = 5, 4, 2, 3, 4
    X = torch.randn(seqs, 1, L, d, generator=g, dtype=DT) * 2
    W_Q, W_K, W_V = (torch.randn(1, heads, d, dk, generator=g, dtype=DT) for _ in range(3))
    mask = _masks(L, g)[mask_name]
    batched = attention.jacobian_norms(X, W_Q, W_K, W_V, mask=mask, iters=d * dk)
    assert all(batched[n].shape == (seqs, heads) for n in "QKV")
    for s in range(seqs):
        for h in range(heads):
            one = attention.jacobian_norms(X[s, 0], W_Q[0, h], W_K[0, h], W_V[0, h], mask=mask)
            for n in "QKV":
                assert float(batched[n][s, h]) == pytest.approx(one[n], rel=1e-9), (s, h, n)
