r"""[P] Thm 1, live: the papers' attention layer trained on a real task, measured against its bounds.

The papers' setting exactly: one single-head self-attention layer ``F = softmax(X W_Q W_K^T X^T / sqrt(d)) X
W_V`` (no biases, no output projection), trained with the mean-squared error. The task makes attention
sharpen as it learns: each of scikit-learn's 8x8 digits is a sequence of its 8 pixel rows (tokens of width 8,
pixels / 16), and the target is the same sequence upside down (row ``i`` must fetch row ``7 - i``). Training
pushes every query to one key, from uniform attention (``max_i ||diag(a_i) - a_i a_i^T|| = 1/L``) towards a
point mass.

At every pass, on a fixed curvature batch, :func:`lightning_hessian.analyze` measures the diagonal Hessian
blocks ``H(Q,Q)``, ``H(K,K)``, ``H(V,V)`` and :func:`lightning_hessian.compare_attention` (with the target:
the proven setting, checked numerically) evaluates the corrected bound of [P] Thm 1; the bound as the paper's
proof gives it (``variant="paper"``, which assumes ``||dA/dT|| <= 1/L``) is evaluated on the same sequences.

Reference: E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer
Hessians and Their Implications for Scaling Laws", arXiv:2510.16927, Thm 1 (docs/formulas.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_hessian import analyze, compare_attention
from lightning_hessian.formulas import attention
from lightning_hessian.formulas._linalg import softmax_jacobian_row_norms

NAMES = ("Q", "K", "V")


class PaperAttention(nn.Module):
    """The papers' layer: one head, ``W_Q, W_K, W_V`` of shape ``d x d``, no biases, no output projection."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.num_heads = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x)[:, None] for proj in (self.q, self.k, self.v))  # one head
        return F.scaled_dot_product_attention(q, k, v)[:, 0]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target)


@dataclass
class LiveBounds:
    """One row per pass."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    peak: list[float] = field(default_factory=list)  # s = max_i ||diag(a_i) - a_i a_i^T||_2 (1/L: uniform)
    measured: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})
    corrected: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})
    paper: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})
    proven: list[bool] = field(default_factory=list)
    seq_len: int = 8


def digits_sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of pixel rows ``(n, 8, 8)`` and their upside-down targets, float32."""
    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    return images, images.flip(1)


def run(quick: bool = False, seed: int = 0) -> LiveBounds:
    steps, every = (120, 20) if quick else (600, 40)
    x, y = digits_sequences()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PaperAttention(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fixed = (x[:64], y[:64])  # the curvature batch, reused at every pass
    res = LiveBounds(seq_len=x.shape[1])
    for step in range(steps + 1):
        if step % every == 0:
            _measure(model, fixed, step, res)
        if step == steps:
            break
        index = torch.randint(0, len(x), (64,), generator=gen)
        loss = mse(model, (x[index], y[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return res


def _measure(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int, res: LiveBounds) -> None:
    report = analyze(model, mse, batch, tol=1e-6, max_iter=200, trace=False)
    theory = compare_attention(model, mse, batch, report, target=lambda b: b[1])
    (layer,) = theory.layers.values()
    x, target = (t.double() for t in batch)
    w = {n: getattr(model, n.lower()).weight.detach().double().T for n in NAMES}  # d_in x d_out
    paper = attention.block_bounds(x, w["Q"], w["K"], w["V"], target, variant="paper")
    a = attention.forward(x, w["Q"], w["K"], w["V"])["A"]
    res.steps.append(step)
    res.loss.append(report.loss)
    res.peak.append(float(softmax_jacobian_row_norms(a).amax()))
    res.proven.append(layer.proven)
    for n in NAMES:
        res.measured[n].append(layer.measured[n])
        res.corrected[n].append(layer.bound[n])
        res.paper[n].append(float(paper[(n, n)]["total"].mean()))


def summary(res: LiveBounds) -> dict:
    """Worst ratios over passes: measured / corrected (must be <= 1) and measured / paper."""
    out: dict = {"proven_every_pass": all(res.proven)}
    for n in NAMES:
        m, c, p = (np.array(v[n]) for v in (res.measured, res.corrected, res.paper))
        out[n] = {
            "max_corrected_ratio": float((m / c).max()),
            "min_corrected_ratio": float((m / c).min()),
            "max_paper_ratio": float((m / p).max()),
            "paper_violated_at": [s for s, r in zip(res.steps, m / p) if r > 1],
        }
    return out


def plot(res: LiveBounds, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), layout="constrained")
    for ax, n in zip(axes[:3], NAMES):
        ax.semilogy(res.steps, res.measured[n], "o-", color="black", label="measured ‖H‖")
        ax.semilogy(res.steps, res.corrected[n], "s-", color="tab:blue", label="corrected bound")
        ax.semilogy(res.steps, res.paper[n], "^--", color="tab:red", label="paper's bound")
        ax.set_title(f"H({n},{n})")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    ax = axes[3]
    ax.plot(res.steps, res.peak, "o-", color="tab:purple", label="max ‖dA/dT‖ (s)")
    ax.axhline(1 / res.seq_len, color="tab:red", ls="--", label="1/L (paper's assumption)")
    ax.axhline(0.5, color="gray", ls=":", label="1/2 (two-point limit)")
    ax.set_title("attention peakedness")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle("[P] Thm 1 during training: one attention layer, MSE, digits rows upside down")
    fig.savefig(path, dpi=110)
    plt.close(fig)
