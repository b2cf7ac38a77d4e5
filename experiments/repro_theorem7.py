r"""[P] Theorem 7: how much the empirical loss changes when one sample is added, evaluated away from ``w*``.

``L_k(w)`` is the mean of the first ``k`` per-sample losses. [P] Thm 7 (docs/formulas.md §6) bounds

    |L_{k+1}(w) - L_k(w)| <= 2 l_max / (k+1) + M ||w - w*||^2 / (k+1),

with ``l_max >= l_i(w*)`` and ``M >= ||∇² l_i(w*)||_2`` for every sample. The model is one where ``w*`` can be
computed to machine precision and every per-sample quantity has a closed form: multinomial logistic
regression on scikit-learn's digits (64 pixels / 16 plus a bias feature, 10 classes), per-sample loss
``l_i(W) = CE(x_i^T W, y_i) + (λ/2) ||W||_F^2`` (the small ridge ``λ`` makes the minimiser finite: the digits
are linearly separable). ``w*`` minimises the full-data loss ``L_n`` (L-BFGS, float64).

The difference is evaluated at ``w = w* + r D`` for a random unit direction ``D`` and a few radii ``r`` (and
at ``r = 0``, where the curvature term vanishes and the statement is the trivial identity
``L_{k+1} - L_k = (l_{k+1} - L_k)/(k+1)``), averaged over random orders of the data, and split into the terms
of the Taylor identity with :func:`lightning_hessian.formulas.convergence.loss_difference_terms`.

Reference: E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer
Hessians and Their Implications for Scaling Laws", arXiv:2510.16927, Thm 7.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

from lightning_hessian.formulas import convergence

RIDGE = 1e-3


@dataclass
class Theorem7:
    """Per-radius observed differences and bound terms; arrays are indexed by ``k - 1`` (``k = 1..n-1``)."""

    k: np.ndarray  # (n-1,)
    radii: list[float]
    weight_norm: float  # ||w*||_F, for scale
    grad_norm: float  # ||∇L_n(w*)||, how stationary w* is
    loss_max: float  # l_max = max_i l_i(w*)
    hessian_max: float  # M = max_i ||∇² l_i(w*)||_2 (Thm 7's M)
    hessian_global: float  # max_i ||x_i||^2 / 2 + λ >= ||∇² l_i(w)||_2 for every w
    observed: dict[float, np.ndarray]  # mean over orders of |L_{k+1}(w) - L_k(w)|
    observed_max: dict[float, np.ndarray]  # max over orders
    bound: dict[float, np.ndarray]  # Thm 7 bound
    terms: dict[float, dict[str, np.ndarray]]  # mean over orders of |value|, |gradient|, ... term
    worst_ratio: dict[float, float]  # max over k and orders of observed / bound
    orders: int
    n: int


def digits_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(n, 65)`` (pixels / 16 and a constant 1) and integer labels, float64."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return x, torch.tensor(digits.target)


def per_sample(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``l_i(W) = CE(x_i^T W, y_i) + (λ/2)||W||^2`` for every sample."""
    logits = x @ w
    ce = torch.logsumexp(logits, 1) - logits.gather(1, y[:, None])[:, 0]
    return ce + 0.5 * RIDGE * (w**2).sum()


def minimise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``w* = argmin L_n`` by L-BFGS with strong-Wolfe line search (the objective is strictly convex)."""
    w = torch.zeros(x.shape[1], 10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = per_sample(x, y, w).mean()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return w.detach()


def sample_terms(
    x: torch.Tensor, y: torch.Tensor, w_star: torch.Tensor, d: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Closed-form per-sample ``g_i^T D``, ``D^T H_i D`` at ``w*`` and ``||H_i(w*)||_2``.

    ``g_i = x_i (p_i - e_{y_i})^T + λ W``; ``H_i = (diag p_i - p_i p_i^T) ⊗ x_i x_i^T + λ I``, whose spectral
    norm is ``||diag p_i - p_i p_i^T||_2 ||x_i||^2 + λ`` (both factors are positive semi-definite).
    """
    p = torch.softmax(x @ w_star, 1)
    onehot = torch.nn.functional.one_hot(y, 10).to(p)
    u = x @ d  # (n, 10) = D^T x_i
    grad_dot = ((p - onehot) * u).sum(1) + RIDGE * (w_star * d).sum()
    cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    quad = torch.einsum("ni,nij,nj->n", u, cov, u) + RIDGE * (d**2).sum()
    hess_norm = torch.linalg.eigvalsh(cov)[:, -1] * (x**2).sum(1) + RIDGE
    return {"grad_dot": grad_dot, "quad": quad, "hess_norm": hess_norm}


