"""How to batch curvature products: measured, not guessed.

Model: the DESIGN.md reference, a 2-layer ``nn.TransformerEncoder`` classifier (d=64, 4 heads, FFN 256,
sequence 32, batch 16, ~120k parameters). Everything is reported as a ratio to one gradient on the same
batch, measured in the same run (these machines are noisy), as the median of several repeats.

    python benchmarks/bench_operators.py [--repeats 5] [--out benchmarks/results/operators.md]
    python benchmarks/bench_operators.py --device cuda --batch-size 128 --out operators_gpu.md

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
import time
from pathlib import Path

import torch
from _models import Classifier, loss_fn, publish, reference_batch

import lightning_hessian
from lightning_hessian import CurvatureOperator, analyze, find_blocks, model_block
from lightning_hessian._context import curvature_context


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` after one warm-up call; on a GPU the queue is drained before and after."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest when shared)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "operators.md")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (32 tokens each)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (2: the reference model)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Classifier(layers=args.layers).to(device)
    batch = reference_batch(args.batch_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    blocks = find_blocks(model)
    rows: list[tuple[str, float]] = []

    def timed(fn) -> float:
        return median_seconds(fn, args.repeats, device)

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model, batch), params)

    unit = timed(gradient)
    rows.append(("gradient", unit))
    with curvature_context(model):
        rows.append(
            (
                "graph build (forward + create_graph gradient)",
                timed(lambda: CurvatureOperator(model, loss_fn, batch, blocks)),
            )
        )
        full = CurvatureOperator(model, loss_fn, batch, [model_block(model)])
        v = [torch.randn(full.sizes[0], 1, device=device)]
        rows.append(("full-model HVP", timed(lambda: full.matmat(v))))
        for batching in ("loop", "vmap"):
            op = CurvatureOperator(model, loss_fn, batch, blocks, batching=batching)
            for m in (1, 8):
                vs = [torch.randn(n, m, device=device) for n in op.sizes]
                rows.append(
                    (
                        f"all {len(blocks)} blocks, {m} vector(s) each, {batching}",
                        timed(lambda vs=vs, op=op: op.matmat(vs)),
                    )
                )
    cold_full = analyze(model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False)
    rows.append(
        (
            f"Lanczos top eigenvalue, whole model, cold ({cold_full.matvecs} matvecs)",
            timed(
                lambda: analyze(model, loss_fn, batch, blocks=None, full=True, smallest=False, trace=False),
            ),
        )
    )
    cold = analyze(model, loss_fn, batch, smallest=False, trace=False)
    rows.append(
        (
            f"Lanczos top eigenvalue, all blocks, cold ({cold.matvecs} matvecs)",
            timed(lambda: analyze(model, loss_fn, batch, smallest=False, trace=False)),
        )
    )
    warm = analyze(model, loss_fn, batch, smallest=False, trace=False, init=cold)
    rows.append(
        (
            f"Lanczos top eigenvalue, all blocks, warm ({warm.matvecs} matvecs)",
            timed(lambda: analyze(model, loss_fn, batch, smallest=False, trace=False, init=cold)),
        )
    )

    lines = [
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {_device_name(device)}, "
        f"{torch.get_num_threads()} threads; {args.layers}-layer model, {sum(p.numel() for p in params)} "
        f"parameters, {len(blocks)} blocks, batch {args.batch_size} x 32 tokens; median of {args.repeats}.",
        "",
        "| operation | seconds | / gradient |",
        "|---|---:|---:|",
        *[f"| {name} | {sec:.4f} | {sec / unit:.2f} |" for name, sec in rows],
    ]
    publish("\n".join(lines), args.out)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return "CPU"


if __name__ == "__main__":
    main()
