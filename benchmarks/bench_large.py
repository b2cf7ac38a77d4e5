"""Curvature at GPT-2-small scale: exact vs finite-difference products, fused vs math attention.

One command on a GPU machine (about 3-4 minutes on an H200)::

    python benchmarks/bench_large.py            # -> benchmarks/results/large_gpu.md

and a CPU smoke run at toy size (seconds; what CI runs)::

    python benchmarks/bench_large.py --tiny     # -> benchmarks/results/large_tiny_cpu.md

The model is Hugging Face's ``GPT2LMHeadModel`` built from a ``GPT2Config`` (124M parameters at full size:
12 layers, width 768, 12 heads, vocabulary 50257; no download), SDPA attention, random tokens, trained
"bf16-mixed" (float32 weights, bf16 autocast). Curvature passes run in float32 with autocast off. Measured:

1. a training step (forward, backward, AdamW step under bf16 autocast): the unit the costs are given in;
2. one Hessian-vector product of the whole model: exact (double backward, math attention kernel, the
   only one with a double backward), finite differences with the model's own kernel (flash /
   memory-efficient SDPA), and finite differences forced onto the math kernel: time, peak memory and the
   relative error of the finite-difference product against the exact one;
3. the monitor's tiers through ``analyze``, with each backend: the whole model's λ_max; the first layer's
   blocks' λ_max and λ_min; the whole model's trace (Hutch++): time, peak memory, the values and their
   relative difference.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, the process's resident peak (VmHWM) on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import publish
from _peak_memory import reset_peak, status_mb

from lightning_hessian import CurvatureOperator, analyze, find_blocks
from lightning_hessian._context import curvature_context
from lightning_hessian.blocks import model_block

FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, batch=8, seq=512)
TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64, batch=4, seq=32)


def build(size: dict, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=size["n_layer"],
        n_embd=size["n_embd"],
        n_head=size["n_head"],
        vocab_size=size["vocab_size"],
        n_positions=size["n_positions"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    tokens = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), device=device)
    return model, tokens


def loss_fn(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


class Meter:
    """Wall time and peak memory (MiB) of a code block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Meter:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak = status_mb("VmHWM")
        self.seconds = time.perf_counter() - self.start


def training_step(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    times = []
    for _ in range(3):  # the first is a warm-up
        with Meter(device) as meter:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = loss_fn(model, tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(meter.seconds)
    return min(times[1:]), meter.peak


def one_product(model, tokens, device, backend: str, math: bool) -> tuple[torch.Tensor, float, float]:
    block = model_block(model)
    gen = torch.Generator().manual_seed(1)
    vector = torch.randn(block.numel, 1, generator=gen).to(device)
    exact = backend == "exact"
    with curvature_context(model, exact=exact), Meter(device) as meter:
        with sdpa_kernel(SDPBackend.MATH) if math and not exact else _nothing():
            op = CurvatureOperator(model, loss_fn, tokens, [block], products=backend)
            product = op.matmat([vector])[0]
            del op
    return product, meter.seconds, meter.peak


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def tiers(model, tokens, device) -> list[tuple[str, dict]]:
    first_layer = [b.name for b in find_blocks(model) if b.layer == 0]
    return [
        ("whole model λ_max", dict(blocks=None, full=True, smallest=False, trace=False, max_iter=20)),
        (
            f"layer 0 blocks ({len(first_layer)}) λ_max, λ_min",
            dict(blocks=first_layer, trace=False, max_iter=12),
        ),
        (
            "whole model trace (Hutch++, 12 products)",
            dict(blocks=None, full=True, top_k=1, smallest=False, max_iter=2, trace=True, trace_matvecs=12),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy size on CPU (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    size = TINY if args.tiny else FULL
    out = args.out or Path(__file__).parent / "results" / (
        "large_tiny_cpu.md" if args.tiny else "large_gpu.md"
    )
    model, tokens = build(size, device)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"# Curvature at scale: GPT-2 ({params:,} parameters), {name}",
        "",
        f"`python benchmarks/bench_large.py{' --tiny' if args.tiny else ''}`: {size['n_layer']} layers, "
        f"width {size['n_embd']}, batch {size['batch']} x {size['seq']} random tokens, "
        f"torch {torch.__version__}. "
        "Passes in float32, autocast off; the training step in bf16-mixed on a GPU (float32 on CPU).",
        "",
    ]
    step, step_peak = training_step(model, tokens, device)
    lines += [f"Training step: {step * 1e3:.1f} ms, peak {step_peak:.0f} MiB.", ""]

    lines += ["## One whole-model Hessian-vector product", ""]
    lines += ["| products | attention kernel | time (ms) | training steps | peak MiB | rel. error vs exact |"]
    lines += ["|---|---|---:|---:|---:|---:|"]
    exact, seconds, peak = one_product(model, tokens, device, "exact", math=True)
    lines.append(f"| exact | math (forced) | {seconds * 1e3:.0f} | {seconds / step:.1f} | {peak:.0f} | 0 |")
    for math, kernel in [(False, "model's own (flash / efficient)"), (True, "math")]:
        fd, seconds, peak = one_product(model, tokens, device, "finite_difference", math=math)
        error = ((fd - exact).norm() / exact.norm()).item()
        lines.append(
            f"| finite_difference | {kernel} | {seconds * 1e3:.0f} | {seconds / step:.1f} | {peak:.0f} | "
            f"{error:.1e} |"
        )
    del exact, fd

    lines += ["", "## Monitor tiers through `analyze`", ""]
    lines += [
        "| tier | products | time (s) | training steps | peak MiB | λ_max | λ_min | trace | rel. diff |"
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, settings in tiers(model, tokens, device):
        reports = {}
        for backend in ("exact", "finite_difference"):
            with Meter(device) as meter:
                report = analyze(model, loss_fn, tokens, products=backend, tol=1e-3, **settings)
            reports[backend] = report
            first = report.full if report.full is not None else next(iter(report.blocks.values()))
            diff = "-"
            if backend != "exact":
                pairs = [
                    (a, b)
                    for x, y in zip(reports["exact"], report)
                    for a, b in [
                        (x.top_eigenvalue, y.top_eigenvalue),
                        (x.min_eigenvalue, y.min_eigenvalue),
                        (x.trace, y.trace),
                    ]
                    if a is not None and b is not None
                ]
                diff = f"{max(abs(a - b) / max(abs(a), 1e-30) for a, b in pairs):.1e}"
            cost = f"{meter.seconds:.2f} | {meter.seconds / step:.0f} | {meter.peak:.0f}"
            values = f"{first.top_eigenvalue:.4g} | {_fmt(first.min_eigenvalue)} | {_fmt(first.trace)}"
            lines.append(f"| {label} | {backend} | {cost} | {values} | {diff} |")
    lines += [
        "",
        "λ_min / trace / λ_max are the whole model's, or the first listed block's for the layer tier; rel. "
        "diff is the largest relative difference from the exact pass over every number of the tier.",
    ]
    publish("\n".join(lines), out)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    main()
