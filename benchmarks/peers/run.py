"""The command line of ``benchmarks/compare_peers.py``: what each flag runs, in which order, and the writing.

The page is rewritten after every task (a run cut short keeps its sections, marked partial). Tasks 1 to
5 run under ``sdpa_kernel(SDPBackend.MATH)``: fused attention kernels have no double backward.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _models import SPECS
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import common
from .blocks import measure_blocks
from .callback import measure_callback
from .density import measure_density
from .hvp import measure_hvp
from .memory import measure_memory
from .references import tiny_references
from .render.blocks import render_blocks
from .render.costs import render_callback, render_hvp, render_memory
from .render.markdown import Target
from .render.page import header, page
from .render.spectra import render_density, render_trace
from .render.top_eigenvalue import render_top_eigenvalue
from .top_eigenvalue import measure_top_eigenvalue
from .trace import measure_trace

ALL_TASKS = "1,2,3,4,5,6,7"
RESULTS = Path(__file__).resolve().parents[1] / "results"


class Plan:
    """How much each task measures: ``--quick`` runs fewer seeds and budgets and no deep model."""

    def __init__(self, quick: bool, tasks: set[int], threads: int) -> None:
        self.quick, self.tasks, self.threads = quick, tasks, threads
        self.seeds = list(range(2 if quick else 3))
        self.trace_seeds = list(range(6 if quick else 30))
        self.density_seeds = list(range(3 if quick else 6))
        self.trace_budgets = (30, 90)
        self.density_budgets = ((4, 20), (4, 40)) if quick else ((4, 20), (4, 40), (8, 40))
        self.models = ["reference"] if quick else ["reference", "deep"]
        self.callback_steps = 100 if quick else 300
        self.hvp_rounds = 10 if quick else 20

    def settings(self) -> dict[str, object]:
        """The settings the page's header lists."""
        return {
            "models": ", ".join(self.models) + ", tiny",
            "task 1 seeds": len(self.seeds),
            "task 2 repeats": len(self.seeds),
            "trace seeds": len(self.trace_seeds),
            "trace budgets": self.trace_budgets,
            "density seeds": len(self.density_seeds),
            "density probes×steps": ", ".join(f"{p}×{s}" for p, s in self.density_budgets),
            "training steps (task 7)": self.callback_steps,
        }


class Results:
    """The sections and targets measured so far, and the file they are written to."""

    def __init__(self, out: Path, flags: str, settings: dict[str, object]) -> None:
        self.out, self.flags, self.settings = out, flags, settings
        self.sections: list[list[str]] = []
        self.targets: list[Target] = []
        self.start = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)

    def add(self, lines: list[str], targets: Sequence[Target] = ()) -> None:
        """One more section and its targets; the page is rewritten at once."""
        self.sections.append(lines)
        self.targets += targets
        self.write(partial=True)

    def write(self, partial: bool) -> str:
        """Writes the page (``partial``: marked as written before the run finished) and returns it."""
        seconds = time.perf_counter() - self.start
        text = page(header(self.flags, self.settings), self.targets, self.sections, seconds, partial)
        self.out.write_text(text + "\n")
        return text


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``compare_peers.py``; sets the run's device and fills in the default ``--out``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer seeds, no deep model (about 3 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the results)")
    parser.add_argument("--tasks", default=ALL_TASKS, help="comma-separated task numbers to run")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: where every tool runs (task 6 is CPU-only)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/peers.md, results/peers_gpu.md with cuda"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    common.set_device(device)
    if args.out is None:
        args.out = RESULTS / ("peers_gpu.md" if common.on_cuda() else "peers.md")
    return args


def main(description: str, argv: Sequence[str] | None = None) -> None:
    """Runs the tasks the flags name and writes the page; ``description`` is the ``--help`` text."""
    args = parse(description, argv)
    tasks = {int(t) for t in args.tasks.split(",")}
    if common.on_cuda() and 6 in tasks:
        tasks.discard(6)  # whole-process RSS says nothing about GPU memory
        print("task 6 (peak resident memory) is measured on the CPU only: skipped", file=sys.stderr)
    torch.set_num_threads(args.threads)
    plan = Plan(args.quick, tasks, args.threads)
    flags = (" --quick" if args.quick else "") + (f" --device {args.device}" if common.on_cuda() else "")
    flags += f" --tasks {args.tasks}" if args.tasks != ALL_TASKS else ""
    results = Results(args.out, flags, plan.settings())
    with sdpa_kernel(SDPBackend.MATH):
        _eigenvalue_tasks(plan, results)
        _tiny_tasks(plan, results)
        for name in plan.models if 5 in tasks else []:
            log(f"task 5: one HVP, {name}")
            results.add(*render_hvp(measure_hvp(SPECS[name], plan.hvp_rounds)))
    if 6 in tasks:
        log("task 6: peak memory")
        results.add(render_memory(measure_memory("reference", plan.threads, plan.quick)))
    if 7 in tasks:
        log("task 7: callback overhead")
        results.add(*render_callback(measure_callback(plan.callback_steps, breakdown=not plan.quick)))
    print(results.write(partial=False))
    log(f"written to {args.out}")


def _eigenvalue_tasks(plan: Plan, results: Results) -> None:
    """Tasks 1 and 2, every model (task 2 needs task 1's choices, so it runs task 1 even if not asked)."""
    tops = {}
    for name in plan.models:
        if plan.tasks & {1, 2}:
            log(f"task 1: top eigenvalue, {name}")
            seeds = plan.seeds if name == "reference" else plan.seeds[:2]  # the deep model costs 3x
            tops[name] = measure_top_eigenvalue(SPECS[name], seeds, plan.quick)
            if 1 in plan.tasks:
                results.add(*render_top_eigenvalue(tops[name]))
    for name in plan.models if 2 in plan.tasks else []:
        log(f"task 2: every block, {name}")
        subset = _quick_subset if plan.quick else None  # the peers on layer 0, the embedding and the head
        repeats = len(plan.seeds) if name == "reference" else 2
        result = measure_blocks(
            SPECS[name], tops[name], repeats, peers=name == "reference", tensor_subset=subset
        )
        results.add(*render_blocks(result))


def _quick_subset(name: str) -> bool:
    return not name.startswith("encoder.layers.") or name.startswith("encoder.layers.0.")


def _tiny_tasks(plan: Plan, results: Results) -> None:
    """Tasks 3 and 4 on the tiny float64 model, against its dense Hessian."""
    if not plan.tasks & {3, 4}:
        return
    log("tiny model: dense Hessian")
    tiny, batch = common.build(SPECS["tiny"])
    described = SPECS["tiny"].describe(tiny)
    hessian = tiny_references(tiny, batch)
    if 3 in plan.tasks:
        log("task 3: trace")
        trace = measure_trace(tiny, batch, hessian, plan.trace_budgets, plan.trace_seeds, described)
        results.add(*render_trace(trace))
    if 4 in plan.tasks:
        log("task 4: density")
        density = measure_density(tiny, batch, hessian, plan.density_budgets, plan.density_seeds, described)
        results.add(*render_density(density))
