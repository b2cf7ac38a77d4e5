"""The deep ("blocks") tier's accuracy in a budget-mode run: what it logs against a tight float64 Lanczos.

    python benchmarks/bench_deep_tier.py [--layers 2] [--dim 32] [--budget 0.5] [--tiers blocks]
                                         [--rotations 2] [--threads 1] [--out benchmarks/results/deep_tier.md]

The nanoGPT-style GPT of ``examples/train_char_gpt.py`` is trained with AdamW (lr 1e-3, warmup 20 steps,
batch 8, context 64) on the Shakespeare characters of ``examples/data/sonnets.txt``, with a
:class:`~lightning_hessian.CurvatureTracker` planning by ``--budget`` and run the way
:class:`~lightning_hessian.HessianMonitor` runs it (``plan`` on the training time without the tracker's
own, then ``measure``), with the monitor's default analysis settings (``tol=1e-3``, ``max_iter=100``, top
and smallest eigenvalue, warm starts from each block's previous Ritz vectors). The run goes on until
every block has been measured ``--rotations`` times: each block once cold, then warm, so with two
rotations every block kind (two blocks at least) is measured warm at least twice.

At every deep measurement, on the same weights and the same held-out curvature batch (outside the
tracker's clock, so the plan is not changed by it):

* the truth: :func:`~lightning_hessian.analyze` of the same block in float64, ``tol=1e-9``,
  ``max_iter=400``, cold;
* the cold cost: the same block at the tier's settings without a warm start (products only).

Written: per block kind the share of measurements whose λ_max is within 1% / 5% of the truth, the median
and max relative error of λ_max, the median and max error of λ_min relative to the block's λ_max, and the
products per measurement of the tier's warm measurements against cold ones on the same weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

from _models import publish  # noqa: E402
from train_char_gpt import GPT, TEXT, loss_fn  # noqa: E402

from lightning_hessian import HessianMonitor, analyze  # noqa: E402
from lightning_hessian.tracker import DEFAULT_SHARES, CurvatureTracker  # noqa: E402

CONTEXT, BATCH, HEADS, LR, WARMUP = 64, 8, 4, 1e-3, 20
TRUTH = {"dtype": torch.float64, "tol": 1e-9, "max_iter": 400, "trace": False, "smallest": True}


def _batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(data) - CONTEXT - 1, (BATCH,), generator=gen)
    chunks = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
    return chunks[:, :-1], chunks[:, 1:]


def _share(errors: list[float], bound: float) -> str:
    return f"{sum(e <= bound for e in errors) / len(errors):.0%}"


def _row(kind: str, rows: list[dict]) -> str:
    top = [r["top_error"] for r in rows]
    low = [r["min_error"] for r in rows]
    warm = [r["products"] for r in rows if r["warm"]]
    cold = [r["cold_products"] for r in rows if r["warm"]]
    first = [r["products"] for r in rows if not r["warm"]]
    warm_text = f"{statistics.median(warm):.0f} / {statistics.median(cold):.0f}" if warm else "-"
    return (
        f"| {kind} | {len(rows)} ({len(warm)} warm) | {_share(top, 0.01)} | {_share(top, 0.05)} | "
        f"{statistics.median(top):.1e} | {max(top):.1e} | {statistics.median(low):.1e} | {max(low):.1e} | "
        f"{statistics.median(first):.0f} | {warm_text} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--tiers", default="blocks", help="comma-separated tiers planned (default: blocks)")
    parser.add_argument("--rotations", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deep_tier.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    chars = sorted(set(TEXT.read_text()))
    data = torch.tensor([chars.index(c) for c in TEXT.read_text()])
    torch.manual_seed(0)
    model = GPT(len(chars), CONTEXT, args.dim, args.layers, HEADS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    train_gen, held_out = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    curvature_batch = _batch(data, held_out)

    settings = HessianMonitor().settings.kwargs()  # the deep tier's settings in a default monitor
    tiers = args.tiers.split(",")
    tracker = CurvatureTracker(
        budget=args.budget, shares={k: v for k, v in DEFAULT_SHARES.items() if k in tiers}, analysis=settings
    )
    rows: list[dict] = []
    measured: dict[str, int] = defaultdict(int)
    last_step: dict[str, int] = {}  # per block: the step of its previous measurement (its warm start's)
    training_seconds, step_seconds, step = 0.0, [], 0
    while step < args.max_steps:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, _batch(data, train_gen))[0].backward()
        kinds = tracker.plan(training_seconds, step)
        optimizer.step()
        schedule.step()
        step += 1
        step_seconds.append(time.perf_counter() - start)
        training_seconds += step_seconds[-1]
        if not kinds:
            continue
        found = tracker.measure(kinds, model, loss_fn, curvature_batch, step, optimizer)
        if found.report is None:
            continue
        for block in found.report.blocks.values():
            truth = analyze(model, loss_fn, curvature_batch, blocks=[block.name], **TRUTH).blocks[block.name]
            cold = analyze(
                model, loss_fn, curvature_batch, **{**settings, "blocks": [block.name], "full": False}
            ).blocks[block.name]
            scale = abs(truth.top_eigenvalue)
            rows.append(
                {
                    "kind": block.kind,
                    "warm": measured[block.name] > 0,
                    "top_error": abs(block.top_eigenvalue / truth.top_eigenvalue - 1),
                    "min_error": abs(block.min_eigenvalue - truth.min_eigenvalue) / scale,
                    "products": block.matvecs,
                    "cold_products": cold.matvecs,
                    "truth_converged": truth.converged and truth.min_converged,
                    "gap": step - last_step.get(block.name, step),
                }
            )
            measured[block.name] += 1
            last_step[block.name] = step
            print(
                f"step {step}: {block.name} ({'warm' if rows[-1]['warm'] else 'cold'}) λ_max "
                f"{block.top_eigenvalue:.4g} vs {truth.top_eigenvalue:.4g} ({rows[-1]['top_error']:.1e}), "
                f"λ_min err {rows[-1]['min_error']:.1e}, {block.matvecs} products (cold {cold.matvecs})",
                file=sys.stderr,
            )
        if tracker.rotations >= args.rotations:
            break

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    params = sum(p.numel() for p in model.parameters())
    warm = [r for r in rows if r["warm"]]
    gap = statistics.median(r["gap"] for r in warm) if warm else 0
    lines = [
        "# Deep tier in a budget-mode run: logged block eigenvalues against a tight float64 Lanczos",
        "",
        f"`python benchmarks/bench_deep_tier.py` ({datetime.now(timezone.utc):%Y-%m-%d}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"{time.perf_counter() - began:.0f} s): GPT of examples/train_char_gpt.py, {args.layers} layers, "
        f"d={args.dim}, {params} parameters, context {CONTEXT}, batch {BATCH}, AdamW lr {LR:g} (warmup "
        f"{WARMUP}), float32. CurvatureTracker with budget {args.budget:g}, tiers {tiers}, the deep tier at "
        f"HessianMonitor()'s settings (tol {settings['tol']:g}, max_iter {settings['max_iter']}, top and "
        f"smallest eigenvalue, warm starts); {step} training steps (median "
        f"{statistics.median(step_seconds) * 1e3:.0f} ms), {len(rows)} deep measurements of "
        f"{len(measured)} blocks, {tracker.rotations} rotation(s). Truth: analyze of the same block on the "
        f"same weights and curvature batch in float64, tol {TRUTH['tol']:g}, max_iter {TRUTH['max_iter']}, "
        f"cold ({sum(r['truth_converged'] for r in rows)}/{len(rows)} converged).",
        "",
        "| block kind | measurements | λ_max within 1% | within 5% | λ_max median rel. err | max | "
        "λ_min median err / λ_max | max | products, 1st (cold) | products warm / cold on the same weights "
        "(median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(kind, by_kind[kind]) for kind in sorted(by_kind)),
        _row("all", rows),
        "",
        f"Warm measurements: {len(warm)}; their products total {sum(r['products'] for r in warm)} against "
        f"{sum(r['cold_products'] for r in warm)} cold on the same weights; their warm start came from the "
        f"block's previous measurement, a median {gap:.0f} training steps earlier. Relative errors of "
        "1e-7..1e-6 are float32 rounding.",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
