"""Tasks 3 and 4 in Markdown: trace and density errors at equal budgets, targets against the best peer."""

from __future__ import annotations

import statistics

from ..density import OURS, DensityResult
from ..trace import OURS_DEFAULT, TraceResult
from .markdown import Target, compare_means, mean_and_error, table


def render_trace(result: TraceResult) -> tuple[list[str], list[Target]]:
    """The section of task 3 and one target per budget: our best estimator against the best peer's."""
    budgets, ev, exact = result.budgets, result.eigenvalues, result.exact
    rows = [
        [name]
        + [mean_and_error(result.errors[name, m], 3) for m in budgets]
        + [f"{statistics.median(result.seconds[name, m]):.3f}" for m in budgets]
        for name in result.methods
    ]
    theory = "; ".join(
        f"at {m}: Hutchinson {hutchinson:.3f}, ideal Hutch++ {hutchpp:.3f}"
        for m, (hutchinson, hutchpp) in result.theory.items()
    )
    lines = [
        f"### Task 3 — trace at equal matvec budgets: {result.description}",
        "",
        f"Exact trace {exact:.6g} (dense Hessian), a sum with heavy cancellation: eigenvalues from "
        f"{ev[0]:.3g} to {ev[-1]:.3g}, positive ones summing to {sum(x for x in ev if x > 0):.4g}, negative "
        f"ones to {sum(x for x in ev if x < 0):.4g}; the top 10 eigenvalues hold "
        f"{100 * result.top10_share:.0f}% of ||H||_F^2. Mean relative error ± its standard error over "
        f"{result.n_seeds} seeds, and the median time. Expected RMS relative errors from theory: {theory}. "
        "PyHessian and hessian-eigenthings' Hutchinson draw identical probes (both from a CPU generator "
        "seeded alike), hence identical errors.",
        "",
        *table(
            ["estimator", *[f"error @ {m} matvecs" for m in budgets], *[f"seconds @ {m}" for m in budgets]],
            rows,
        ),
    ]
    targets = []
    for m in budgets:
        ours = min((k for k in result.methods if k.startswith("ours")), key=lambda k: result.mean_error(k, m))
        peer = min(
            (k for k in result.methods if not k.startswith("ours")), key=lambda k: result.mean_error(k, m)
        )
        status, detail = compare_means(result.errors[ours, m], result.errors[peer, m])
        targets.append(
            (
                f"task 3: trace at {m} matvecs at least as accurate as the best peer",
                status,
                f"ours best ({ours}) {result.mean_error(ours, m):.4f} vs best peer ({peer}) "
                f"{result.mean_error(peer, m):.4f}: {detail}; our default Hutch++ "
                f"{result.mean_error(OURS_DEFAULT, m):.4f}",
            )
        )
    return lines, targets


def render_density(result: DensityResult) -> tuple[list[str], list[Target]]:
    """The section of task 4 and one target per budget: ours against the best peer."""
    budgets = result.budgets
    rows = [
        [name]
        + [mean_and_error(result.distances[name, b], 4) for b in budgets]
        + [f"{statistics.median(result.seconds[name, b]):.3f}" for b in budgets]
        for name in result.methods
    ]
    label = [f"{p}×{s}" for p, s in budgets]
    lines = [
        f"### Task 4 — spectral density at equal probes × steps: {result.description}",
        "",
        "Wasserstein-1 distance between each tool's quadrature measure (nodes and weights, averaged over "
        f"probes; no smoothing) and the exact spectrum of {result.n_eigenvalues} eigenvalues, divided by the "
        f"spectral width {result.width:.4g}; mean ± standard error over {result.n_seeds} seeds, and the "
        "median time. curvlinops' `lanczos_approximate_spectrum` returns only a smoothed density on a "
        "grid, after extra products to estimate the spectral boundaries: not comparable at equal matvecs, "
        "left out.",
        "",
        *table(
            ["estimator", *[f"W1 / width @ {x}" for x in label], *[f"seconds @ {x}" for x in label]], rows
        ),
    ]
    targets = []
    for b, x in zip(budgets, label):
        peer = min((k for k in result.methods if k != OURS), key=lambda k: result.mean(k, b))
        status, detail = compare_means(result.distances[OURS, b], result.distances[peer, b])
        targets.append(
            (
                f"task 4: density at {x} at least as accurate as the best peer",
                status,
                f"ours {result.mean(OURS, b):.4f} vs {peer} {result.mean(peer, b):.4f}: {detail}",
            )
        )
    return lines, targets
