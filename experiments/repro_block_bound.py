r"""[P] Thm 6, live: one post-norm Transformer layer at L = 128, d = 64, its full-block bound during training.

The papers' block exactly ([P] eq. (4)): ``Y = LN(X + softmax(X W_Q W_K^T X^T / sqrt(d)) X W_V)``,
``Z = LN(ReLU(Y W_1) W_2 + Y)``, one head, no output projection, no biases, LayerNorms without affine weights,
``d = 64``, ``d_ff = 256``, trained with the mean-squared error by Adam. The task needs attention: each
sequence is 128 of scikit-learn's 8x8 digits (a token is one image, 64 pixels / 16) and the target of token
``i`` is the standardised image of token ``127 - i`` (the sequence reversed, LayerNorm-shaped like ``Z``).

At every pass, on a fixed curvature batch of two sequences, :func:`lightning_hessian.analyze` measures the
Hessian of the whole model (here: the layer's five weight matrices as one block) and its diagonal blocks, and
:func:`lightning_hessian.block_theory.compare_block_bound` (with the target: the proven setting, checked
numerically) evaluates [P] Thm 6 matrix-free (:mod:`lightning_hessian.formulas.block_bound`). The dense route
(:func:`lightning_hessian.formulas.ffn.block_loss_hessian_bound`) would need ``(L d)^2 (Σ n_i)`` numbers here.

Reference: E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer
Hessians and Their Implications for Scaling Laws", arXiv:2510.16927, Thm 5-6 (docs/formulas.md §5).

Run: ``python experiments/repro_block_bound.py`` (about 2 minutes on one thread; ``--quick``: fewer passes).
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_hessian import analyze
from lightning_hessian.block_theory import compare_block_bound

NAMES = ("Q", "K", "V", "W1", "W2")


class Attention(nn.Module):
    """One head, ``W_Q, W_K, W_V`` of shape ``d x d``, no biases, no output projection."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.num_heads = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x)[:, None] for proj in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v)[:, 0]


class PostNormLayer(nn.Module):
    """[P] eq. (4): ``Z = LN(ReLU(Y W_1) W_2 + Y)``, ``Y = LN(X + F(X))``."""

    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.attn = Attention(d)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.linear1 = nn.Linear(d, d_ff, bias=False)
        self.linear2 = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x + self.attn(x))
        return self.norm2(self.linear2(F.relu(self.linear1(y))) + y)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def digit_sequences(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``length`` digits ``(n, L, 64)`` and their reversed, standardised targets."""
    images = torch.tensor(load_digits().images.reshape(-1, 64), dtype=torch.float32) / 16.0
    index = torch.randint(0, len(images), (n, length), generator=torch.Generator().manual_seed(seed))
    x = images[index]
    return x, F.layer_norm(x.flip(1), (64,))


@dataclass
class BlockBoundRun:
    """One row per pass."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)  # ||H|| of the five weights as one block
    blocks: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})
    bound: list[float] = field(default_factory=list)
    proven: list[bool] = field(default_factory=list)
    factors: list[dict[str, float]] = field(default_factory=list)
    bound_seconds: list[float] = field(default_factory=list)  # CPU seconds per sequence (process time)
    peak_rss_mb: float = 0.0
    seq_len: int = 128
    width: int = 64
    d_ff: int = 256
    sequences: int = 2


