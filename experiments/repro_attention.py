"""[O] Hessian-block norms of one self-attention layer against the input scale ``X -> s X``.

Setting (docs/formulas.md §1): one head, no output projection, no biases, MSE loss
``l = ||softmax(X W_Q W_K^T X^T / sqrt(d_K)) X W_V - Target||_F^2 / (L d_V)``. For every random draw
(``X``, ``Target`` standard normal, weights ``N(0, 1/d_V)``), every scale ``s`` of a log grid and every
block / part of interest, the block is materialised from the library's matrix-free products
(:func:`lightning_hessian.formulas.attention.hessian_matvec` applied to the basis vectors, all scales at
once), and its Frobenius and spectral norms are taken. One point is cross-checked against the dense
Kronecker formulas (:func:`~lightning_hessian.formulas.attention.hessian_blocks`) and against autograd
(``torch.func.hessian`` of the loss, ``torch.func.jacrev`` of the output for the Gauss-Newton part).

Reference: W. Ormaniec, F. Dangel, S. P. Singh, "What Does It Mean to Be a Transformer? Insights from a
Theoretical Hessian Analysis", ICLR 2025, arXiv:2410.10986 (Thm 3.1-3.2 and the growth-rate experiment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_hessian.formulas import attention as att

#: (block, part) pairs measured, with the small-scale log-log slope docs/formulas.md §2 predicts.
SERIES: dict[tuple[str, str, str], float] = {
    ("V", "V", "total"): 2.0,  # = outer part; the functional part of (V, V) is zero
    ("Q", "Q", "outer"): 6.0,
    ("Q", "Q", "functional"): 5.0,
    ("Q", "Q", "total"): 5.0,
    ("K", "K", "total"): 5.0,
    ("V", "Q", "outer"): 4.0,
    ("V", "Q", "functional"): 3.0,
    ("V", "Q", "total"): 3.0,
}

#: What [O] report from their experiment (docs/formulas.md §2): measured slopes of the total blocks.
PAPER_MEASURED = {("Q", "Q", "total"): 4.98, ("V", "V", "total"): 1.98}


def label(key: tuple[str, str, str]) -> str:
    """``("Q", "Q", "outer")`` -> ``"H_o(Q,Q)"``; the total block is written ``H(Q,Q)``."""
    a, b, part = key
    prefix = {"outer": "H_o", "functional": "H_f", "total": "H"}[part]
    return f"{prefix}({a},{b})"


@dataclass
class AttentionScaling:
    """Norms of the Hessian blocks against the input scale, for several random draws."""

    scales: np.ndarray  # (S,)
    fro: dict[tuple[str, str, str], np.ndarray]  # (draws, S) Frobenius norms
    spec: dict[tuple[str, str, str], np.ndarray]  # (draws, S) spectral norms
    sizes: dict[str, int]
    small_window: tuple[float, float]
    large_window: tuple[float, float]
    check: dict[str, float] = field(default_factory=dict)  # cross-check against dense formulas / autograd

    @property
    def draws(self) -> int:
        return next(iter(self.fro.values())).shape[0]


def _draw(gen: torch.Generator, seq: int, d_v: int, d_k: int) -> dict[str, torch.Tensor]:
    """One random problem: ``X``, ``Target`` ~ N(0, 1); weights ~ N(0, 1/d_V) (so ``T`` is O(1) at s = 1)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "X": randn(seq, d_v),
        "W_Q": randn(d_v, d_k) / math.sqrt(d_v),
        "W_K": randn(d_v, d_k) / math.sqrt(d_v),
        "W_V": randn(d_v, d_v) / math.sqrt(d_v),
        "target": randn(seq, d_v),
    }


def block_matrices(
    prob: dict[str, torch.Tensor], scales: torch.Tensor, key: tuple[str, str, str]
) -> torch.Tensor:
    """Dense Hessian block (or part) at every scale, ``(S, numel(W_a), numel(W_b))``.

    Built from ``numel(W_b)`` matrix-free products with the basis vectors; ``X`` carries the scale as a
    leading batch dimension, so one call covers the whole grid.
    """
    a, b, part = key
    n_b = prob["W_V" if b == "V" else f"W_{b}"].numel()
    basis = torch.eye(n_b, dtype=torch.float64).reshape(n_b, 1, n_b)  # broadcasts against (S, L, d_V)
    x = scales[:, None, None] * prob["X"]
    cols = att.hessian_matvec(x, prob["W_Q"], prob["W_K"], prob["W_V"], prob["target"], basis, (a, b), part)
    return cols.permute(1, 2, 0)  # cols[j, s] = H_s e_j, the j-th column


