"""The averaged single-layer Gauss-Newton norm (formulas.gauss_newton) against explicit float64 Jacobians."""

from __future__ import annotations

import pytest
import torch

from lightning_hessian.formulas import attention, gauss_newton

DT = torch.float64


def _draw(seed, seqs=5, length=4, d=5, dk=3, do=2, heads=3, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=DT)

    return r(seqs, length, d) * x_scale, r(heads, d, dk), r(heads, d, dk), r(heads, d, do)


def _dense(X, W_Q, W_K, W_V, c, tau=None, mask=None):
    """Per head and weight: c * eigvalsh((1/S) sum_s J_s^T J_s) with every J_s from autograd."""
    out = {n: [] for n in "QKV"}
    for h in range(W_Q.shape[0]):
        weights = {"Q": W_Q[h], "K": W_K[h], "V": W_V[h]}
        for n in "QKV":

            def f_of(w, x, n=n, weights=weights):
                ws = dict(weights, **{n: w.reshape(weights[n].shape)})
                return attention.forward(x, ws["Q"], ws["K"], ws["V"], tau, mask)["F"].reshape(-1)

            grams = [(j.T @ j) for j in (torch.func.jacrev(f_of)(weights[n].reshape(-1), x) for x in X)]
            gram = torch.stack(grams).mean(0)
            out[n].append(float(c * torch.linalg.eigvalsh(gram)[-1]))
    return out


@pytest.mark.parametrize(
    ("seed", "causal", "tau", "x_scale"), [(0, False, None, 1.0), (1, True, None, 3.0), (2, False, 0.7, 0.3)]
)
def test_matches_explicit_averaged_gram(seed, causal, tau, x_scale):
    X, W_Q, W_K, W_V = _draw(seed, x_scale=x_scale)
    mask = torch.ones(4, 4, dtype=torch.bool).tril() if causal else None
    c = 2.0 / (4 * 6)  # a layer of width 6 around these heads
    got = gauss_newton.gauss_newton_norms(X, W_Q, W_K, W_V, c=c, tau=tau, mask=mask, iters=60, chunk=2)
    want = _dense(X, W_Q, W_K, W_V, c, tau, mask)
    for n in "QKV":
        assert got[n].shape == (3,)
        torch.testing.assert_close(got[n], torch.tensor(want[n], dtype=DT), rtol=1e-9, atol=0)


def test_default_c_is_one_heads_mean_squared_error():
    X, W_Q, W_K, W_V = _draw(3, seqs=2, heads=1)
    got = gauss_newton.gauss_newton_norms(X, W_Q, W_K, W_V, iters=60)
    want = _dense(X, W_Q, W_K, W_V, 2.0 / (4 * 2))
    for n in "QKV":
        assert float(got[n][0]) == pytest.approx(want[n][0], rel=1e-9)


def test_norm_of_the_mean_is_below_the_mean_of_the_norms():
    """λ_max of the mean Gram is at most the mean of per-sequence ||J_s||^2, and strictly below here: the
    quantity is not the sampled Jacobian norms squared."""
    X, W_Q, W_K, W_V = _draw(4, seqs=6, heads=2, do=3, dk=3)
    got = gauss_newton.gauss_newton_norms(X, W_Q, W_K, W_V, c=1.0, iters=60)
    per_seq = attention.jacobian_norms(X[:, None], W_Q[None], W_K[None], W_V[None], iters=60)
    for n in "QKV":
        mean_sq = (per_seq[n] ** 2).mean(0)
        assert torch.all(got[n] <= mean_sq * (1 + 1e-10))
        assert torch.all(got[n] < 0.99 * mean_sq)


def test_bad_shapes_say_what_to_pass():
    X, W_Q, W_K, W_V = _draw(5)
    with pytest.raises(ValueError, match=r"X must be \(sequences, L, d_V\)"):
        gauss_newton.gauss_newton_norms(X[0], W_Q, W_K, W_V)
    with pytest.raises(ValueError, match="W_Q must be"):
        gauss_newton.gauss_newton_norms(X, W_Q[0], W_K, W_V)
    with pytest.raises(ValueError, match="chunk"):
        gauss_newton.gauss_newton_norms(X, W_Q, W_K, W_V, chunk=0)
