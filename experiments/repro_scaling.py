"""Per-block curvature against width, depth and data-set size, on the digits ViT and the character GPT.

    python experiments/repro_scaling.py            # 3 seeds, ~3.5 min of CPU time on one thread; rewrites its
                                                   # section of docs/reproduction.md and its two figures
    python experiments/repro_scaling.py --quick    # 2 seeds, a smaller grid, fewer steps (~15 s of CPU time),
                                                   # into a new temporary folder
    python experiments/repro_scaling.py --out DIR  # DIR/reproduction.md (this section), DIR/images/*.png and
                                                   # every run's numbers in DIR/scaling.json

The two models are the examples' (``examples/train_vit_digits.py``: 8x8 digits in 4x4 patches, a class token;
``examples/train_char_gpt.py``: nanoGPT on the sonnets, context 32), 4 heads, pre-norm blocks. From a base
(width 32, depth 2, all training data) one axis varies at a time: the width ``d``, the depth (number of
layers) and the training set (a fraction of the 1500 training digits; of the sonnets' training text, cut in
chunks of 256 characters, so the size counts tokens). Every configuration is trained for a fixed number of
AdamW steps with one recipe, for several seeds (the seed draws the initialisation, the training subset, the
data order and the estimators' probes). :func:`lightning_hessian.analyze` measures each layer block's
λ_max (Lanczos) and trace (Hutch++) at initialisation and after training, on a fixed batch drawn from the
smallest training subset (so it belongs to every training set, and is a uniform sample of each), and the
blocks are aggregated per kind: per layer, and over layers (λ_max: the largest, that of the block-diagonal
restriction; trace: the sum). Slopes are fitted per seed in log-log and summarised by an interval over
seeds (``scaling_fits``); ``scaling_report`` writes the figures, the tables and the verdicts.

At initialisation the data axis is one model (same seed, same batch): its slope is 0 by construction.

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, arXiv:2410.10986 (ICLR 2025): the attention blocks' growth with
        the input scale; the value block dominates the query block when the attention logits are small.
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, arXiv:2510.16927: Hessian-norm bounds that grow with
        width and sequence length; Thm 7, the loss change from one more sample ~ 1/k.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules

from scaling_families import FAMILIES, Family
from scaling_fits import SlopeFit, fit_magnitude

from lightning_hessian import analyze, find_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"  # where the full run's section and figures live
LossFn = Callable[[nn.Module, Any], Any]

#: Block kinds measured (the embeddings, the head and the final norm are left out: not per layer).
KINDS = ("query", "key", "value", "attn_out", "norm", "ffn_in", "ffn_out")
AXES = ("width", "depth", "data")
STATES = ("init", "trained")


@dataclass(frozen=True)
class Grid:
    """The sizes, seeds, training recipe and estimator settings of one run."""

    widths: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 2, 4)
    fractions: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0)
    base_width: int = 32
    base_depth: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200  # AdamW steps per configuration, every size
    lr: float = 3e-3
    tol: float = 1e-2  # Lanczos residual; the eigenvalue error is about its square
    max_iter: int = 40
    trace_matvecs: int = 9
    curvature_batch: dict[str, int] = field(default_factory=lambda: {"vit": 64, "gpt": 16})

    def configs(self) -> list[tuple[int, int, float]]:
        """Every distinct (width, depth, fraction): the base is shared by the three axes."""
        out = [(w, self.base_depth, 1.0) for w in self.widths]
        out += [(self.base_width, d, 1.0) for d in self.depths]
        out += [(self.base_width, self.base_depth, f) for f in self.fractions]
        return list(dict.fromkeys(out))

    def axis(self, name: str) -> list[tuple[int, int, float]]:
        """The configurations along one axis, in increasing size."""
        if name == "width":
            return [(w, self.base_depth, 1.0) for w in self.widths]
        if name == "depth":
            return [(self.base_width, d, 1.0) for d in self.depths]
        if name == "data":
            return [(self.base_width, self.base_depth, f) for f in self.fractions]
        raise ValueError(f"axis must be one of {AXES}; got {name!r}.")


QUICK = Grid(
    widths=(16, 32),
    depths=(1, 2),
    fractions=(1 / 4, 1.0),
    base_width=16,
    base_depth=1,
    seeds=(0, 1),
    steps=40,
    max_iter=30,
    trace_matvecs=6,
    curvature_batch={"vit": 32, "gpt": 8},
)


@dataclass
class Curvature:
    """One measurement: per kind, λ_max and trace per layer (index = layer), and the loss on the batch."""

    top: dict[str, np.ndarray]
    trace: dict[str, np.ndarray]
    params: dict[str, int]  # per kind, the entries measured (all layers)
    loss: float
    unconverged: int  # blocks whose Lanczos stopped at max_iter

    def overall(self, kind: str, stat: str) -> float:
        """Over layers: the largest λ_max, or the summed trace; ``kind="all"`` takes every kind."""
        kinds = KINDS if kind == "all" else (kind,)
        values = np.concatenate([getattr(self, stat)[k] for k in kinds])
        return float(values.max() if stat == "top" else values.sum())


@dataclass
class Run:
    """One family, configuration and seed."""

    width: int
    depth: int
    fraction: float
    seed: int
    size: int  # training images (ViT) or tokens (GPT)
    init: Curvature
    trained: Curvature
    train_loss: float  # mean of the last 20 training steps
    held_out: float  # ViT: test accuracy; GPT: validation loss (nats/char)
    seconds: float  # training and both measurements, wall clock
    cpu_seconds: float  # the same, this process's CPU time (on one thread: the cost on an idle machine)


@dataclass
class ScalingResult:
    grid: Grid
    runs: dict[str, list[Run]]  # family name -> runs
    seconds: dict[str, float]  # family name -> wall-clock seconds
    cpu_seconds: dict[str, float]  # family name -> CPU seconds of this process

    def find(self, family: str, config: tuple[int, int, float], seed: int) -> Run:
        for run in self.runs[family]:
            if (run.width, run.depth, run.fraction, run.seed) == (*config, seed):
                return run
        raise KeyError((family, config, seed))

    def series(
        self, family: str, axis: str, state: str, kind: str, stat: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sizes ``x`` (width, depth or training-set size) and values of shape ``(seeds, len(x))``."""
        configs = self.grid.axis(axis)
        rows = [[self.find(family, c, s) for c in configs] for s in self.grid.seeds]
        x = np.array([_size(r, axis) for r in rows[0]], dtype=np.float64)
        values = np.array([[getattr(r, state).overall(kind, stat) for r in row] for row in rows])
        return x, values

    def slope(self, family: str, axis: str, state: str, kind: str, stat: str) -> SlopeFit | None:
        """The log-log slope over seeds (``None`` when the values change sign: a trace can)."""
        return fit_magnitude(*self.series(family, axis, state, kind, stat))


