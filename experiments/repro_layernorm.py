"""[O] LayerNorm placement and softmax temperature: how they change the attention Hessian's growth with scale.

Setting of :mod:`repro_attention` (one head, ``L = 8`` tokens, ``d_V = d_K = 8``, no biases, no output
projection, MSE loss against a standard-normal target, weights ``N(0, 1/d_V)``), with the input scaled
``X -> s X`` and three placements of a LayerNorm without affine parameters (``eps = 1e-5``):

* ``none``: ``F = softmax(s X W_Q W_K^T X^T s / τ) s X W_V`` (the papers' layer);
* ``pre``: the attention reads ``LN(s X)`` (pre-LN, as in GPT-2 and ViT blocks);
* ``post``: the loss reads ``LN(F)`` (post-LN, as in the original Transformer).

For each placement, draw and scale, the query-query and value-value Hessian blocks of the loss are formed
densely with ``torch.func.hessian`` (float64) and their Frobenius norms taken; slopes are least-squares fits
of log-norm against log s on ``s ∈ [0.01, 0.1]``, one per draw. The temperature ``τ`` is varied without a
LayerNorm: by [O] Thm 3.1-3.2 (derivation in docs/formulas.md §3) the query blocks scale like ``τ^-2`` at
small logits while the value block does not depend on ``τ``, so ``‖H(V,V)‖ / ‖H(Q,Q)‖`` at small ``s``
should grow like ``τ^2``.

Reference: W. Ormaniec, F. Dangel, S. P. Singh, "What Does It Mean to Be a Transformer? Insights from a
Theoretical Hessian Analysis", ICLR 2025, arXiv:2410.10986 (the role of layer normalisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PLACEMENTS = ("none", "pre", "post")
#: Temperatures as multiples of the default sqrt(d_K).
TEMPERATURES = (0.25, 1.0, 4.0)
SMALL = (0.01, 0.1)  # the small-scale window of repro_attention
EPS = 1e-5


@dataclass
class LayerNormScaling:
    """Frobenius norms of H(Q,Q) and H(V,V) against the input scale, per placement and temperature."""

    scales: np.ndarray  # (S,)
    # (placement, τ multiple) -> {"Q": (draws, S), "V": (draws, S)}
    norms: dict[tuple[str, float], dict[str, np.ndarray]]
    sizes: dict[str, int]


def _loss(
    w_q: torch.Tensor,
    w_v: torch.Tensor,
    w_k: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    s: torch.Tensor,
    tau: float,
    place: str,
) -> torch.Tensor:
    x = s * x
    if place == "pre":
        x = F.layer_norm(x, x.shape[-1:], eps=EPS)
    a = torch.softmax((x @ w_q) @ (x @ w_k).T / tau, dim=-1)
    out = a @ (x @ w_v)
    if place == "post":
        out = F.layer_norm(out, out.shape[-1:], eps=EPS)
    return ((out - target) ** 2).sum() / target.numel()


def _block_norms(draw: dict[str, torch.Tensor], scales: torch.Tensor, tau: float, place: str) -> dict:
    """Frobenius norms of the (Q,Q) and (V,V) Hessian blocks at every scale (vmapped over the scales)."""
    args = (draw["W_K"], draw["X"], draw["target"])

    def per_scale(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_q = torch.func.hessian(lambda w: _loss(w, draw["W_V"], *args, s, tau, place))(draw["W_Q"])
        h_v = torch.func.hessian(lambda w: _loss(draw["W_Q"], w, *args, s, tau, place))(draw["W_V"])
        return h_q.reshape(-1).norm(), h_v.reshape(-1).norm()

    q, v = torch.func.vmap(per_scale)(scales)
    return {"Q": q.numpy(), "V": v.numpy()}


def run(
    quick: bool = False, seed: int = 0, draws: int | None = None, n_scales: int | None = None
) -> LayerNormScaling:
    """Full: 20 draws (as many as the repeats of [O]'s released data), 13 log-spaced scales from 0.01 to 10
    (the small-scale window holds 5). Quick: 3 draws, 7 scales. ``draws`` / ``n_scales`` override either."""
    default = (3, 7) if quick else (20, 13)
    draws = default[0] if draws is None else draws
    n_scales = default[1] if n_scales is None else n_scales
    seq, d = 8, 8
    scales = torch.logspace(-2, 1, n_scales, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    problems = []
    for _ in range(draws):

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        problems.append(
            {
                "X": randn(seq, d),
                "W_Q": randn(d, d) / math.sqrt(d),
                "W_K": randn(d, d) / math.sqrt(d),
                "W_V": randn(d, d) / math.sqrt(d),
                "target": randn(seq, d),
            }
        )
    settings = [(place, 1.0) for place in PLACEMENTS] + [("none", t) for t in TEMPERATURES if t != 1.0]
    norms = {}
    for place, mult in settings:
        rows = [_block_norms(p, scales, mult * math.sqrt(d), place) for p in problems]
        norms[(place, mult)] = {n: np.stack([r[n] for r in rows]) for n in "QV"}
    return LayerNormScaling(scales=scales.numpy(), norms=norms, sizes={"L": seq, "d": d})


def slopes(res: LayerNormScaling, key: tuple[str, float], block: str) -> np.ndarray:
    """Per draw, the least-squares slope of log-norm against log s on the small-scale window."""
    sel = (res.scales >= SMALL[0] * (1 - 1e-9)) & (res.scales <= SMALL[1] * (1 + 1e-9))
    logs = np.log(res.scales[sel])
    return np.array([np.polyfit(logs, np.log(row[sel]), 1)[0] for row in res.norms[key][block]])


def ratio_at_smallest(res: LayerNormScaling, key: tuple[str, float]) -> np.ndarray:
    """Per draw, ‖H(V,V)‖_F / ‖H(Q,Q)‖_F at the smallest scale (s = 0.01)."""
    return res.norms[key]["V"][:, 0] / res.norms[key]["Q"][:, 0]


def plot(res: LayerNormScaling, path: str) -> None:
    """Left: median ‖H(Q,Q)‖ (solid) and ‖H(V,V)‖ (dashed) against s per placement. Right: the same for the
    temperatures without LayerNorm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    groups = (
        ("LayerNorm placement (τ = √d_K)", [(p, 1.0) for p in PLACEMENTS], lambda k: f"{k[0]}"),
        ("temperature, no LayerNorm", [("none", t) for t in TEMPERATURES], lambda k: f"τ = {k[1]:g}·√d_K"),
    )
    for ax, (title, keys, name) in zip(axes, groups):
        for i, key in enumerate(keys):
            colour = f"C{i}"
            for block, style in (("Q", "-"), ("V", "--")):
                ax.loglog(
                    res.scales,
                    np.median(res.norms[key][block], axis=0),
                    style,
                    color=colour,
                    label=f"{name(key)}: H({block},{block})",
                )
        ax.axvspan(*SMALL, color="0.92", zorder=0)
        ax.set_title(title)
        ax.set_xlabel("input scale s")
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("‖H‖_F (median over draws)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
