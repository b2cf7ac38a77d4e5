"""[KG] curvature-aligned stabilisation on a small Transformer: closed form, direct Monte Carlo, live curve.

    python experiments/repro_stabilization.py            # ~1-2 min on one thread; rewrites its section of
                                                         # docs/reproduction.md and its figure
    python experiments/repro_stabilization.py --quick    # a smaller run into a temporary folder

Model: a one-layer pre-LN Transformer encoder (d = 16, 2 heads, FFN 32, mean-pooled, 2.7k parameters, float64)
classifying scikit-learn's 8x8 digits read as 8 tokens of 8 pixels. It is trained with Adam on minibatches,
and during training the library's live path (``track_model(subspace=D)`` + ``measure_stabilization``) logs
the criterion ``S_D / (k (k+1))`` against the samples seen ``k``. At the trained weights ``w*``:

1. closed form against direct Monte Carlo: ``S_D = E_z Var_i[l_i(w* + Uz)]`` from the per-sample terms
   (:func:`~lightning_hessian.formulas.stabilization.probe_variance`) against the sample variance of the
   network's true losses at ``w* + Uz`` averaged over antithetic probes, for several ``σ``; and the
   whole curve ``Δ_2^(D)(k)`` averaged over random data orders (closed form against Monte Carlo);
2. the ``k^-2`` slope of that curve (the running mean's, by construction: the landscape is in ``S_D``);
3. [KG]'s claim that a small-``D`` probe reproduces the full-space signal: ``S_D`` for ``D = 1..8`` against
   the full-space Monte Carlo ``S_full`` (isotropic probes ``N(0, σ² I_P)``, same ``σ`` per coordinate).

References:
    [KG] N. Kiselev, A. Grabovoy, "Curvature-Aligned Probing for Local Loss-Landscape Stabilization",
        arXiv:2604.14870.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_hessian.formulas import stabilization as formulas
from lightning_hessian.stabilization import measure_stabilization, subspace_terms
from lightning_hessian.tracking import track_model

DT = torch.float64
DOCS = Path(__file__).resolve().parents[1] / "docs"
FIGURE = "repro_stabilization.png"
BEGIN, END = "<!-- repro_stabilization: begin -->", "<!-- repro_stabilization: end -->"


class DigitsTransformer(nn.Module):
    """8 rows of 8 pixels as tokens -> one pre-LN encoder layer -> mean pool -> 10 classes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(8, width))
        self.layer = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(self.embed(x) + self.position)
        return self.head(self.norm(h).mean(1))


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def per_sample_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none")