def slope(scales: np.ndarray, values: np.ndarray, window: tuple[float, float]) -> float:
    """Least-squares slope of ``log10 values`` against ``log10 scales`` for scales inside ``window``."""
    inside = (scales >= window[0] * (1 - 1e-9)) & (scales <= window[1] * (1 + 1e-9))
    return float(np.polyfit(np.log10(scales[inside]), np.log10(values[inside]), 1)[0])


def crossover(scales: np.ndarray, value: np.ndarray, query: np.ndarray) -> float:
    """First scale where ``||H(Q,Q)||`` reaches ``||H(V,V)||`` (log-linear interpolation); nan if never."""
    ratio = np.log(query / value)
    above = np.nonzero(ratio >= 0)[0]
    if len(above) == 0:
        return math.nan
    i = above[0]
    if i == 0:
        return float(scales[0])
    t = -ratio[i - 1] / (ratio[i] - ratio[i - 1])
    return float(np.exp(np.log(scales[i - 1]) + t * (np.log(scales[i]) - np.log(scales[i - 1]))))


def cross_check(prob: dict[str, torch.Tensor], s: float) -> dict[str, float]:
    """Compare the matrix-free blocks at scale ``s`` with the dense Kronecker formulas and with autograd.

    Returns the largest entrywise difference of each comparison relative to the largest entry of the
    corresponding autograd block (all nine blocks; outer parts via ``c J^T J``).
    """
    x = s * prob["X"]
    w_q, w_k, w_v, target = prob["W_Q"], prob["W_K"], prob["W_V"], prob["target"]
    seq, d_v = x.shape
    c = 2.0 / (seq * d_v)

    def output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return att.forward(x, q, k, v)["F"]

    def loss(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ((output(q, k, v) - target) ** 2).sum() / (seq * d_v)

    weights = (w_q, w_k, w_v)
    hess = torch.func.hessian(loss, argnums=(0, 1, 2))(*weights)  # nested tuples of (.., .., .., ..) tensors
    jac = torch.func.jacrev(output, argnums=(0, 1, 2))(*weights)  # each (L, d_V, *W.shape)
    dense = att.hessian_blocks(x, w_q, w_k, w_v, target)
    index = {"Q": 0, "K": 1, "V": 2}
    worst = {"matvec_vs_autograd": 0.0, "dense_vs_autograd": 0.0, "outer_vs_gauss_newton": 0.0}
    for a in ("Q", "K", "V"):
        for b in ("Q", "K", "V"):
            ia, ib = index[a], index[b]
            auto = hess[ia][ib].reshape(weights[ia].numel(), weights[ib].numel())
            j_a = jac[ia].reshape(seq * d_v, -1)
            j_b = jac[ib].reshape(seq * d_v, -1)
            gauss_newton = c * j_a.T @ j_b
            scale = float(auto.abs().max())
            mf = block_matrices(prob, torch.tensor([s], dtype=torch.float64), (a, b, "total"))[0]
            mf_outer = block_matrices(prob, torch.tensor([s], dtype=torch.float64), (a, b, "outer"))[0]
            worst["matvec_vs_autograd"] = max(
                worst["matvec_vs_autograd"], float((mf - auto).abs().max()) / scale
            )
            worst["dense_vs_autograd"] = max(
                worst["dense_vs_autograd"], float((dense[(a, b)].total - auto).abs().max()) / scale
            )
            gn_scale = float(gauss_newton.abs().max())
            worst["outer_vs_gauss_newton"] = max(
                worst["outer_vs_gauss_newton"], float((mf_outer - gauss_newton).abs().max()) / gn_scale
            )
    worst["scale"] = s
    return worst


def run(
    quick: bool = False,
    seq: int = 8,
    d_v: int = 8,
    d_k: int = 8,
    seed: int = 0,
    check_scale: float = 0.5,
) -> AttentionScaling:
    """Measure every series of :data:`SERIES` on a log grid of scales from 1e-2 to 1e1.

    ``quick``: 5 draws, 16 scales; otherwise 100 draws (for the distribution of the crossover scale),
    31 scales. Small-scale slopes are fitted on ``[1e-2, 1e-1]``, large-scale ones on ``[3, 10]``.
    """
    draws, points = (5, 16) if quick else (100, 31)
    scales = torch.logspace(-2, 1, points, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    fro = {key: np.zeros((draws, points)) for key in SERIES}
    spec = {key: np.zeros((draws, points)) for key in SERIES}
    first = None
    for i in range(draws):
        prob = _draw(gen, seq, d_v, d_k)
        if first is None:
            first = prob
        for key in SERIES:
            mats = block_matrices(prob, scales, key)
            fro[key][i] = torch.linalg.matrix_norm(mats).numpy()
            spec[key][i] = torch.linalg.matrix_norm(mats, ord=2).numpy()
    result = AttentionScaling(
        scales=scales.numpy(),
        fro=fro,
        spec=spec,
        sizes={"L": seq, "d_V": d_v, "d_K": d_k},
        small_window=(1e-2, 1e-1),
        large_window=(3.0, 10.0),
    )
    result.check = cross_check(first, check_scale)
    return result


def summary(res: AttentionScaling) -> dict:
    """Slopes (mean and std over draws, both norms), crossover distribution and the V/Q ratio at s = 0.01."""
    out: dict = {"slopes": {}}
    for key, expected in SERIES.items():
        row = {"expected": expected, "paper": PAPER_MEASURED.get(key)}
        for norm_name, norms in (("fro", res.fro), ("spec", res.spec)):
            small = np.array([slope(res.scales, n, res.small_window) for n in norms[key]])
            large = np.array([slope(res.scales, n, res.large_window) for n in norms[key]])
            row[norm_name] = {
                "small_mean": float(small.mean()),
                "small_std": float(small.std()),
                # at large scale some draws saturate (norms collapse exponentially): median and quartiles
                "large_quartiles": tuple(float(q) for q in np.percentile(large, [25, 50, 75])),
            }
        out["slopes"][key] = row
    vv, qq = res.fro[("V", "V", "total")], res.fro[("Q", "Q", "total")]
    cross = np.array([crossover(res.scales, vv[i], qq[i]) for i in range(res.draws)])
    out["crossover"] = cross
    out["ratio_at_0.01"] = vv[:, 0] / qq[:, 0]  # the grid starts at s = 0.01
    # where the (geometric) mean query block peaks: above it, saturation makes the block shrink
    out["qq_peak_scale"] = float(res.scales[np.argmax(np.log(qq).mean(0))])
    return out


def plot(res: AttentionScaling, summ: dict, path: str) -> None:
    """Two panels: Frobenius norms against s (geometric mean over draws, fitted small-scale slopes), and the
    distribution of the V/Q crossover scale."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.7, 1]})
    styles = {"total": "-", "outer": "--", "functional": ":"}
    colors = {
        ("V", "V"): "tab:blue",
        ("Q", "Q"): "tab:red",
        ("K", "K"): "tab:orange",
        ("V", "Q"): "tab:green",
    }
    s = res.scales
    for key in SERIES:
        mean = np.exp(np.log(res.fro[key]).mean(0))
        fitted = summ["slopes"][key]["fro"]["small_mean"]
        text = f"{label(key)}: slope {fitted:.2f} (theory {SERIES[key]:g})"
        if key[0] == "K":  # H(K,K) lies on top of H(Q,Q): open markers only, so that both stay visible
            ax.loglog(s, mean, "o", mfc="none", color=colors[key[:2]], ms=5, markevery=2, label=text)
        else:
            ax.loglog(s, mean, styles[key[2]], color=colors[key[:2]], lw=1.8, label=text)
    ax.axvspan(*res.small_window, color="0.9", zorder=0)
    ax.text(0.0115, 0.03, "slope-fit window", transform=ax.get_xaxis_transform(), fontsize=8, color="0.4")
    ax.set_xlabel("input scale s  (X -> s X)")
    ax.set_ylabel("Frobenius norm of the Hessian block")
    ax.set_title(
        f"[O] single self-attention layer, MSE: block norms vs input scale\n"
        f"L={res.sizes['L']}, d_V={res.sizes['d_V']}, d_K={res.sizes['d_K']}; "
        f"geometric mean over {res.draws} draws; slopes fitted on s in [0.01, 0.1]",
        fontsize=10,
    )
    ax.legend(fontsize=7.5, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)

    cross = summ["crossover"][np.isfinite(summ["crossover"])]
    bins = np.logspace(np.log10(max(cross.min(), 1e-2) / 1.2), np.log10(cross.max() * 1.2), 15)
    ax2.hist(cross, bins=bins, color="tab:purple", alpha=0.75, edgecolor="white")
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xticks([0.3, 0.5, 0.8, 1, 1.5, 2, 3])
    ax2.axvline(0.8, color="k", ls="--", lw=1.2, label="[O]: Q overtakes V near s ~ 0.8")
    median = float(np.median(cross))
    ax2.axvline(median, color="tab:purple", lw=1.5, label=f"ours: median {median:.2f}")
    ax2.set_xlabel("crossover scale s where ||H(Q,Q)||_F = ||H(V,V)||_F")
    ax2.set_ylabel("number of random draws")
    ax2.set_title(f"V/Q crossover over {len(cross)} draws", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
