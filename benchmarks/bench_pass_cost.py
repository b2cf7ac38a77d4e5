"""What a curvature pass costs, by setting: numbers for choosing ``HessianMonitor``'s arguments.

Model: the DESIGN.md reference (2-layer encoder, d=64, batch 16 x 32 tokens, float32). Each row runs
``analyze`` with the callback's defaults (``HessianMonitor()``'s own analysis settings) changed as the row
says, cold (no warm start) and warm (from the previous row's own report, after one AdamW step, as the
callback does between passes), and reports the products and seconds, also as training steps (one AdamW
step on the same batch, measured in the same run). Medians over ``--repeats`` seeds.

    python benchmarks/bench_pass_cost.py [--repeats 3] [--out benchmarks/results/pass_cost.md]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from _models import Classifier, loss_fn, one_optimizer_step, publish, reference_batch

import lightning_hessian
from lightning_hessian import HessianMonitor, analyze

ROWS: list[tuple[str, dict]] = [
    ("callback defaults (every block + whole model, top and smallest, tol 1e-3)", {}),
    ("without the smallest eigenvalues (smallest=False)", {"smallest": False}),
    ("whole model only (blocks=None)", {"blocks": None}),
    ("whole model only, top only (blocks=None, smallest=False)", {"blocks": None, "smallest": False}),
    ("defaults + trace (trace=True)", {"trace": True}),
    ("defaults + spectral density (density=True)", {"density": True}),
    ("defaults at tol 1e-4", {"tol": 1e-4}),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pass_cost.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Classifier()
    batch = reference_batch()
    stepped = one_optimizer_step(model, batch)
    defaults = {k: v for k, v in HessianMonitor().settings.kwargs().items() if k not in ("rules", "seed")}

    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)

    def train_step_seconds() -> float:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(trained, batch).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    step = train_step_seconds()
    rows = []
    for label, change in ROWS:
        settings = {**defaults, **change}
        cold_s, cold_p, warm_s, warm_p = [], [], [], []
        for seed in range(args.repeats):
            start = time.perf_counter()
            cold = analyze(model, loss_fn, batch, seed=seed, **settings)
            cold_s.append(time.perf_counter() - start)
            cold_p.append(cold.matvecs)
            start = time.perf_counter()
            warm = analyze(stepped, loss_fn, batch, seed=seed, init=cold, **settings)
            warm_s.append(time.perf_counter() - start)
            warm_p.append(warm.matvecs)
        rows.append((label, *(statistics.median(x) for x in (cold_p, cold_s, warm_p, warm_s))))
    step = statistics.median([step, train_step_seconds()])  # before and after: the machine's load drifts

    shown = ", ".join(f"{k}={defaults[k]}" for k in ("top_k", "smallest", "trace", "density", "tol"))
    lines = [
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} thread(s); 2-layer "
        f"reference model, batch 16 x 32 tokens, float32; median of {args.repeats} seeds. One training step "
        f"(forward, backward, AdamW) {step * 1e3:.1f} ms. Callback defaults: {shown}.",
        "",
        "| pass | products, cold | seconds, cold | products, warm | seconds, warm | warm, training steps |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {label} | {cp:g} | {cs:.2f} | {wp:g} | {ws:.2f} | {ws / step:.0f} |"
            for label, cp, cs, wp, ws in rows
        ],
        "",
        "Warm: started from the row's own cold report after one AdamW step (the callback's steady state "
        "starts from the previous pass, `warm_start=True`). A pass of the callback also draws its figures "
        "and, with `theory=True`, compares the attention theory (0.06 s on the demo).",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
