"""[P] Thm 6 matrix-free (formulas.block_bound) against the dense evaluation of formulas.ffn, float64."""

from __future__ import annotations

import pytest
import torch

from lightning_hessian.formulas import attention, ffn, flat_norms, layernorm
from lightning_hessian.formulas import block_bound as bb

DT = torch.float64

# torch's forward-mode AD registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
TOL = 1e-8


def _draw(L, d, dk, d_ff, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    return r(L, d), [r(d, dk), r(d, dk), r(d, d), r(d, d_ff), r(d_ff, d)], r(L, d)


def _norm(m):
    return float(torch.linalg.matrix_norm(m, ord=2))


def _close(a, b):
    return abs(a - b) <= TOL * max(1.0, abs(b))


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize(
    "setting", [(3, 4, 2, 3, 0.0, None, 0), (3, 4, 3, 5, 1e-2, 1.3, 1), (2, 3, 2, 2, 0.0, None, 2)]
)
def test_factors_match_the_dense_evaluation(act, setting):
    L, d, dk, d_ff, eps, tau, seed = setting
    X, W, T = _draw(L, d, dk, d_ff, seed)
    terms = ffn.block_terms(X, *W, act, eps, tau)
    res = bb.block_bound(X, *W, T, act, eps, tau)
    f = res.factors
    assert _close(f["J_Z"], _norm(terms.J_Z))
    assert _close(f["H_Z"], _norm(terms.H_Z))
    for k in ffn.BLOCK_NAMES:
        assert _close(f[f"B_{k}"], _norm(terms.B[k])), k
        assert _close(f[f"dZ_{k}"], _norm(terms.jacobians[k])), k
    dense = ffn.theorem6_bound(X, *W, act, eps, tau)
    assert set(res.pairs) == set(dense)
    for key, value in dense.items():
        xi = _norm(terms.xi[key])
        if key in res.exact_xi:  # the FFN pairs: the same number as the dense route
            assert _close(f[f"xi_{key[0]}_{key[1]}"], xi), key
            assert _close(res.pairs[key], value), key
        else:  # a pair with an attention weight: an upper bound on the exact factor
            assert f[f"xi_{key[0]}_{key[1]}"] >= xi * (1 - 1e-9), key
            assert res.pairs[key] >= value * (1 - 1e-9), key
        assert _norm(terms.second[key]) <= res.pairs[key] * (1 + 1e-9), key


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_bound_holds_for_the_dense_block_hessian(act):
    for seed in range(3):
        X, W, T = _draw(3, 3, 2, 3, 10 + seed)
        blocks = ffn.block_hessian_blocks(X, *W, T, act)
        full = torch.cat(
            [torch.cat([blocks[(a, b)].total for b in ffn.BLOCK_NAMES], 1) for a in ffn.BLOCK_NAMES]
        )
        res = bb.block_bound(X, *W, T, act)
        assert _norm(full) <= res.bound
        assert res.bound >= ffn.block_loss_hessian_bound(X, *W, T, act) * (1 - 1e-9)


@pytest.mark.parametrize("d", [3, 4, 9])
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_layernorm_hessian_norm_closed_form(d, eps):
    X = 2 * torch.randn(6, d, dtype=DT, generator=torch.Generator().manual_seed(d)) + 1
    assert _close(flat_norms.layernorm_hessian_norm(X, eps), layernorm.hessian_norm(X, eps=eps))


def test_bad_shapes_are_refused():
    X, W, T = _draw(3, 4, 2, 3, 0)
    with pytest.raises(ValueError, match="L x d"):
        bb.block_bound(X, *W, T[:2])
    with pytest.raises(ValueError, match="transpose"):
        bb.block_bound(X, *W[:3], W[3].T, W[4], T)
    with pytest.raises(ValueError, match="relu"):
        bb.block_bound(X, *W, T, activation="tanh")


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_ffn_stage_norms_match_autograd(act):
    """The closed-form flat norms of the FFN stage's second derivatives (inputs of the chained ξ)."""
    X, W, T = _draw(3, 4, 2, 5, 7)
    res = bb.block_bound(X, *W, T, act)
    Y = ffn.block_forward(X, *W, act)["Y"]
    W_1, W_2 = W[3], W[4]

    def jac(key, y, w1, w2):
        return ffn.ffn_jacobians(y, w1, w2, act)[key]

    def flat(fn, at):  # ||d vec_r(J) / d vec_r(at)^T||_2
        d = torch.func.jacfwd(fn)(at)
        return _norm(d.reshape(-1, at.numel()))

    f = res.factors
    assert _close(f["J_SY"], _norm(jac("Y", Y, W_1, W_2)))
    assert _close(f["H_SY"], flat(lambda y: jac("Y", y, W_1, W_2), Y))
    assert _close(f["dJSY_W1"], flat(lambda w: jac("Y", Y, w, W_2), W_1))
    assert _close(f["dJSY_W2"], flat(lambda w: jac("Y", Y, W_1, w), W_2))
    assert _close(f["dBW1_Y"], flat(lambda y: jac("W1", y, W_1, W_2), Y))
    assert _close(f["dBW2_Y"], flat(lambda y: jac("W2", y, W_1, W_2), Y))


@pytest.mark.slow
def test_feasible_at_realistic_size():
    """L = 128, d = 64, d_ff = 256, where the dense route would need (L d)^2 (Σ n_i) numbers."""
    L, d, d_ff = 128, 64, 256
    g = torch.Generator().manual_seed(0)
    X = layernorm.layernorm(torch.randn(L, d, generator=g, dtype=DT))
    W = [torch.randn(*s, generator=g, dtype=DT) / s[0] ** 0.5 for s in [(d, d)] * 3 + [(d, d_ff), (d_ff, d)]]
    res = bb.block_bound(X, *W, torch.randn(L, d, generator=g, dtype=DT))
    assert res.bound > 0 and all(v >= 0 for v in res.factors.values())


@pytest.mark.parametrize("tau", [None, 1.3])
def test_attention_second_derivative_norms_match_the_dense_phi(tau):
    for seed in range(2):
        X, W, _ = _draw(3, 4, 2, 3, 20 + seed)
        dense = attention.second_derivatives(X, *W[:3], tau)
        t = 2**0.5 if tau is None else tau
        exact = flat_norms.attention_second_derivative_norms(X, *W[:3], t, 100, 0)
        assert set(exact) == set(dense)
        for key, phi in dense.items():
            assert _close(exact[key], _norm(phi)), key
