"""What ``HessianMonitor()`` with no arguments costs, and how right its tiers are (issue 12's targets).

Models: nanoGPT-style character GPTs as in ``examples/train_char_gpt.py`` (vocabulary 65, width 128, 4
heads, sequences of 64 characters, batch 8, AdamW with linear warmup then cosine decay), at ``--layers``
depths (default 4 and 12). Each depth trains ``--steps`` steps with and without ``HessianMonitor()``
(zero arguments: budget mode at 5%), interleaved and repeated (``--repeats``), one thread, same seed.

Reported per depth:

* overhead: (median time with the monitor) / (median time without) - 1, and the monitor's own logged
  ``monitor/overhead`` (its seconds over training seconds);
* what it measured: points per tier, rotations over the blocks;
* accuracy: at every whole-model measurement, the logged sharpness against a tight cold Lanczos
  (tol 1e-6) on the same weights and curvature batch; at every per-block measurement, each block's λ_max
  against a tight per-block Lanczos. Weights are copied at those steps by a recorder callback whose own
  time is subtracted.

    python benchmarks/bench_overhead.py [--layers 4 12] [--steps 2000 1000] [--repeats 1]
    python benchmarks/bench_overhead.py --tiny      # a seconds-long smoke run (tests)
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
from _models import publish  # noqa: E402
from train_char_gpt import GPT, TEXT  # noqa: E402

import lightning_hessian  # noqa: E402
from lightning_hessian import Batches, HessianMonitor, analyze, tags  # noqa: E402

VOCAB_TEXT = TEXT.read_text(encoding="utf-8")


class Windows(Dataset):
    """Random windows of the sonnets, drawn from a generator seeded per index (reproducible)."""

    def __init__(self, data: torch.Tensor, context: int, length: int) -> None:
        self.data, self.context, self.length = data, context, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        start = int(torch.randint(len(self.data) - self.context - 1, (), generator=g))
        chunk = self.data[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]


class CharGPT(L.LightningModule):
    def __init__(self, layers: int, dim: int, context: int, steps: int, batch: int) -> None:
        super().__init__()
        chars = sorted(set(VOCAB_TEXT))
        stoi = {c: i for i, c in enumerate(chars)}
        self.data = torch.tensor([stoi[c] for c in VOCAB_TEXT])
        self.model = GPT(len(chars), context, dim=dim, depth=layers, heads=4)
        self.steps, self.context, self.batch = steps, context, batch

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        loss = F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
        warmup = max(1, self.steps // 10)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (
                1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.steps - warmup)))
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(Windows(self.data, self.context, self.steps * self.batch), self.batch)


class Recorder(L.Callback):
    """Copies the weights at every step where the monitor measured the whole model or a group of blocks."""

    def __init__(self, monitor: HessianMonitor) -> None:
        self.monitor = monitor
        self.seconds = 0.0
        self.model_points: list[tuple[int, dict, float]] = []  # step, weights, logged sharpness
        self.block_points: list[tuple[int, dict, dict[str, float]]] = []  # step, weights, block -> λ_max
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        history = list(self.monitor.history)
        for record in history[self._seen :]:
            scalars = record.scalars
            weights = None
            if tags.SHARPNESS in scalars:
                weights = copy.deepcopy(pl_module.state_dict())
                self.model_points.append((record.step, weights, scalars[tags.SHARPNESS]))
            blocks = {
                parsed[0]: value
                for tag, value in scalars.items()
                if (parsed := tags.parse_block_tag(tag))
                and parsed[1] == "top_eigenvalue"
                and parsed[0] != "model"
            }
            if blocks:
                weights = weights or copy.deepcopy(pl_module.state_dict())
                self.block_points.append((record.step, weights, blocks))
        self._seen = len(history)
        self.seconds += time.perf_counter() - start


def train(depth: int, steps: int, monitored: bool, args: argparse.Namespace) -> dict:
    L.seed_everything(0, verbose=False)
    module = CharGPT(depth, args.dim, args.context, steps, args.batch)
    callbacks = []
    monitor = recorder = None
    if monitored:
        # zero arguments (what the README promises) unless --budget says otherwise
        monitor = HessianMonitor() if args.budget is None else HessianMonitor(budget=args.budget)
        recorder = Recorder(monitor)
        callbacks = [monitor, recorder]
    trainer = L.Trainer(
        max_steps=steps,
        # the same logger with and without the monitor: its own cost is not the monitor's
        logger=L.pytorch.loggers.TensorBoardLogger(
            args.logdir, name=f"L{depth}{'' if monitored else '_plain'}"
        ),
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=50,
    )
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start - (recorder.seconds if recorder else 0.0)
    return dict(seconds=seconds, module=module, monitor=monitor, recorder=recorder)


def _loss(module, batch):
    idx, targets = batch
    return F.cross_entropy(module(idx).flatten(0, 1), targets.flatten())


def accuracy(run: dict) -> dict:
    """Relative errors of the logged sharpness and block λ_max against tight Lanczos on the same weights."""
    module, monitor, recorder = run["module"], run["monitor"], run["recorder"]
    data = Batches(monitor._batches)
    model_errors, block_errors = [], []
    for _, weights, logged in recorder.model_points:
        module.load_state_dict(weights)
        truth = analyze(module, _loss, data, blocks=None, full=True, smallest=False, trace=False, tol=1e-6,
                        max_iter=300).full.top_eigenvalue  # fmt: skip
        model_errors.append(abs(logged - truth) / abs(truth))
    for _, weights, blocks in recorder.block_points:
        module.load_state_dict(weights)
        report = analyze(module, _loss, data, blocks=list(blocks), smallest=False, trace=False, tol=1e-6,
                         max_iter=300)  # fmt: skip
        block_errors += [
            abs(blocks[n] - b.top_eigenvalue) / abs(b.top_eigenvalue) for n, b in report.blocks.items()
        ]
    return dict(model=model_errors, blocks=block_errors)


def _cost(monitor: HessianMonitor, kind: str, step_seconds: float) -> str:
    """The median measured cost of one measurement of ``kind``, in training steps."""
    costs = [c for (k, _), cs in monitor.tracker.planner._costs.items() if k == kind for c in cs]
    return f"{statistics.median(costs) / step_seconds:.0f}" if costs else "-"


def _fraction(errors: list[float], bound: float) -> str:
    return f"{sum(e <= bound for e in errors)}/{len(errors)}" if errors else "-"


def _median(errors: list[float]) -> str:
    return f"{statistics.median(errors):.1e}" if errors else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[2000, 1000], help="per depth (or one for all)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--logdir", default="/tmp/bench_overhead")
    parser.add_argument("--budget", type=float, default=None, help="default: HessianMonitor()'s own (5%%)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 2 layers, width 32, 60 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.md")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.steps, args.repeats, args.dim, args.context = [2], [300], 1, 32, 16
        args.budget = 0.5
        args.out = Path(args.logdir) / "overhead_tiny.md"
    torch.set_num_threads(1)

    rows = []
    steps_per_depth = args.steps * len(args.layers) if len(args.steps) == 1 else args.steps
    for depth, steps in zip(args.layers, steps_per_depth):
        plain, watched = [], []
        for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
            plain.append(train(depth, steps, False, args)["seconds"])
            run = train(depth, steps, True, args)
            watched.append(run["seconds"])
        monitor, errors = run["monitor"], accuracy(run)
        history = list(monitor.history)
        counts = {
            tag: sum(tag in r.scalars for r in history) for tag in (tags.UPDATE_CURVATURE, tags.SHARPNESS)
        }
        overhead = statistics.median(watched) / statistics.median(plain) - 1
        step_seconds = statistics.median(plain) / steps
        cost = {kind: _cost(monitor, kind, step_seconds) for kind in ("update", "model", "blocks")}

        params = sum(p.numel() for p in run["module"].parameters())
        rows.append(
            f"| {depth} | {params / 1e6:.2f}M | {steps} | {statistics.median(plain):.1f} | "
            f"{overhead:+.1%} | {monitor.tracker.planner.overhead:.1%} | "
            f"{counts[tags.UPDATE_CURVATURE]} | {counts[tags.SHARPNESS]} | {monitor.tracker.rotations} | "
            f"{cost['update']} / {cost['model']} / {cost['blocks']} | "
            f"{_fraction(errors['model'], 0.05)} ({_median(errors['model'])}) | "
            f"{_fraction(errors['blocks'], 1e-3)} ({_median(errors['blocks'])}) |"
        )
    text = "\n".join(
        [
            f"# HessianMonitor() overhead and accuracy (lightning_hessian {lightning_hessian.__version__})",
            "",
            f"budget {args.budget or 0.05:g}; torch {torch.__version__}, "
            f"{platform.processor() or platform.machine()}, 1 thread; "
            f"width {args.dim}, 4 heads, sequences of {args.context}, batch {args.batch}, AdamW with warmup; "
            f"median of {args.repeats} interleaved runs. Generated by `benchmarks/bench_overhead.py`.",
            "",
            "| layers | params | steps | seconds without | overhead (measured) | monitor/overhead (logged) | "
            "update-tier points | whole-model points | block rotations | "
            "cost per measurement in training steps (update / model / one block) | "
            "sharpness within 5% (median error) | block λ_max within 1e-3 (median error) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