def _size(run: Run, axis: str) -> int:
    return {"width": run.width, "depth": run.depth, "data": run.size}[axis]


def measure(model: nn.Module, loss_fn: LossFn, batch: Any, grid: Grid, seed: int) -> Curvature:
    r"""λ_max and trace of every layer block of the kinds in ``KINDS``, aggregated per kind and layer.

    For blocks :math:`b_1, \dots, b_m` merged into one entry (the two LayerNorms of a layer; over layers in
    :meth:`Curvature.overall`), the entry describes the block-diagonal restriction
    :math:`\mathrm{diag}(H_{b_1 b_1}, \dots, H_{b_m b_m})`: its λ_max is :math:`\max_i \lambda_{\max}(H_{b_i
    b_i})` and its trace :math:`\sum_i \mathrm{tr}(H_{b_i b_i})`. λ_max by Lanczos, the trace by Hutch++
    (Meyer et al., 2021), both from :func:`lightning_hessian.analyze`, which leaves the model as found.

    Args:
        model: the model, measured in eval mode.
        loss_fn: ``loss_fn(model, batch) -> (loss, logits)``.
        batch: the curvature batch.
        grid: the Lanczos tolerance and step limit and the Hutch++ budget.
        seed: the estimators' seed.

    Returns:
        Per kind, λ_max and trace per layer, the entries measured, the loss and the unconverged blocks.
    """
    blocks = [b for b in find_blocks(model) if b.kind in KINDS and b.layer is not None]
    report = analyze(
        model,
        loss_fn,
        batch,
        blocks=[b.name for b in blocks],
        smallest=False,
        tol=grid.tol,
        max_iter=grid.max_iter,
        trace_matvecs=grid.trace_matvecs,
        seed=seed,
    )
    depth = 1 + max(b.layer for b in blocks)
    top = {k: np.full(depth, -np.inf) for k in KINDS}
    trace = {k: np.zeros(depth) for k in KINDS}
    params = dict.fromkeys(KINDS, 0)
    for b in report:
        top[b.kind][b.layer] = max(top[b.kind][b.layer], b.top_eigenvalue)
        trace[b.kind][b.layer] += b.trace
        params[b.kind] += b.numel
    unconverged = sum(1 for b in report if b.converged is False)
    return Curvature(top, trace, params, report.loss, unconverged)


