"""The results page: the header (machine, versions, settings), the targets, the sections, the caveats."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata

import torch

import lightning_hessian

from .. import common
from .markdown import Target, table, verdict

PEERS = (
    "pyhessian",
    "hessian-eigenthings",
    "curvlinops-for-pytorch",
    "scipy",
)  # their versions go in the header

CAVEATS = [
    "### Caveats and fairness",
    "",
    "- **curvlinops computes a slightly wrong Hessian on these models (a PyTorch bug, not curvlinops' "
    "code).** Its product is `jvp(jacrev(loss))` under `vmap`; on torch 2.13 forward-mode AD through the "
    "*vmapped* LayerNorm backward gives wrong rows for LayerNorm weights whose input depends on other "
    "parameters (see task 5's agreement table: the worst tensor is a `norm*.weight`; the whole product is "
    "off by ~1e-3 to 1e-2 and the matrix is not symmetric). The same bug makes `torch.func.hessian` (= "
    "`jacfwd(jacrev)`) and `jacrev(jacrev)` wrong on any block containing a LayerNorm weight and something "
    "upstream of it, so the dense references here use `vmap(jvp(grad))` and are checked for symmetry. "
    "Reproducer: `f(w, A) = (layer_norm(x @ A, (d,), w) ** 3).sum()`; `jvp(jacrev(f), (w, A), (vw, vA))` "
    "differs from autograd double backward and from `jvp(grad(f), ...)` in the `w` rows (related upstream "
    "reports: pytorch/pytorch#196700, pytorch/functorch#534). Its errors in tasks 1-4 include this bias.",
    "- PyHessian: its `trace(maxIter, tol)` stops when `|mean - previous| / (previous + 1e-6) < tol`; with a "
    "negative running mean that ratio is negative and the loop stops at once, so a fixed budget needs "
    "`tol=-inf` (used here). Its `density` needs the `torch.eig` shim; its `normalization` adds 1e-6 to "
    "every norm. Its graph build uses `loss.backward(create_graph=True)` and leaves that graph in `.grad` "
    "(cleared after every call here, inside the timed run).",
    "- hessian-eigenthings: `lanczos()`'s default is k=10 with 20 steps (largest magnitude); with k=1 it "
    "runs 2 steps. Its operator rebuilds the gradient graph at every product (no retained graph), so a "
    "product costs a forward and two backwards; restricted to one tensor that is much cheaper for tensors "
    "near the output (autograd prunes the rest).",
    "- curvlinops: the determinism check at construction is turned off (in its favour); `eigsh` runs in "
    "float64 on the float32 products (`to_scipy()` default); ARPACK's default ncv=20 means at least 20 "
    "products. Its vmapped multi-column products are cheap per column (task 5), which helps its trace "
    "estimators, not `eigsh`.",
    "- Our configurations: Lanczos tol values are relative Ritz-residual tolerances (tol=1e-4 is the "
    "default; the eigenvalue error is typically the square of the residual over the gap, far below tol). "
    "'Fastest accurate' configurations are picked after the fact with the reference in hand, for every tool "
    "alike: a user without a reference would run the defaults.",
    "",
]


def header(flags: str, settings: dict) -> list[str]:
    """The page's title, the command that wrote it (``flags``: its options), the machine and the settings."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PEERS)
    gpu = []
    if common.on_cuda():
        props = torch.cuda.get_device_properties(common.DEVICE)
        gpu = [
            f"- device: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
            f"multiprocessors), CUDA {torch.version.cuda}; every tool's models, batches and products on the "
            "GPU; timers synchronise the GPU before they stop"
        ]
    return [
        "## Side by side with PyHessian, hessian-eigenthings and curvlinops"
        + (" (GPU)" if common.on_cuda() else ""),
        "",
        f"`python benchmarks/compare_peers.py{flags}` on {now}.",
        "",
        *gpu,
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.machine()}, {platform.system()}; torch threads "
        f"{torch.get_num_threads()} (one thread by default: on a shared 2-core machine two OpenMP threads "
        "made single timings swing by 100x; ratios within one run are what to read)",
        f"- versions: lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {versions}",
        "- settings: " + "; ".join(f"{k} {v}" for k, v in settings.items()),
        "- every tool: same model, batch and dtype; `sdpa_kernel(SDPBackend.MATH)`; eval mode, dropout 0",
        "",
    ]


def page(
    top: list[str], targets: Sequence[Target], sections: Sequence[list[str]], seconds: float, partial: bool
) -> str:
    """The whole page: ``top`` (the header), the targets, every section, the caveats and the wall time."""
    out = list(top)
    if partial:
        out += [f"**Partial: written after {len(sections)} section(s); the run has not finished.**", ""]
    out += ["### Targets", ""]
    out += table(["target", "result", "numbers"], [[t, verdict(ok), d] for t, ok, d in targets], "lll")
    out += [""]
    for section in sections:
        out += [*section, ""]
    out += CAVEATS
    out += [f"Total wall time {seconds:.0f} s."]
    return "\n".join(out)
