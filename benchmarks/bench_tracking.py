"""The whole-model tier's tracking accuracy: warm ``track_model`` against tight cold Lanczos while training.

    python benchmarks/bench_tracking.py [--steps 150] [--every 10] [--layers 4] [--dim 64]
                                        [--configs 2:1e-2,4:1e-2,8:1e-2,8:1e-3] [--threads 1]
                                        [--out benchmarks/results/tracking.md]

The nanoGPT-style GPT of ``examples/train_char_gpt.py`` (``--layers`` blocks, width ``--dim``, 4 heads,
context 64) is trained on the Shakespeare characters of ``examples/data/sonnets.txt`` with AdamW (lr 1e-3,
linear warmup over 20 steps, batch 8). Every ``--every`` steps, on one fixed held-out curvature batch:

* the truth: cold :func:`~lightning_hessian.tracking.track_model` at ``tol=1e-6``, ``max_iter=200`` for
  :math:`\\lambda_{\\max}(H)` and, with Adam's :math:`P = \\sqrt{\\hat v} + \\epsilon`, for
  :math:`\\lambda_{\\max}(P^{-1} H)`;
* every ``max_iter:tol`` configuration tracked warm (each its own chain of ``init=`` results; the first
  call of a chain is cold, with ``cold_max_iter`` products at most), and the same without the warm start
  (cold, ``cold_max_iter=max_iter``), without trace probes.

Written: per configuration the median and max relative error of both eigenvalues, the share of
checkpoints within 5% (all, and after the first call), products and seconds per call, and the seconds
per call in training steps (forward + backward + AdamW, median over the run).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

from _models import publish  # noqa: E402
from train_char_gpt import GPT, TEXT, loss_fn  # noqa: E402

from lightning_hessian import find_blocks  # noqa: E402
from lightning_hessian.tracking import ModelCurvature, track_model  # noqa: E402

CONTEXT, BATCH, HEADS, LR, WARMUP = 64, 8, 4, 1e-3, 20


def _batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(data) - CONTEXT - 1, (BATCH,), generator=gen)
    chunks = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
    return chunks[:, :-1], chunks[:, 1:]


def _adam_preconditioner(optimizer: torch.optim.AdamW, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adam's diagonal :math:`\\sqrt{\\hat v} + \\epsilon` per parameter name (bias-corrected)."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        correction = 1 - beta2 ** float(state["step"])
        out[name] = (state["exp_avg_sq"] / correction).sqrt() + eps
    return out


def _truth(step: int, t: ModelCurvature) -> str:
    relative = t.top_residual / t.top_eigenvalue, t.preconditioned_residual / t.preconditioned_top
    return (
        f"{step}: {t.top_eigenvalue:.3g} / {t.preconditioned_top:.3g} ({relative[0]:.0e} / {relative[1]:.0e})"
    )


def _within(errors: list[float]) -> str:
    """Share of checkpoints within 5%: all of them / after the first (cold) call."""
    shares = [sum(e <= 0.05 for e in part) / len(part) for part in (errors, errors[1:] or errors)]
    return f"{shares[0]:.0%} / {shares[1]:.0%}"


def _row(
    name: str, errors: list[float], p_errors: list[float], calls: list[ModelCurvature], step_s: float
) -> str:
    products = [c.matvecs for c in calls]
    later = calls[1:] or calls
    seconds = statistics.median(c.seconds for c in later)
    return (
        f"| {name} | {statistics.median(errors):.1e} | {max(errors):.1e} | {_within(errors)} | "
        f"{statistics.median(p_errors):.1e} | {max(p_errors):.1e} | {_within(p_errors)} | {products[0]} | "
        f"{statistics.median(c.matvecs for c in later):.0f} ({max(c.matvecs for c in later)}) | "
        f"{seconds:.2f} | {seconds / step_s:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--configs", default="2:1e-2,4:1e-2,8:1e-2,8:1e-3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tracking.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [(int(m), float(t)) for m, t in (c.split(":") for c in args.configs.split(","))]

    chars = sorted(set(TEXT.read_text()))
    data = torch.tensor([chars.index(c) for c in TEXT.read_text()])
    torch.manual_seed(0)
    model = GPT(len(chars), CONTEXT, args.dim, args.layers, HEADS)
    blocks = find_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    train_gen, held_out = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    curvature_batch = _batch(data, held_out)

    names = [f"warm {m}:{t:g}" for m, t in configs] + [f"cold {m}:{t:g}" for m, t in configs]
    chains: dict[str, ModelCurvature | None] = dict.fromkeys(names)
    calls: dict[str, list[ModelCurvature]] = {n: [] for n in names}
    errors: dict[str, list[float]] = {n: [] for n in names}
    p_errors: dict[str, list[float]] = {n: [] for n in names}
    truths, step_seconds = [], []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, _batch(data, train_gen))[0].backward()
        optimizer.step()
        schedule.step()
        step_seconds.append(time.perf_counter() - start)
        if step % args.every:
            continue
        pre = _adam_preconditioner(optimizer, model)
        truth = track_model(
            model,
            loss_fn,
            curvature_batch,
            blocks,
            preconditioner=pre,
            max_iter=200,
            tol=1e-6,
            trace_probes=0,
        )
        truths.append((step, truth))
        for name, (max_iter, tol) in zip(names, configs + configs):
            warm = name.startswith("warm")
            result = track_model(
                model,
                loss_fn,
                curvature_batch,
                blocks,
                init=chains[name] if warm else None,
                cold_max_iter=64 if warm else max_iter,
                preconditioner=pre,
                max_iter=max_iter,
                tol=tol,
                trace_probes=0,
            )
            chains[name] = result
            calls[name].append(result)
            errors[name].append(abs(result.top_eigenvalue / truth.top_eigenvalue - 1))
            p_errors[name].append(abs(result.preconditioned_top / truth.preconditioned_top - 1))
        print(
            f"step {step}: λ_max {truth.top_eigenvalue:.4g} ({truth.matvecs} products, residual "
            f"{truth.top_residual:.1e} / {truth.preconditioned_residual:.1e}), "
            + ", ".join(f"{n} {errors[n][-1]:.1e}" for n in names),
            file=sys.stderr,
        )

    step_s = statistics.median(step_seconds)
    params = sum(p.numel() for p in model.parameters())
    truth_products = statistics.median(t.matvecs for _, t in truths)
    lines = [
        "# Whole-model tier: warm tracking of λ_max and preconditioned λ_max",
        "",
        f"`python benchmarks/bench_tracking.py` ({datetime.now(timezone.utc):%Y-%m-%d}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)): "
        f"GPT of examples/train_char_gpt.py, {args.layers} layers, d={args.dim}, {params} parameters, "
        f"context {CONTEXT}, batch {BATCH}, AdamW lr {LR:g} (warmup {WARMUP}), {args.steps} steps, a "
        f"checkpoint every {args.every} steps ({len(truths)} in all), float32. Truth: cold Lanczos, tol "
        f"1e-6, max_iter 200 (median {truth_products:.0f} products for both eigenvalues). A training step: "
        f"{step_s * 1e3:.0f} ms (median).",
        "",
        "| max_iter:tol | λ_max median err | max err | within 5% (all / after 1st) | P⁻¹H median err "
        "| max err | within 5% (all / after 1st) | products, 1st call | products / later call (max) "
        "| s / later call | training steps / later call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(n, errors[n], p_errors[n], calls[n], step_s) for n in names),
        "",
        "Products count both eigenvalues. Truth per checkpoint (step: λ_max / preconditioned λ_max, and "
        "their relative Ritz residuals): " + ", ".join(_truth(step, t) for step, t in truths),
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