def train(model: nn.Module, family: Family, data: Any, grid: Grid, seed: int) -> float:
    """AdamW (betas 0.9 / 0.99, weight decay 0.05), linear warmup over 10% of the steps, then cosine decay to
    0; one recipe for every size. Returns the mean training loss of the last 20 steps."""
    gen = torch.Generator().manual_seed(seed + 1)  # apart from the subset's permutation
    opt = torch.optim.AdamW(model.parameters(), lr=grid.lr, betas=(0.9, 0.99), weight_decay=0.05)
    warmup = max(1, grid.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, grid.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    recent: list[float] = []
    for _ in range(grid.steps):
        loss, _ = family.loss_fn(model, family.training_batch(data, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent = [*recent[-19:], loss.item()]
    return float(np.mean(recent))


def run_family(family: Family, grid: Grid, log: Callable[[str], None] = print) -> list[Run]:
    """Every configuration and seed of one family; the initial measurement is shared by the configurations
    with the same architecture (same seed: same weights, same batch)."""
    smallest = min(grid.fractions)
    runs = []
    for seed in grid.seeds:
        batch = family.curvature_batch(seed, smallest, grid.curvature_batch[family.name])
        initial: dict[tuple[int, int], Curvature] = {}
        for width, depth, fraction in grid.configs():
            start, cpu = time.perf_counter(), time.process_time()
            torch.manual_seed(seed)
            model = family.model(width, depth)
            if (width, depth) not in initial:
                initial[width, depth] = measure(model, family.loss_fn, batch, grid, seed)
            data = family.training_set(fraction, seed)
            train_loss = train(model, family, data, grid, seed)
            trained = measure(model, family.loss_fn, batch, grid, seed)
            runs.append(
                Run(
                    width=width,
                    depth=depth,
                    fraction=fraction,
                    seed=seed,
                    size=family.size(data),
                    init=initial[width, depth],
                    trained=trained,
                    train_loss=train_loss,
                    held_out=family.held_out(model),
                    seconds=time.perf_counter() - start,
                    cpu_seconds=time.process_time() - cpu,
                )
            )
            log(f"  {family.name} seed {seed} d={width} L={depth} f={fraction:g}: {runs[-1].seconds:.1f} s")
    return runs


def run(quick: bool = False, grid: Grid | None = None, log: Callable[[str], None] = print) -> ScalingResult:
    """The whole experiment: both families, every configuration and seed of ``grid`` (default: the full
    grid, or ``QUICK`` with ``quick``)."""
    grid = grid or (QUICK if quick else Grid())
    if min(grid.fractions) <= 0 or max(grid.fractions) > 1:
        raise ValueError(f"fractions must lie in (0, 1]; got {grid.fractions}.")
    if len(grid.seeds) < 2:
        log("one seed: the slopes get no interval (pass at least two seeds for one)")
    runs, seconds, cpu = {}, {}, {}
    for name, family in FAMILIES.items():
        start, cpu_start = time.perf_counter(), time.process_time()
        runs[name] = run_family(family(), grid, log)
        seconds[name] = time.perf_counter() - start
        cpu[name] = time.process_time() - cpu_start
    return ScalingResult(grid, runs, seconds, cpu)


def main(argv: list[str] | None = None) -> None:
    import scaling_report

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, widths 16/32, depths 1/2, 40 steps")
    parser.add_argument(
        "--out", help="results folder (default docs for the full run, a new temporary folder with --quick)"
    )
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3, or 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else Grid()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be at least 1; got {args.seeds}")
        grid = replace(grid, seeds=tuple(range(args.seeds)))
    start = time.perf_counter()
    result = run(grid=grid)
    command = "python experiments/repro_scaling.py" + (" --quick" if args.quick else "")
    out = Path(args.out or (tempfile.mkdtemp(prefix="scaling-") if args.quick else DOCS))
    # the committed page gets the section and figures; the raw numbers only go to results folders
    numbers = out.resolve() != DOCS.resolve()
    paths = scaling_report.write(result, out, time.perf_counter() - start, command, numbers=numbers)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
