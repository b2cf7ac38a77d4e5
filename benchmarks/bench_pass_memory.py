"""Peak memory of a curvature pass against that of building the graph plus one product per block.

Model: the nanoGPT of ``examples/train_char_gpt.py`` (``_gpt.py``) with ``--layers`` layers (default 12),
d=128, 4 heads, vocab 65, one batch of 8 x 64 tokens, float32, CPU, one thread. Rows:

* (a) baseline: build the curvature graph (``CurvatureOperator``) and compute one Hessian-vector product
  for every block, one block after the other: what any pass needs at least;
* (b) a deep pass over the blocks of one layer (``--layer``, default 0, whose products run through every
  later layer): ``analyze(blocks=<that layer>)``, top and smallest eigenvalue, tol 1e-3, max_iter 100;
* (c) ``analyze`` over all blocks with the same settings.

(b) and (c) run in both orders of ``analyze``: one block at a time (now) and all blocks together (before:
``analysis._ALL_BLOCKS_AT_ONCE``, same stopping rule, so the same products). Each row runs in a fresh
process (``--worker``) that reports its peak resident memory above the memory just before the
measurement (``VmHWM`` reset through ``/proc/self/clear_refs`` as in ``_peak_memory.py``; Linux only),
after a warm-up on a one-sequence, two-token batch. The parent prints a Markdown table with the ratios to
(a) and writes ``benchmarks/results/pass_memory.md``.

    python benchmarks/bench_pass_memory.py [--layers 12] [--layer 0] [--jobs 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpt import BATCH, SEQ, char_gpt, loss_fn
from _models import publish
from _peak_memory import reset_peak, status_mb

ROWS = (
    ("baseline", "one"),
    ("layer", "one"),
    ("layer", "all"),
    ("all blocks", "one"),
    ("all blocks", "all"),
)
SETTINGS = dict(tol=1e-3, max_iter=100, trace=False)


def _measure(kind: str, order: str, layers: int, layer: int, warm_up: bool) -> dict:
    """Run one measurement; on the warm-up batch when ``warm_up``. Returns its products and steps."""
    from lightning_hessian import Batches, CurvatureOperator, analysis, analyze, find_blocks
    from lightning_hessian._context import curvature_context

    analysis._ALL_BLOCKS_AT_ONCE = order == "all"
    model, batch = char_gpt(layers)
    if warm_up:
        batch = (batch[0][:1, :2], batch[1][:1, :2])
    blocks = find_blocks(model)
    if kind == "baseline":
        with curvature_context(model, "eval", exact=True):
            op = CurvatureOperator(model, loss_fn, Batches([batch]), blocks)
            for index, size in enumerate(op.sizes):
                vectors = [None] * len(op.sizes)
                vectors[index] = torch.randn(size, 1)
                op.matmat(vectors)
            matvecs = op.matvecs
            del op
        return dict(matvecs=matvecs, largest_block=max(b.numel for b in blocks))
    chosen = [b for b in blocks if b.layer == layer] if kind == "layer" else blocks
    settings = dict(SETTINGS, max_iter=2) if warm_up else SETTINGS
    report = analyze(model, loss_fn, batch, blocks=chosen, **settings)
    biggest = max(report, key=lambda r: r.numel)
    return dict(
        matvecs=report.matvecs,
        blocks=len(chosen),
        largest_block=biggest.numel,
        largest_block_steps=max(r.matvecs for r in report if r.numel == biggest.numel),
        params=sum(r.numel for r in report),
        converged=sum(bool(r.converged and r.min_converged) for r in report),
    )


def worker(kind: str, order: str, layers: int, layer: int) -> None:
    """Measure one row in this process and print one JSON line."""
    torch.set_num_threads(1)
    _measure(kind, order, layers, layer, warm_up=True)  # imports, kernels, the block cache: not charged
    gc.collect()
    reset_peak()
    before, peak_before = status_mb("VmRSS"), status_mb("VmHWM")
    start = time.perf_counter()
    result = _measure(kind, order, layers, layer, warm_up=False)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    result.update(
        kind=kind,
        order=order,
        rss_before_mb=round(before, 1),
        peak_delta_mb=round(peak - before, 1),
        slack_mb=round(max(peak_before - before, 0.0), 1),
        seconds=round(seconds, 1),
    )
    print(json.dumps(result))


def _label(kind: str, order: str, layer: int) -> str:
    if kind == "baseline":
        return "(a) graph + one product per block"
    what = f"(b) deep pass, layer {layer}'s blocks" if kind == "layer" else "(c) analyze, all blocks"
    return f"{what}, {'one block at a time' if order == 'one' else 'all blocks together (before)'}"


def _basis_mib(numel: int, steps: int) -> tuple[float, float]:
    """A block's Lanczos basis after ``steps`` steps, and with the copy made when it last grew (MiB, float32).

    ``LanczosChains`` starts with ``min(max_iter + 1, 33)`` slots and doubles them when full.
    """
    slots = 33
    while slots < steps + 1:
        slots *= 2
    mib = numel * 4 / 2**20
    return slots * mib, (slots + (slots // 2 if slots > 33 else 0)) * mib


def markdown(rows: list[dict], layers: int, layer: int, jobs: int) -> str:
    """The result table, with what the memory above (a) is made of."""
    base = rows[0]["peak_delta_mb"]
    lines = [
        f"# Peak memory of a curvature pass: {layers}-layer char GPT (d=128, 4 heads, vocab 65, "
        f"batch {BATCH} x {SEQ} tokens)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, float32, one thread; "
        "peak resident memory above the memory before the measurement, each row in a fresh process "
        "(`python benchmarks/bench_pass_memory.py`). Passes: top and smallest eigenvalue per block, tol "
        "1e-3, max_iter 100, no trace. Target (issue 12): a pass's peak <= 1.25x (a). Seconds are not "
        f"timings: {jobs} row(s) ran side by side.",
        "",
        "| measurement | peak above start (MiB) | x (a) | products | seconds | largest block (steps) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        steps = f" ({row['largest_block_steps']})" if "largest_block_steps" in row else ""
        lines.append(
            f"| {_label(row['kind'], row['order'], layer)} | {row['peak_delta_mb']:.0f} | "
            f"{row['peak_delta_mb'] / base:.2f} | {row['matvecs']} | {row['seconds']:.0f} | "
            f"{row['largest_block']:,}{steps} |"
        )
    slack = max(row["slack_mb"] for row in rows)
    lines += ["", f"Largest slack (peak already above the start when measured): {slack:.1f} MiB."]
    one = next(r for r in rows if r["kind"] == "all blocks" and r["order"] == "one")
    basis, growing = _basis_mib(one["largest_block"], one["largest_block_steps"])
    extra = one["peak_delta_mb"] - base
    lines += [
        "",
        f"What the memory above (a) is, one block at a time: {extra:.0f} MiB for (c); the largest block's "
        f"Lanczos basis ({one['largest_block']:,} parameters, {one['largest_block_steps']} steps) takes "
        f"{basis:.0f} MiB, {growing:.0f} MiB while it grows (old and new storage side by side). All blocks "
        f"together, every basis is alive: {one['params']:,} parameters at 33-66 slots of 4 bytes.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="rows measured side by side")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ORDER"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pass_memory.md")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.layers, args.layer)
        return

    def run(row: tuple[str, str]) -> dict:
        command = [sys.executable, __file__, "--worker", *row, "--layers", str(args.layers)]
        command += ["--layer", str(args.layer)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(result, file=sys.stderr)
        return result

    # Every row has its own process, so rows may run side by side (--jobs): peaks are per process.
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, ROWS))
    publish(markdown(rows, args.layers, args.layer, args.jobs), args.out)


if __name__ == "__main__":
    main()
