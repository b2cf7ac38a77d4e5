"""Peak memory and time of a curvature pass with and without ``chunk_size``.

The reference model of ``bench_operators.py`` (2-layer encoder, d=64, 4 heads, FFN 256, ~100k
parameters) on one batch of ``--batch`` sequences of 128 tokens, float32. The pass is the callback's
typical one, the whole model's top eigenvalue (``analyze(..., blocks=None, full=True, smallest=False,
trace=False)``) with a fixed number of Lanczos steps (``--steps``), so that every setting makes the same
products. Each setting runs in a fresh process (``python benchmarks/bench_chunked_memory.py --worker``)
that reports its peak resident memory above the memory before the pass (``VmHWM`` reset by
``/proc/self/clear_refs``, as in ``_peak_memory.py``; Linux only); the parent prints a Markdown table and
writes ``benchmarks/results/chunked_memory.md``.

    python benchmarks/bench_chunked_memory.py [--batch 64] [--chunks none 32 16 8 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _models import ModelSpec, loss_fn
from _peak_memory import reset_peak, status_mb

SEQ = 128


def spec(batch: int) -> ModelSpec:
    return ModelSpec("reference", 64, 4, 2, 256, 50, 10, SEQ, batch, torch.float32)


def worker(batch: int, chunk: int | None, steps: int) -> None:
    """Measure one setting in this process and print one JSON line."""
    from lightning_hessian import analyze

    torch.set_num_threads(1)
    model, data = spec(batch).build()
    kwargs = dict(blocks=None, full=True, smallest=False, trace=False, tol=1e-12, max_iter=steps)
    # Warm-up on a two-sequence batch: imports and one-time initialisation are not charged.
    analyze(model, loss_fn, (data[0][:2], data[1][:2]), chunk_size=chunk, **kwargs)
    gc.collect()
    reset_peak()
    before, peak_before = status_mb("VmRSS"), status_mb("VmHWM")
    start = time.perf_counter()
    report = analyze(model, loss_fn, data, chunk_size=chunk, **kwargs)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    print(
        json.dumps(
            dict(
                chunk=chunk,
                peak_delta_mb=round(peak - before, 1),
                slack_mb=round(max(peak_before - before, 0.0), 1),
                seconds=round(seconds, 2),
                top=report.full.top_eigenvalue,
                matvecs=report.matvecs,
            )
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunks", nargs="+", default=["none", "32", "16", "8", "4"])
    parser.add_argument("--steps", type=int, default=10, help="Lanczos steps (products) per pass")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chunked_memory.md")
    args = parser.parse_args()
    if args.worker:
        worker(args.batch, None if args.chunk == "none" else int(args.chunk), args.steps)
        return

    rows = []
    for chunk in args.chunks:
        command = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--chunk", chunk]
        command += ["--steps", str(args.steps)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    model, _ = spec(args.batch).build()
    import lightning_hessian

    lines = [
        "# Peak memory of a curvature pass with `chunk_size`",
        "",
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, 1 thread. "
        f"{spec(args.batch).describe(model)}; whole-model top eigenvalue, {args.steps} Lanczos steps. "
        f"`python benchmarks/bench_chunked_memory.py --batch {args.batch} --chunks {' '.join(args.chunks)} "
        f"--steps {args.steps}`; peak resident memory above the memory before the pass, one fresh process "
        "per row.",
        "",
        "| chunk_size | peak memory (MiB) | vs. no chunks | seconds | vs. no chunks | λ_max | rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['chunk'] if row['chunk'] is not None else 'None (graphs kept)'} | "
            f"{row['peak_delta_mb']:.1f} | {row['peak_delta_mb'] / base['peak_delta_mb']:.2f}x | "
            f"{row['seconds']:.2f} | {row['seconds'] / base['seconds']:.2f}x | {row['top']:.6g} | "
            f"{abs(row['top'] - base['top']) / abs(base['top']):.1e} |"
        )
    slack = max(row["slack_mb"] for row in rows)
    lines += [
        "",
        f"Peak-reset slack (memory that may be hidden under an earlier peak): {slack:.1f} MiB.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