def _flat(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _shift(model: nn.Module, vector: Tensor) -> None:
    """Add a whole-model vector to the weights (in place; the experiment's own copy of the model)."""
    offset = 0
    with torch.no_grad():
        for p in _flat(model):
            p.add_(vector[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()


def probe_losses(model: nn.Module, x: Tensor, y: Tensor, directions: Tensor, sigma: float, probes: int,
                 seed: int) -> Tensor:  # fmt: skip
    """``(probes, n)`` per-sample losses at ``w* + directions z``, ``z ~ N(0, σ² I)`` antithetic."""
    z = formulas.gaussian_probes(probes, directions.shape[1], sigma, torch.Generator().manual_seed(seed))
    rows = []
    for zj in z:
        step = directions @ zj
        _shift(model, step)
        rows.append(per_sample_losses(model, x, y))
        _shift(model, -step)
    return torch.stack(rows)


def full_probe_losses(model: nn.Module, x: Tensor, y: Tensor, sigma: float, probes: int, seed: int) -> Tensor:
    """The same with isotropic probes in the whole parameter space (``directions = I``, never built)."""
    numel = sum(p.numel() for p in _flat(model))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(probes // 2):
        step = sigma * torch.randn(numel, generator=g, dtype=DT)
        for sign in (1.0, -1.0):
            _shift(model, sign * step)
            rows.append(per_sample_losses(model, x, y))
            _shift(model, -sign * step)
    return torch.stack(rows)


def _squared_increments(losses: Tensor) -> Tensor:
    """``(L_{k+1} - L_k)^2`` for every row of ``(probes, n)`` per-sample losses, ``k = 1..n-1``."""
    k = torch.arange(1, losses.shape[1] + 1, dtype=losses.dtype)
    prefix = torch.cumsum(losses, 1) / k
    return ((losses[:, 1:] - prefix[:, :-1]) / k[1:]) ** 2


def _mean_stderr(values: Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / values.numel() ** 0.5)


def loglog_slope(k: np.ndarray, values: np.ndarray, lo: int = 10) -> float:
    keep = (k >= lo) & (values > 0)
    return float(np.polyfit(np.log(k[keep]), np.log(values[keep]), 1)[0])


@dataclass
class Result:
    n: int
    numel: int
    dims: list[int]
    sigmas: list[float]
    sigma: float
    live_k: list[int] = field(default_factory=list)
    live_criterion: list[float] = field(default_factory=list)
    live_variance: list[float] = field(default_factory=list)
    live_products: int = 0
    live_seconds: float = 0.0
    step_seconds: float = 0.0
    closed: dict = field(default_factory=dict)  # (D, σ) -> S_D closed form
    monte_carlo: dict = field(default_factory=dict)  # (D, σ) -> (mean, stderr)
    full: dict = field(default_factory=dict)  # σ -> (mean, stderr) of S_full
    value_variance: float = 0.0
    batch_variance: dict = field(default_factory=dict)  # D -> S_D from a curvature batch of 32
    curve_k: np.ndarray | None = None
    curve_closed: np.ndarray | None = None
    curve_mc: np.ndarray | None = None
    curve_stderr: np.ndarray | None = None
    curve_expected: np.ndarray | None = None
    orders: int = 0
    gradient_part: float = 0.0
    slope_closed: float = 0.0
    slope_mc: float = 0.0
    seconds_closed: float = 0.0
    seconds_mc: float = 0.0
    seconds_terms: float = 0.0
    probes: int = 0


def run(quick: bool = False, seed: int = 0) -> Result:
    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=DT).reshape(-1, 8, 8) / 16
    y_all = torch.tensor(digits.target)
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
    x_all, y_all = x_all[perm], y_all[perm]
    n = 256 if quick else 512  # the training set: the model trains on it, and w* is probed on it
    x, y = x_all[:n], y_all[:n]
    torch.manual_seed(seed)
    model = DigitsTransformer().to(DT)
    numel = sum(p.numel() for p in _flat(model))
    dims = [1, 2, 4] if quick else [1, 2, 4, 8]
    top = dims[-1]
    res = Result(n=n, numel=numel, dims=dims, sigmas=[0.003, 0.01, 0.03, 0.1], sigma=0.01)
    res.probes = probes = 32 if quick else 96
    orders = 50 if quick else 200

    # Training with the live measurement: Adam on minibatches of 32, the criterion every `every` steps.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    curvature_batch = (x[:32], y[:32])
    steps, batch, every = (150 if quick else 400), 32, (25 if quick else 40)
    seen, init, train_seconds = 0, None, 0.0
    for step in range(1, steps + 1):
        began = time.perf_counter()
        idx = torch.randint(n, (batch,), generator=torch.Generator().manual_seed(seed + step))
        loss_fn(model, (x[idx], y[idx])).backward()
        optimizer.step()
        optimizer.zero_grad()
        seen += batch
        train_seconds += time.perf_counter() - began
        if step % every == 0:
            began = time.perf_counter()
            found = track_model(model, loss_fn, curvature_batch, [], init=init, subspace=4, trace_probes=0)
            init = found
            live = measure_stabilization(
                model, loss_fn, curvature_batch, found.subspace, seen, sigma=res.sigma
            )
            res.live_seconds += time.perf_counter() - began
            res.live_products += live.products
            res.live_k.append(seen)
            res.live_criterion.append(live.criterion)
            res.live_variance.append(live.variance)
    res.step_seconds = train_seconds / steps

    # The top-D eigenspace of the Hessian of the mean training loss at w*.
    found = track_model(model, loss_fn, (x, y), [], subspace=top, cold_max_iter=80, tol=1e-6, trace_probes=0)
    u = found.subspace
    began = time.perf_counter()
    values, gradients, hessians = subspace_terms(model, loss_fn, (x, y), u)
    res.seconds_terms = time.perf_counter() - began
    res.value_variance = float(values.var())
    centred = gradients[:, :top] - gradients[:, :top].mean(0)
    res.gradient_part = res.sigma**2 * float(centred.square().sum()) / (n - 1)  # σ² E||b_i - b̄||²
    for d in dims:
        terms = (values, gradients[:, :d], hessians[:, :d, :d])
        for sigma in res.sigmas:
            res.closed[d, sigma] = float(formulas.probe_variance(*terms, sigma))
            losses = probe_losses(model, x, y, u[:, :d], sigma, probes, seed=seed + d)
            res.monte_carlo[d, sigma] = _mean_stderr(losses.var(1))
        batch_terms = (values[:32], gradients[:32, :d], hessians[:32, :d, :d])
        res.batch_variance[d] = float(formulas.probe_variance(*batch_terms, res.sigma))
    for sigma in res.sigmas:
        res.full[sigma] = _mean_stderr(full_probe_losses(model, x, y, sigma, probes, seed=seed + 99).var(1))

    # The whole curve over k, averaged over random data orders: closed form against direct Monte Carlo.
    d = 4
    shuffles = [torch.randperm(n, generator=torch.Generator().manual_seed(1000 + r)) for r in range(orders)]
    began = time.perf_counter()
    terms = (values, gradients[:, :d], hessians[:, :d, :d])
    curve = torch.stack([formulas.subspace_criterion(*(t[p] for t in terms), res.sigma) for p in shuffles])
    res.seconds_closed = (time.perf_counter() - began) / orders
    began = time.perf_counter()
    losses = probe_losses(model, x, y, u[:, :d], res.sigma, probes, seed)
    _squared_increments(losses[:, shuffles[0]]).mean(0)
    res.seconds_mc = time.perf_counter() - began  # one curve from scratch: the probes' forward passes
    squares = torch.stack([_squared_increments(losses[:, p]) for p in shuffles]).mean(0)  # (probes, n-1)
    res.curve_k = np.arange(1, n)
    res.curve_closed = curve.mean(0).numpy()
    res.curve_mc = squares.mean(0).numpy()
    res.curve_stderr = (squares.std(0) / probes**0.5).numpy()
    res.curve_expected = formulas.expected_criterion(
        torch.arange(1, n, dtype=DT), formulas.probe_variance(*terms, res.sigma)
    ).numpy()
    res.orders = orders
    res.slope_closed = loglog_slope(res.curve_k, res.curve_closed)
    res.slope_mc = loglog_slope(res.curve_k, res.curve_mc)
    return res


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def paragraph(*parts: str) -> str:
    return textwrap.fill(" ".join(parts), width=100, break_long_words=False, break_on_hyphens=False)


def section(res: Result, seconds: float, command: str) -> str:
    """The Markdown section, every number from ``res``."""
    s = res.sigma
    top = res.dims[-1]
    worst = max(
        abs(res.closed[key] - res.monte_carlo[key][0]) / res.monte_carlo[key][1] for key in res.closed
    )

    def agrees(d: int, sig: float) -> bool:
        mean, err = res.monte_carlo[d, sig]
        return abs(res.closed[d, sig] - mean) <= 4 * err + 0.05 * res.closed[d, sig]

    local = [sig for sig in res.sigmas if all(agrees(d, sig) for d in res.dims)]
    live_first, live_last = res.live_variance[0], res.live_variance[-1]
    ratio = res.closed[top, s] / res.full[s][0]
    excess_top = res.closed[top, s] - res.value_variance
    excess_full = res.full[s][0] - res.value_variance
    within = abs(excess_top - excess_full) <= 2 * res.full[s][1]
    verdict = (
        "agree, within the Monte Carlo error of the full-space probes"
        if abs(ratio - 1) < 0.1 and within
        else "the totals agree; the probe parts differ"
        if abs(ratio - 1) < 0.1
        else "not here"
    )
    curve_gap = float(np.median(np.abs(res.curve_closed / res.curve_mc - 1)))
    expected_gap = float(np.median(np.abs(res.curve_closed / res.curve_expected - 1)))
    speedup = res.seconds_mc / res.seconds_closed
    speed = f"{'agree' if speedup >= 100 else 'partly'} ({speedup:.0f}x) once the terms are known" + (
        "; counting the terms, direct Monte Carlo is cheaper on this small model"
        if res.seconds_terms > res.seconds_mc
        else ""
    )
    batch_ratio = res.batch_variance[top] / res.closed[top, s]
    curvature_part = res.closed[top, s] - res.value_variance - res.gradient_part
    lines = [
        "## 6. [KG] Curvature-aligned stabilisation: closed form, Monte Carlo and the live criterion",
        "",
        BEGIN,
        "",
        paragraph(
            f"Generated by `{command}` ({seconds:.0f} s on {torch.get_num_threads()} CPU thread(s)).",
            "[KG] (N. Kiselev, A. Grabovoy, arXiv:2604.14870) probe the loss increment",
            "Δ_k(w) = L_(k+1)(w) − L_k(w) in the top-D eigenspace U of the Hessian:",
            "Δ_2^(D)(k) = E_z[Δ_k(w* + Uz)²], z ~ N(0, σ² I_D). Under the local quadratic model it has a",
            "closed form in the per-sample values, projected gradients Uᵀg_i and projected Hessians",
            "UᵀH_iU (docs/formulas.md §6a), and for exchangeable samples E Δ_2^(D)(k) = S_D/(k(k+1)) with",
            "S_D = E_z Var_i l_i(w* + Uz). Model: a one-layer pre-LN Transformer (d = 16, 2 heads,",
            f"{res.numel} parameters, float64) on the digits as 8 tokens of 8 pixels, trained with Adam",
            f"on minibatches of 32 drawn from n = {res.n} training samples (k counts every sample drawn);",
            "w* = its weights after training, probed on the same n samples; U = the top-"
            f"{top} Ritz vectors of the Hessian of the mean training loss from the library's whole-model",
            f"Lanczos (`track_model(subspace={top})`); Monte Carlo with {res.probes} antithetic probes.",
        ),
        "",
        "| σ | D | S_D closed form | S_D direct Monte Carlo (± s.e.) | S_full Monte Carlo, D = P |",
        "|---:|---:|---:|---:|---:|",
    ]
    for sigma in res.sigmas:
        for d in res.dims:
            mean, err = res.monte_carlo[d, sigma]
            full = f"{fmt(res.full[sigma][0])} ± {fmt(res.full[sigma][1], 2)}" if d == top else ""
            lines.append(
                f"| {sigma:g} | {d} | {fmt(res.closed[d, sigma])} | {fmt(mean)} ± {fmt(err, 2)} | {full} |"
            )
    lines += [
        "",
        f"S_0 = Var_i l_i(w*) (no probe) = {fmt(res.value_variance)}.",
        "",
        "| claim | source | ours | verdict |",
        "|---|---|---|---|",
        f"| the closed form equals the probe average | [KG] corollary | closed form vs direct Monte Carlo, "
        f"largest gap {fmt(worst, 2)} standard errors; within 4 s.e. + 5% at σ ∈ "
        f"{{{', '.join(f'{v:g}' for v in local) or 'none'}}} for every D | "
        f"{'agree in the local regime' if local else 'disagree'}"
        f"{'; beyond it the quadratic model fails' if len(local) < len(res.sigmas) else ''} |",
        f"| Δ_2^(D) = O(k^-2) | [KG] theorem | D = 4, σ = {s:g}, averaged over {res.orders} random "
        f"orders: log-log slope k ≥ 10 {res.slope_closed:.3f} (closed form), {res.slope_mc:.3f} (Monte "
        f"Carlo); median relative gap between the two curves {curve_gap:.2g}, between the closed form's "
        f"average and the exact order average S_D/(k(k+1)) {expected_gap:.2g} (a finite sample of orders of "
        "skewed increments; over all orders it is exact: tests/test_formulas_stabilization.py) | agree, by "
        "construction: S_D/(k(k+1)) is the running mean's rate for any bounded losses; the landscape "
        "is in S_D |",
        f"| a small-D probe reproduces the full-space signal | [KG] abstract | σ = {s:g}: S_{top} / S_full = "
        f"{ratio:.3g}, S_1 / S_full = {res.closed[1, s] / res.full[s][0]:.3g}, but S_0 / S_full = "
        f"{res.value_variance / res.full[s][0]:.3g}: the probe-free value term carries most "
        f"of it; the probes' own part S_{top} − S_0 = {fmt(excess_top)} against S_full − S_0 = "
        f"{fmt(excess_full)} ± "
        f"{fmt(res.full[s][1], 2)} | {verdict} (same σ per coordinate) |",
        f"| closed form is orders of magnitude faster than Monte Carlo | [KG] abstract | "
        f"one curve over k (D = 4): {res.seconds_closed * 1e3:.2g} ms closed form from the per-sample "
        f"terms, {res.seconds_mc * 1e3:.3g} ms direct Monte Carlo ({res.probes} probes); the terms took "
        f"{res.seconds_terms:.2g} s ({res.n} samples, D = {top}, one graph per sample) | {speed} |",
        "",
        f"![Stabilisation: live criterion, closed form against Monte Carlo, D](images/{FIGURE})",
        "",
        paragraph(
            "**Live.** During training the library measured S_D on a fixed curvature batch (32 training",
            "samples) with the top-4 Ritz vectors of the warm whole-model Lanczos run (every",
            f"{res.live_k[1] - res.live_k[0] if len(res.live_k) > 1 else 0} samples,",
            f"{res.live_products // max(len(res.live_k), 1)} per-sample Hessian-vector products,",
            f"{res.live_seconds / max(len(res.live_k), 1):.2g} s per",
            "measurement with the Lanczos run, against",
            f"{res.step_seconds * 1e3:.2g} ms per training step). S_D went from {fmt(live_first)} at",
            f"k = {res.live_k[0]} to {fmt(live_last)} at k = {res.live_k[-1]}: the criterion S_D/(k(k+1))",
            f"falls {'faster' if live_last < live_first else 'slower'} than the k^-2 reference",
            "S_D(first)/(k(k+1)) (left panel) by that change, which is the landscape's part. At w* the",
            f"curvature batch's S_{top} is {batch_ratio:.2g}x that of all {res.n} samples: one batch's",
            "level carries its sampling error (per-sample losses are skewed), so the live curve is read",
            "for its trend on a fixed batch.",
        ),
        "",
        paragraph(
            "**What replaces the running-mean check.** Section 3's 1/k slope of \\|L_(k+1) − L_k\\| is",
            "the running-mean identity and holds for any bounded losses; the same is true of the k^-2 of",
            "Δ_2^(D). The information is in S_D: how far apart the per-sample losses are across the",
            "curvature-aligned probes, which the live criterion tracks as training goes on. Here, at",
            f"σ = {s:g} and D = {top}, S_D − S_0 = {fmt(res.closed[top, s] - res.value_variance)} splits",
            f"into the per-sample gradients' spread σ² E‖b_i − b̄‖² = {fmt(res.gradient_part)} and the",
            f"curvature terms {fmt(curvature_part)} (w* is trained on the mean loss, not on every sample's).",
        ),
        "",
        END,
        "",
    ]
    return "\n".join(lines)


def plot(res: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    k = np.array(res.live_k, dtype=float)
    axes[0].loglog(k, res.live_criterion, "o-", label="live S_D/(k(k+1)), D = 4")
    axes[0].loglog(k, res.live_variance[0] / (k * (k + 1)), "k--", label="O(k⁻²) reference")
    axes[0].set(xlabel="samples seen k", ylabel="E Δ₂^(D)(k)", title="live criterion during training")
    axes[0].legend()
    axes[1].loglog(res.curve_k, res.curve_mc, ".", ms=3, alpha=0.6, label="direct Monte Carlo")
    axes[1].loglog(res.curve_k, res.curve_closed, "-", lw=1, label="closed form")
    axes[1].loglog(res.curve_k, res.curve_expected, "k--", lw=0.8, label="S_D/(k(k+1))")
    axes[1].set(xlabel="k", ylabel="Δ₂^(4)(k)", title=f"{res.orders} orders, D = 4, σ = {res.sigma:g}")
    axes[1].legend()
    for sigma in res.sigmas:
        axes[2].semilogy(
            res.dims, [res.closed[d, sigma] for d in res.dims], "o-", label=f"S_D, σ = {sigma:g}"
        )
        axes[2].axhline(res.full[sigma][0], ls=":", color=axes[2].lines[-1].get_color())
    axes[2].axhline(res.value_variance, color="k", lw=0.8, label="S_0 (no probe)")
    axes[2].set(xlabel="D", ylabel="S", title="subspace vs full space (dotted)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(text: str, report: Path) -> None:
    """Replace this experiment's section of ``report`` (between its markers), or append it."""
    old = report.read_text() if report.exists() else ""
    pattern = re.compile(r"## 6\. \[KG\].*?" + re.escape(END) + r"\n", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    report.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples, probes and steps")
    parser.add_argument("--out", help="output folder (default docs; a new temporary folder with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out or (tempfile.mkdtemp(prefix="stabilization-") if args.quick else DOCS))
    (out / "images").mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    res = run(quick=args.quick)
    plot(res, str(out / "images" / FIGURE))
    command = "python experiments/repro_stabilization.py" + (" --quick" if args.quick else "")
    write_section(section(res, time.perf_counter() - began, command), out / "reproduction.md")
    print(
        f"wrote {out / 'reproduction.md'} and {out / 'images' / FIGURE} ({time.perf_counter() - began:.0f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
