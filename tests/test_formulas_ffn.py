"""FFN and post-norm block formulas ([P] Thm 4-6; docs/formulas.md §5) against autograd; Thm 6 bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_hessian.formulas import ffn
from lightning_hessian.formulas._linalg import eye, kron

DT = torch.float64

# torch's forward-mode AD (jacfwd) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
TOL = 1e-10
ACTS = ["relu", "gelu"]


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def _split(theta, weights):
    out, start = [], 0
    for w in weights:
        out.append(theta[start : start + w.numel()].reshape(w.shape))
        start += w.numel()
    return out


def _slices(weights, names):
    out, start = {}, 0
    for name, w in zip(names, weights, strict=True):
        out[name] = slice(start, start + w.numel())
        start += w.numel()
    return out


def test_activation_derivatives_match_autograd():
    x = torch.linspace(-3, 3, 13, dtype=DT) + 0.01
    for act, fn in [("relu", F.relu), ("gelu", F.gelu)]:
        f0, f1, f2 = ffn.activation_derivatives(x, act)
        d1 = torch.func.vmap(torch.func.grad(fn))(x)
        d2 = torch.func.vmap(torch.func.grad(torch.func.grad(fn)))(x)
        assert (f0 - fn(x)).abs().max() < TOL
        assert (f1 - d1).abs().max() < TOL
        assert (f2 - d2).abs().max() < TOL
    with pytest.raises(ValueError):
        ffn.activation_derivatives(x, "tanh")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 3, 3), (4, 3, 2)])
def test_ffn_formulas_match_autograd(act, shape):
    L, d, d_ff = shape
    g = torch.Generator().manual_seed(L * 100 + d * 10 + d_ff + 1)
    Y, W_1, W_2, target = _randn(g, L, d), _randn(g, d, d_ff), _randn(g, d_ff, d), _randn(g, L, d)
    assert (Y @ W_1 > 0).any()  # some active units (otherwise every ReLU block is zero)
    weights = [W_1, W_2]
    sl = _slices(weights, ffn.FFN_NAMES)

    def s_of(theta):
        return ffn.ffn_forward(Y, *_split(theta, weights), act).reshape(-1)

    def loss(theta):
        return ((s_of(theta) - target.reshape(-1)) ** 2).sum() / (L * d)

    theta = torch.cat([w.reshape(-1) for w in weights])
    jac = torch.func.jacrev(s_of)(theta)
    second = torch.func.jacfwd(torch.func.jacrev(s_of))(theta)
    hess = torch.func.hessian(loss)(theta)
    j_y = torch.func.jacrev(lambda y: ffn.ffn_forward(y, W_1, W_2, act).reshape(-1))(Y).reshape(L * d, L * d)

    jacs = ffn.ffn_jacobians(Y, W_1, W_2, act)
    xi = ffn.ffn_second_derivatives(Y, W_1, W_2, act)
    blocks = ffn.ffn_hessian_blocks(Y, W_1, W_2, target, act)
    assert (jacs["Y"] - j_y).abs().max() < TOL
    for a in ffn.FFN_NAMES:
        assert (jacs[a] - jac[:, sl[a]]).abs().max() < TOL
        for b in ffn.FFN_NAMES:
            n_b = sl[b].stop - sl[b].start
            assert (xi[(a, b)] - second[:, sl[a], sl[b]].reshape(-1, n_b)).abs().max() < TOL, (a, b)
            assert (blocks[(a, b)].total - hess[sl[a], sl[b]]).abs().max() < TOL, (a, b)
    assert xi[("W2", "W2")].abs().max() == 0
    if act == "relu":
        assert xi[("W1", "W1")].abs().max() == 0  # ReLU'' = 0 a.e.
        assert blocks[("W1", "W1")].functional.abs().max() == 0
    else:
        assert xi[("W1", "W1")].abs().max() > 1e-3  # GELU's diag(σ'') term
    # The mixed functional part is nonzero even for ReLU, and the blocks are transposes of each other.
    assert blocks[("W2", "W1")].functional.abs().max() > 1e-3
    assert (blocks[("W2", "W1")].functional - blocks[("W1", "W2")].functional.T).abs().max() < TOL


def _block_draw(L, d, dk, d_ff, seed, w2_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = _randn(g, L, d)
    weights = [
        _randn(g, d, dk),
        _randn(g, d, dk),
        _randn(g, d, d),
        _randn(g, d, d_ff),
        w2_scale * _randn(g, d_ff, d),
    ]
    return X, weights, _randn(g, L, d)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    "setting", [(3, 3, 2, 4, 0.0, None), (2, 3, 2, 2, 1e-2, 1.3), (3, 4, 3, 3, 0.0, None)]
)
def test_block_formulas_match_autograd(act, setting):
    L, d, dk, d_ff, eps, tau = setting
    X, weights, target = _block_draw(L, d, dk, d_ff, seed=L + d + dk + d_ff)
    sl = _slices(weights, ffn.BLOCK_NAMES)

    def z_of(theta):
        return ffn.block_forward(X, *_split(theta, weights), act, eps, tau)["Z"].reshape(-1)

    def loss(theta):
        return ((z_of(theta) - target.reshape(-1)) ** 2).sum() / (L * d)

    theta = torch.cat([w.reshape(-1) for w in weights])
    jac = torch.func.jacrev(z_of)(theta)
    second = torch.func.jacfwd(torch.func.jacrev(z_of))(theta)
    hess = torch.func.hessian(loss)(theta)
    terms = ffn.block_terms(X, *weights, act, eps, tau)
    blocks = ffn.block_hessian_blocks(X, *weights, target, act, eps, tau)
    n = L * d
    for a in ffn.BLOCK_NAMES:
        assert (terms.jacobians[a] - jac[:, sl[a]]).abs().max() < TOL
        for b in ffn.BLOCK_NAMES:
            n_b = sl[b].stop - sl[b].start
            assert (terms.second[(a, b)] - second[:, sl[a], sl[b]].reshape(-1, n_b)).abs().max() < TOL, (a, b)
            assert (blocks[(a, b)].total - hess[sl[a], sl[b]]).abs().max() < TOL, (a, b)
            # [P] Thm 5 in its printed Kronecker form.
            thm5 = kron(terms.J_Z, eye(terms.sizes[a], X)) @ terms.xi[(a, b)]
            thm5 = thm5 + kron(eye(n, X), terms.B[a].T) @ terms.H_Z @ terms.B[b]
            assert (thm5 - terms.second[(a, b)]).abs().max() < TOL, (a, b)
    # The wrappers return the same pieces.
    assert (ffn.block_jacobians(X, *weights, act, eps, tau)["W1"] - terms.jacobians["W1"]).abs().max() == 0
    second_w = ffn.block_second_derivatives(X, *weights, act, eps, tau)
    assert (second_w[("Q", "W2")] - terms.second[("Q", "W2")]).abs().max() == 0


@pytest.mark.parametrize("act", ACTS)
def test_theorem6_bound_holds(act):
    for seed in range(4):
        X, weights, target = _block_draw(3, 3, 2, 3, seed=50 + seed)
        terms = ffn.block_terms(X, *weights, act)
        bounds = ffn.theorem6_bound(X, *weights, act)
        assert set(bounds) == set(terms.second)
        for key, bound in bounds.items():
            assert float(torch.linalg.matrix_norm(terms.second[key], 2)) <= bound * (1 + 1e-9) + 1e-12, key
        blocks = ffn.block_hessian_blocks(X, *weights, target, act)
        full = torch.cat(
            [torch.cat([blocks[(a, b)].total for b in ffn.BLOCK_NAMES], 1) for a in ffn.BLOCK_NAMES], 0
        )
        assert float(torch.linalg.matrix_norm(full, 2)) <= ffn.block_loss_hessian_bound(
            X, *weights, target, act
        )


def test_paper_theorem6_estimates_fail_for_small_w2():
    """[P] bounds ||d B_2/d W_1|| by sqrt(d_ff) ||W_2||, but B_2 = σ(Y W_1) ⊗ I does not involve W_2, so the
    printed (W2, W1) estimate vanishes with ||W_2|| while the true block does not."""
    X, weights, _ = _block_draw(3, 3, 2, 3, seed=5, w2_scale=1e-7)
    terms = ffn.block_terms(X, *weights)
    paper = ffn.theorem6_bound(X, *weights, variant="paper")
    true = float(torch.linalg.matrix_norm(terms.second[("W2", "W1")], 2))
    assert true > paper[("W2", "W1")]
    assert true <= ffn.theorem6_bound(X, *weights)[("W2", "W1")] * (1 + 1e-9)
    # The printed pairs only: no (attention, FFN) pairs with the FFN weight second.
    assert ("Q", "W1") not in paper and ("W1", "Q") in paper
    # With ordinary weights the paper's estimates are merely loose (LayerNorm lemma factors).
    X, weights, _ = _block_draw(3, 3, 2, 3, seed=6)
    paper = ffn.theorem6_bound(X, *weights, variant="paper")
    terms = ffn.block_terms(X, *weights)
    for key in [("W1", "W1"), ("W1", "W2"), ("W2", "W1"), ("W2", "W2")]:
        assert float(torch.linalg.matrix_norm(terms.second[key], 2)) <= paper[key]
    with pytest.raises(ValueError):
        ffn.theorem6_bound(X, *weights, activation="gelu", variant="paper")
    with pytest.raises(ValueError):
        ffn.theorem6_bound(X, *weights, variant="printed")
