"""Lanczos stopping rules measured: the residual rule (default) against the gap estimate (``stop="gap"`` of
``lanczos.lanczos_with_error_estimates``).

    python benchmarks/bench_stopping.py [--models reference,deep] [--seeds 3] [--threads 1]
                                        [--out benchmarks/results/stopping.md]

The same models and batches as ``compare_peers.py`` tasks 1 and 2 (``_models.py``, float32, math attention):
every block's top eigenvalue and the whole model's, cold (random start) and warm (started from the cold
pass's Ritz vectors after one AdamW step, as the callback does), at ``tol`` 1e-3 (the callback's default)
and 1e-4 (``analyze``'s), with ``stop="residual"`` and ``stop="gap"``. Products, the time of the Lanczos
runs (the graph build excluded, it is the same for both) and the worst relative error of the top
eigenvalue over blocks and seeds, against float64 references (residual rule, tol 1e-10), are written as a
Markdown table, with the blocks where the error exceeds ``tol`` and their top reference eigenvalues.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from _models import SPECS, loss_fn, one_optimizer_step

import lightning_hessian
from lightning_hessian import Block, CurvatureOperator, find_blocks, model_block
from lightning_hessian._context import curvature_context
from lightning_hessian.estimators import LanczosResult
from lightning_hessian.estimators.lanczos import ErrorEstimates, lanczos_with_error_estimates


def run(
    model: nn.Module,
    batch: Any,
    blocks: list[Block],
    k: int,
    tol: float,
    stop: str,
    seed: int = 0,
    init: list[Any] | None = None,
) -> tuple[float, int, list[LanczosResult], list[ErrorEstimates]]:
    """Seconds in Lanczos (after the graph build), products, the results and error estimates of one pass."""
    with curvature_context(model):
        op = CurvatureOperator(model, loss_fn, batch, blocks)
        start = time.perf_counter()
        results, estimates = lanczos_with_error_estimates(
            op, k, smallest=False, tol=tol, stop=stop, seed=seed, init=init, max_iter=400
        )
        return time.perf_counter() - start, op.matvecs, results, estimates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="reference,deep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stopping.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines = [
        "## Lanczos stopping rules: residual (default) against the gap estimate",
        "",
        f"`python benchmarks/bench_stopping.py --models {args.models} --seeds {args.seeds}` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; lightning_hessian "
        f"{lightning_hessian.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} thread(s). Products and seconds: medians over {args.seeds} seeds "
        "(seconds: the Lanczos runs, after the graph build); error: the worst relative error of the top "
        "eigenvalue over blocks and seeds against float64 references (residual rule, tol 1e-10). Warm: "
        "started from the cold pass's Ritz vectors after one AdamW step (lr 1e-3), against references at the "
        "new weights.",
        "",
        "| model | blocks | tol | stop | cold products | cold s | cold error | warm products | warm s "
        "| warm error |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    misses: list[str] = []
    with sdpa_kernel(SDPBackend.MATH):
        for name in args.models.split(","):
            model, batch = SPECS[name].build()
            stepped = one_optimizer_step(model, batch)
            for label in ("whole model", "every block"):
                blocks = [model_block(model)] if label == "whole model" else find_blocks(model)
                reference = {}
                for key, m in (("cold", model), ("warm", stepped)):
                    m64 = copy.deepcopy(m).double()
                    b64 = [model_block(m64)] if label == "whole model" else find_blocks(m64)
                    reference[key] = [r.eigenvalues for r in run(m64, batch, b64, 3, 1e-10, "residual")[2]]
                for tol in (1e-3, 1e-4):
                    for stop in ("residual", "gap"):
                        rows: dict[str, list[tuple[float, int, float]]] = {"cold": [], "warm": []}
                        for seed in range(args.seeds):
                            cold = run(model, batch, blocks, 1, tol, stop, seed)
                            init = [r.eigenvectors for r in cold[2]]
                            warm = run(stepped, batch, blocks, 1, tol, stop, seed, init)
                            for key, (seconds, products, results, estimates) in (
                                ("cold", cold),
                                ("warm", warm),
                            ):
                                errors = [
                                    abs(float(r.eigenvalues[0]) / float(ref[0]) - 1)
                                    for r, ref in zip(results, reference[key], strict=True)
                                ]
                                rows[key].append((seconds, products, max(errors)))
                                for b, r, g, e, ref in zip(
                                    blocks, results, estimates, errors, reference[key], strict=True
                                ):
                                    if e > tol:
                                        top = ", ".join(f"{float(v):.6g}" for v in ref)
                                        misses.append(
                                            f"| {name} | `{b.name}` | {tol:g} | {stop} | {key} | {seed} | "
                                            f"{r.steps} | {e:.2e} | {float(g.top[0]):.1e} | "
                                            f"{float(r.residuals[0]):.1e} | {top} |"
                                        )
                        cells = []
                        for key in ("cold", "warm"):
                            cells += [
                                f"{statistics.median(p for _, p, _ in rows[key]):g}",
                                f"{statistics.median(s for s, _, _ in rows[key]):.3f}",
                                f"{max(e for _, _, e in rows[key]):.1e}",
                            ]
                        lines.append(f"| {name} | {label} | {tol:g} | {stop} | " + " | ".join(cells) + " |")
                        print(lines[-1], flush=True)
    lines += ["", "Top eigenvalues less accurate than `tol`:", ""]
    if misses:
        lines += [
            "| model | block | tol | stop | pass | seed | steps | rel. error | gap estimate (abs.) | "
            "residual (abs.) | top 3 reference eigenvalues |",
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
            *misses,
        ]
    else:
        lines.append("none.")
    lines += ["", f"Total wall time {time.perf_counter() - started:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