def run(quick: bool = False, seed: int = 0) -> Theorem7:
    """Observed differences, bound and terms at radii ``r = ||w - w*||_F`` in ``{0, 1, 4, 16}``.

    ``quick``: 5 random orders of the data, otherwise 100.
    """
    orders = 5 if quick else 100
    x, y = digits_problem()
    n = len(x)
    w_star = minimise(x, y)
    w_req = w_star.clone().requires_grad_(True)
    grad_norm = float(torch.autograd.grad(per_sample(x, y, w_req).mean(), w_req)[0].norm())
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(w_star.shape, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    at_star = per_sample(x, y, w_star)
    base = sample_terms(x, y, w_star, direction)
    loss_max = float(at_star.max())
    hessian_max = float(base["hess_norm"].max())
    hessian_global = float(0.5 * (x**2).sum(1).max() + RIDGE)
    perms = [torch.randperm(n, generator=gen) for _ in range(orders)]
    k = np.arange(1, n)
    radii = [0.0, 1.0, 4.0, 16.0]
    out = Theorem7(
        k=k,
        radii=radii,
        weight_norm=float(w_star.norm()),
        grad_norm=grad_norm,
        loss_max=loss_max,
        hessian_max=hessian_max,
        hessian_global=hessian_global,
        observed={},
        observed_max={},
        bound={},
        terms={},
        worst_ratio={},
        orders=orders,
        n=n,
    )
    for r in radii:
        losses = per_sample(x, y, w_star + r * direction)
        # D = r * direction: the gradient term is linear in r, the curvature term quadratic.
        diffs, parts = [], {"value": [], "gradient": [], "curvature": [], "remainder": []}
        for perm in perms:
            t = convergence.loss_difference_terms(
                losses[perm], at_star[perm], r * base["grad_dot"][perm], r**2 * base["quad"][perm]
            )
            diffs.append(t["observed"].abs().numpy())
            for name in parts:
                parts[name].append(t[name].abs().numpy())
        diffs_arr = np.stack(diffs)
        bound = np.asarray(
            convergence.theorem7_bound(torch.tensor(k, dtype=torch.float64), loss_max, hessian_max, r)
        )
        out.observed[r] = diffs_arr.mean(0)
        out.observed_max[r] = diffs_arr.max(0)
        out.bound[r] = bound
        out.terms[r] = {name: np.stack(v).mean(0) for name, v in parts.items()}
        out.worst_ratio[r] = float((diffs_arr / bound).max())
    return out


def loglog_slope(k: np.ndarray, values: np.ndarray, lo: int = 10, hi: int | None = None) -> float:
    """Least-squares slope of ``log values`` against ``log k`` for ``lo <= k <= hi``."""
    keep = (k >= lo) & (k <= (hi or k.max()))
    return float(np.polyfit(np.log(k[keep]), np.log(values[keep]), 1)[0])


def log_binned(k: np.ndarray, values: np.ndarray, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``values`` over logarithmically spaced bins of ``k`` (for readable log-log curves)."""
    edges = np.unique(np.round(np.logspace(0, np.log10(k.max() + 1), bins + 1)).astype(int))
    centres, means = [], []
    for lo, hi in itertools.pairwise(edges):
        keep = (k >= lo) & (k < hi)
        if keep.any():
            centres.append(np.exp(np.log(k[keep]).mean()))
            means.append(values[keep].mean())
    return np.array(centres), np.array(means)


def plot(res: Theorem7, path: str) -> None:
    """Left: observed |L_{k+1} - L_k| (mean over orders) and the Thm 7 bound per radius, with a 1/k line.
    Right: the terms of the Taylor identity at the largest radius."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = ["k", "tab:blue", "tab:green", "tab:red"]
    k = res.k
    for r, color in zip(res.radii, colors):
        tag = "w = w* (trivial identity)" if r == 0 else f"||w - w*|| = {r:g}"
        ax.loglog(
            *log_binned(k, res.observed[r]), color=color, lw=1.6, marker=".", ms=4, label=f"observed, {tag}"
        )
        ax.loglog(k, res.bound[r], color=color, lw=1.3, ls="--", alpha=0.8)
    ref = res.observed[res.radii[-1]][9] * 10 / k
    ax.loglog(k, ref, color="0.5", ls=":", lw=2, label="1/k reference")
    ax.plot([], [], "k--", label="Thm 7 bound (same colour)")
    ax.set_xlabel("k (number of samples in L_k)")
    ax.set_ylabel("|L_{k+1}(w) - L_k(w)|")
    ax.set_title(
        f"[P] Thm 7 on softmax regression (digits, n={res.n})\n"
        f"mean over {res.orders} data orders, log-binned in k; ||w*||={res.weight_norm:.1f}, "
        f"l_max={res.loss_max:.2f}, M={res.hessian_max:.2f}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)

    r = res.radii[-1]
    styles = {"value": "tab:purple", "gradient": "tab:orange", "curvature": "tab:green", "remainder": "0.5"}
    ax2.loglog(*log_binned(k, res.observed[r]), color="tab:red", lw=2, label="observed |L_{k+1} - L_k|")
    for name, color in styles.items():
        ax2.loglog(*log_binned(k, res.terms[r][name]), color=color, lw=1.3, label=f"|{name} term|")
    ax2.set_xlabel("k (number of samples in L_k)")
    ax2.set_ylabel("magnitude (mean over data orders, log-binned in k)")
    ax2.set_title(
        f"Taylor terms at ||w - w*|| = {r:g}: value, gradient (zero only if w* is\n"
        "stationary for every L_k, [P] Assumption 1), curvature, O(||D||^3) remainder",
        fontsize=10,
    )
    ax2.legend(fontsize=8, loc="lower left")
    ax2.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
