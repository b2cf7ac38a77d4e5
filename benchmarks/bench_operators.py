"""How to batch curvature products: measured, not guessed.

Model: the DESIGN.md reference, a 2-layer ``nn.TransformerEncoder`` classifier (d=64, 4 heads, FFN 256,
sequence 32, batch 16, ~120k parameters). Everything is reported as a ratio to one gradient on the same
batch, measured in the same run (these machines are noisy), as the median of several repeats.

    python benchmarks/bench_operators.py [--repeats 5] [--out benchmarks/results/operators.md]

Rows:
* gradient: ``torch.autograd.grad`` of the loss (the unit).
* graph build: the forward pass plus the ``create_graph=True`` gradient, paid once per curvature pass.
* full HVP: one whole-model Hessian-vector product on the retained graph.
* all blocks, loop / vmap: one product with every block's diagonal block (1 and 8 vectors per block),
  by a backward per vector, or by one ``is_grads_batched`` backward per block.
* Lanczos top eigenvalue: the whole model, and every block at once, cold (random start) and warm (started
  from the previous pass's Ritz vectors, as the callback does).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _models import Classifier, loss_fn

import lightning_hessian
from lightning_hessian import CurvatureOperator, analyze, find_blocks, model_block
from lightning_hessian._context import curvature_context


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest when shared)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "operators.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Classifier()
    batch = (torch.randint(0, 50, (16, 32)), torch.randint(0, 10, (16,)))
    params = [p for p in model.parameters() if p.requires_grad]
    blocks = find_blocks(model)
    rows: list[tuple[str, float]] = []

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model, batch), params)

    unit = median_seconds(gradient, args.repeats)
    rows.append(("gradient", unit))
    with curvature_context(model):
        rows.append(
            (
                "graph build (forward + create_graph gradient)",
                median_seconds(lambda: CurvatureOperator(model, loss_fn, batch, blocks), args.repeats),
            )
        )
        full = CurvatureOperator(model, loss_fn, batch, [model_block(model)])
        v = [torch.randn(full.sizes[0], 1)]
        rows.append(("full-model HVP", median_seconds(lambda: full.matmat(v), args.repeats)))
        for batching in ("loop", "vmap"):
            op = CurvatureOperator(model, loss_fn, batch, blocks, batching=batching)
            for m in (1, 8):
                vs = [torch.randn(n, m) for n in op.sizes]
                rows.append(
                    (
                        f"all {len(blocks)} blocks, {m} vector(s) each, {batching}",
                        median_seconds(lambda vs=vs, op=op: op.matmat(vs), args.repeats),
                    )
                )
    cold_full = analyze(model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False)
    rows.append(
        (
            f"Lanczos top eigenvalue, whole model, cold ({cold_full.matvecs} matvecs)",
            median_seconds(
                lambda: analyze(model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False),
                args.repeats,
            ),
        )
    )
    cold = analyze(model, loss_fn, batch, smallest=False, trace=False)
    rows.append(
        (
            f"Lanczos top eigenvalue, all blocks, cold ({cold.matvecs} matvecs)",
            median_seconds(lambda: analyze(model, loss_fn, batch, smallest=False, trace=False), args.repeats),
        )
    )
    warm = analyze(model, loss_fn, batch, smallest=False, trace=False, init=cold)
    rows.append(
        (
            f"Lanczos top eigenvalue, all blocks, warm ({warm.matvecs} matvecs)",
            median_seconds(
                lambda: analyze(model, loss_fn, batch, smallest=False, trace=False, init=cold), args.repeats
            ),
        )
    )

    lines = [
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads; "
        f"model {sum(p.numel() for p in params)} parameters, {len(blocks)} blocks, batch 16 x 32 tokens; "
        f"median of {args.repeats}.",
        "",
        "| operation | seconds | / gradient |",
        "|---|---:|---:|",
        *[f"| {name} | {sec:.4f} | {sec / unit:.2f} |" for name, sec in rows],
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