def run(quick: bool = False, seed: int = 0) -> BlockBoundRun:
    torch.set_num_threads(1)
    steps, every = (40, 20) if quick else (200, 50)
    res = BlockBoundRun()
    x, y = digit_sequences(256, res.seq_len, seed)
    torch.manual_seed(seed)
    model = PostNormLayer(res.width, res.d_ff)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    fixed = (x[: res.sequences], y[: res.sequences])
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps + 1):
        if step % every == 0:
            _measure(model, fixed, step, res)
        if step == steps:
            break
        index = torch.randint(0, len(x), (16,), generator=gen)
        loss = mse(model, (x[index], y[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    res.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _measure(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int, res: BlockBoundRun
) -> None:
    report = analyze(model, mse, batch, full=True, tol=1e-6, max_iter=200, trace=False)
    start = time.process_time()  # CPU time: the machine may be shared, wall time then says little
    result = compare_block_bound(model, mse, batch, report, target=lambda b: b[1])
    res.bound_seconds.append((time.process_time() - start) / res.sequences)
    (layer,) = result.layers.values()
    res.steps.append(step)
    res.loss.append(report.loss)
    res.measured.append(layer.measured)
    res.bound.append(layer.bound)
    res.proven.append(layer.proven and layer.measured_kind == "layer")
    res.factors.append(layer.factors)
    for n in NAMES:
        b = report.blocks[layer.blocks[n]]
        res.blocks[n].append(max(abs(b.top_eigenvalue), abs(b.min_eigenvalue or 0.0)))


def summary(res: BlockBoundRun) -> dict:
    """Worst ratio measured / bound (must be <= 1), timing, and what dominates the bound."""
    ratio = np.array(res.measured) / np.array(res.bound)
    last = res.factors[-1]
    c = 2.0 / (res.seq_len * res.width)
    pairs = {
        (i, j): c * last[f"dZ_{i}"] * last[f"dZ_{j}"]
        + c
        * last["resid"]
        * (last["J_Z"] * last[f"xi_{i}_{j}"] + last[f"B_{i}"] * last["H_Z"] * last[f"B_{j}"])
        for i in NAMES
        for j in NAMES
    }
    top = max(pairs, key=pairs.get)
    ffn_only = max(v for (i, j), v in pairs.items() if i in ("W1", "W2") and j in ("W1", "W2"))
    return {
        "proven_every_pass": all(res.proven),
        "max_ratio": float(ratio.max()),
        "min_ratio": float(ratio.min()),
        "seconds_per_sequence": float(np.mean(res.bound_seconds)),
        "peak_rss_mb": res.peak_rss_mb,
        "dominant_pair": top,
        "ffn_only_bound": 5 * ffn_only,
        "dense_numbers": (res.seq_len * res.width) ** 2 * (3 * res.width**2 + 2 * res.width * res.d_ff),
    }


def table(res: BlockBoundRun) -> str:
    rows = [
        "| step | loss | ‖H‖ (layer) | max block ‖H_bb‖ | bound M_tr | ‖H‖ / M_tr |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, step in enumerate(res.steps):
        top = max(res.blocks[n][i] for n in NAMES)
        rows.append(
            f"| {step} | {res.loss[i]:.4g} | {res.measured[i]:.4g} | {top:.4g} | {res.bound[i]:.4g} | "
            f"{res.measured[i] / res.bound[i]:.3g} |"
        )
    return "\n".join(rows)


def section(res: BlockBoundRun, summ: dict, seconds: float, figure: str = "repro_block_bound.png") -> str:
    """The Markdown section of docs/reproduction.md, every number from ``res``."""
    i, j = summ["dominant_pair"]
    worst = max(range(len(res.steps)), key=lambda k: res.measured[k] / res.bound[k])
    return "\n".join(
        [
            "## 7. [P] Theorems 5-6 during training: the full-block bound of a post-norm layer",
            "",
            f"[P]'s post-norm block exactly (one head, no output projection, no biases, LayerNorms without "
            f"affine weights, ReLU), L = {res.seq_len} tokens of width d = {res.width}, d_ff = {res.d_ff}, "
            "trained with the mean-squared error by Adam (lr 3e-3, batches of 16) to reverse sequences of "
            "scikit-learn digits (a token is one 8x8 image; the target of token i is the standardised "
            "image of "
            f"token {res.seq_len - 1} − i). At every pass, on {res.sequences} fixed sequences, `analyze` "
            "measures ‖H‖ of the five weight matrices as one block (the whole model) and its diagonal "
            "blocks, "
            "and `compare_block_bound(..., target=)` evaluates [P] Thm 6 matrix-free "
            "(`formulas.block_bound`; proven setting, checked numerically at every pass: "
            f"{'yes' if summ['proven_every_pass'] else 'no'}). The dense route would need "
            f"{summ['dense_numbers']:.1e} numbers here. ({seconds:.0f} s)",
            "",
            table(res),
            "",
            "| claim | source | ours | verdict |",
            "|---|---|---|---|",
            f"| ‖H‖ ≤ M_tr (full-block bound) | [P] Thm 6, factors exact, attention ξ chained | "
            f"measured / bound {summ['min_ratio']:.2g} to {summ['max_ratio']:.2g} "
            f"over {len(res.steps)} passes | "
            f"{'holds at every pass' if summ['max_ratio'] <= 1 else 'VIOLATED'} |",
            f"| feasible at L = {res.seq_len}, d = {res.width} | this library | "
            f"{summ['seconds_per_sequence']:.1f} CPU s per sequence, "
            f"peak memory {summ['peak_rss_mb']:.0f} MB "
            "(whole process) | yes |",
            "",
            f"![Thm 6 during training](images/{figure})",
            "",
            f"**Commentary.** The loss falls from {res.loss[0]:.4g} to {res.loss[1]:.4g} "
            f"by step {res.steps[1]} "
            f"and stays there ({res.loss[-1]:.4g} at step {res.steps[-1]}: the reversal is not learned); the "
            "curvature falls with it. "
            "The bound holds and is loose: the measured norm is a fraction "
            f"{res.measured[worst] / res.bound[worst]:.2g} of it at best (step {res.steps[worst]}). "
            "At the last "
            f"pass the largest term of the maximum is the ({i}, {j}) pair; the FFN pairs alone would give "
            f"{summ['ffn_only_bound']:.3g}. Every factor is the exact norm (LayerNorm and FFN factors in "
            "closed form, Jacobian norms and the attention second derivatives by Lanczos); the slack is the "
            "theorem's own: the 5 x 5 block-norm inequality, the product ‖B_i‖ ‖H_Z‖ ‖B_j‖ of worst-case "
            "directions, and, for pairs with an attention weight, the chain rule one stage down.",
            "",
        ]
    )


def plot(res: BlockBoundRun, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    ax = axes[0]
    ax.semilogy(res.steps, res.bound, "s-", color="tab:blue", label="bound M_tr ([P] Thm 6, matrix-free)")
    ax.semilogy(res.steps, res.measured, "o-", color="black", label="measured ‖H‖ (layer as one block)")
    colours = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for n, colour in zip(NAMES, colours):
        ax.semilogy(res.steps, res.blocks[n], ":", color=colour, label=f"‖H({n},{n})‖")
    ax.set_xlabel("step")
    ax.set_title(f"post-norm layer, L = {res.seq_len}, d = {res.width}, d_ff = {res.d_ff}")
    ax.legend(fontsize=7, loc="center right")  # clear of the bound (top) and the Q/K blocks (bottom)
    ax = axes[1]
    ax.semilogy(res.steps, np.array(res.measured) / np.array(res.bound), "o-", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_title("measured / bound (≤ 1: proven)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--figure", default="docs/images/repro_block_bound.png")
    args = parser.parse_args(argv)
    start, cpu = time.perf_counter(), time.process_time()
    res = run(quick=args.quick)
    plot(res, args.figure)
    summ = summary(res)
    print(summ)
    print(f"total {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU\n")
    print(section(res, summ, time.process_time() - cpu))


if __name__ == "__main__":
    main()
