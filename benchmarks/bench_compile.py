"""Does ``torch.compile`` make Hessian-vector products cheaper? Measured, not guessed.

``torch.compile`` cannot differentiate twice through a compiled module (AOTAutograd refuses double
backward), so the curvature pass runs compiled models eagerly (``lightning_hessian._context``). The one way
to compile a product is to compile the whole product function: reverse-over-reverse with ``torch.func``
(``grad`` of ``<grad f, v>``; forward-over-reverse is avoided because forward-mode AD through LayerNorm's
backward is wrong in torch 2.13, see benchmarks/results/peers.md), which recomputes the forward at every
product instead of reusing a retained graph. This script compares, on the DESIGN.md reference model (2-layer
encoder, d=64, batch 16 x 32 tokens), each as a ratio to one gradient in the same run:

* the product on the retained graph (what ``CurvatureOperator`` does);
* the ``torch.func`` product, eager and compiled (and the one-off compile time);
* double backward through a ``torch.compile``'d module (expected to be refused).

    python benchmarks/bench_compile.py [--repeats 30] [--out benchmarks/results/compile.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from _models import Classifier, loss_fn, publish, reference_batch
from torch.func import functional_call, grad
from torch.nn.attention import SDPBackend, sdpa_kernel


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function, the functions taking turns (so load on a shared machine hits all
    of them alike) after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Classifier().eval()
    batch = reference_batch()
    names = [name for name, _ in model.named_parameters()]
    leaves = list(model.parameters())
    params = {name: p.detach() for name, p in model.named_parameters()}
    vector = {name: torch.randn_like(p) for name, p in params.items()}

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(lambda tokens: functional_call(model, p, (tokens,)), batch)

    def func_product(p: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return grad(lambda q: sum((g * v[k]).sum() for k, g in grad(loss_of)(q).items()))(p)

    rows: list[tuple[str, float, str]] = []
    with sdpa_kernel(SDPBackend.MATH):
        gradient = torch.autograd.grad(loss_fn(model, batch), leaves, create_graph=True)
        v = [vector[name] for name in names]
        reference = torch.autograd.grad(gradient, leaves, v, retain_graph=True)

        def error(result: dict[str, torch.Tensor]) -> str:
            worst = max(
                ((result[n] - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                for n, r in zip(names, reference)
            )
            return f"max rel. difference {worst:.1e}"

        compiled = torch.compile(func_product)
        start = time.perf_counter()
        first = compiled(params, vector)
        compile_seconds = time.perf_counter() - start
        unit, retained, eager, fast = interleaved_medians(
            [
                lambda: torch.autograd.grad(loss_fn(model, batch), leaves),
                lambda: torch.autograd.grad(gradient, leaves, v, retain_graph=True),
                lambda: func_product(params, vector),
                lambda: compiled(params, vector),
            ],
            args.repeats,
        )
        rows += [
            ("gradient", unit, ""),
            ("product on the retained graph (ours)", retained, "reference"),
            ("torch.func product, eager (forward recomputed)", eager, error(func_product(params, vector))),
            (
                "torch.func product, torch.compile (inductor)",
                fast,
                f"{error(first)}; compiling took {compile_seconds:.1f} s",
            ),
        ]
        try:
            module = torch.compile(Classifier().eval())
            inner = torch.autograd.grad(loss_fn(module, batch), list(module.parameters()), create_graph=True)
            torch.autograd.grad(inner, list(module.parameters()), [torch.ones_like(g) for g in inner])
            refused = "ran"
        except RuntimeError as exc:
            refused = f"refused: {str(exc).splitlines()[0]}"

    lines = [
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); 2-layer reference model, batch 16 x 32 tokens, float32, math "
        f"attention; median of {args.repeats}.",
        "",
        "| product | ms | / gradient | note |",
        "|---|---:|---:|---|",
        *[f"| {name} | {sec * 1e3:.1f} | {sec / unit:.2f} | {note} |" for name, sec, note in rows],
        "",
        f"Double backward through a `torch.compile`d module: {refused}.",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
