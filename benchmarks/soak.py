"""Soak test: does memory stay flat over hundreds of curvature passes, and what do they cost?

A tiny Transformer trains for ``--steps`` optimizer steps with ``HessianMonitor`` measuring every
``--every`` steps (TensorBoard logger, figures, alerts: the whole callback). Three runs on the same data:

1. without the callback: the training time the overhead is relative to;
2. with the callback: after every pass (and a ``gc.collect()``) the process's resident set size (psutil,
   else ``/proc/self/statm``) and, on CUDA, ``torch.cuda.memory_allocated`` / ``max_memory_allocated``;
3. the same with ``tracemalloc`` on: the Python heap after every pass (tracemalloc slows Python down, so
   this run is not timed and torch's own allocations are not in it).

A straight line is fitted to each memory series against the pass number, after ``--warmup`` passes
(allocator pools, lazy imports and the first TensorBoard writes settle there) and, separately, over the
last half of the passes, and after pass 200: a leak shows as a slope that stays positive; bounded
histories (the alert history keeps the last 200 passes) show as a slope that falls to zero once they
are full.

    python benchmarks/soak.py [--steps 600] [--every 2] [--warmup 10] [--out benchmarks/results/soak.md]

Prints a Markdown report and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hessian
from lightning_hessian import HessianMonitor

VOCAB, SEQ, D = 13, 6, 16
HISTORY = 200  # AlertManager keeps the last 200 passes: past that, nothing may grow


class Tiny(L.LightningModule):
    """Tokens -> one Transformer layer (dropout) -> mean pool -> 3 classes; AdamW."""

    def __init__(self, samples: int = 256) -> None:
        super().__init__()
        self.samples = samples
        self.embed = nn.Embedding(VOCAB, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.1, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens)).mean(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(VOCAB, (self.samples, SEQ), generator=g)
        return DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=8, shuffle=True)


def rss_mb() -> float:
    """Resident set size of this process in MiB (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


class _Probe(Callback):
    """After each pass of ``monitor``: collect garbage, then record the memory series."""

    def __init__(self, monitor: HessianMonitor, python_heap: bool) -> None:
        self.monitor, self.python_heap = monitor, python_heap
        self.records: list[dict[str, float]] = []
        self._seen = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.monitor.passes == self._seen:
            return
        self._seen = self.monitor.passes
        gc.collect()
        record = {"pass": float(self._seen), "step": float(trainer.global_step), "rss_mb": rss_mb()}
        if self.python_heap:
            record["traced_kb"] = tracemalloc.get_traced_memory()[0] / 1024
        if torch.cuda.is_available():
            record["cuda_mb"] = torch.cuda.memory_allocated() / 2**20
            record["cuda_max_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        self.records.append(record)


def _train(steps: int, every: int | None, python_heap: bool, accelerator: str) -> tuple[float, Any, Any]:
    """One run; returns (seconds, monitor or None, probe or None)."""
    L.seed_everything(0, verbose=False)
    callbacks: list[Callback] = []
    monitor = probe = None
    if every is not None:
        monitor = HessianMonitor(every_n_steps=every, at_end=False)
        probe = _Probe(monitor, python_heap)
        callbacks = [monitor, probe]
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_steps=steps,
            accelerator=accelerator,
            devices=1,
            logger=TensorBoardLogger(logs, name="soak"),
            callbacks=callbacks,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = Tiny()
        if python_heap:
            tracemalloc.start()
        start = time.perf_counter()
        try:
            trainer.fit(module)
        finally:
            seconds = time.perf_counter() - start
            if python_heap:
                tracemalloc.stop()
    return seconds, monitor, probe


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x (0 for fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def _series(records: list[dict[str, float]], key: str, warmup: int, scale: float) -> dict[str, float]:
    points = [(r["pass"], r[key] * scale) for r in records if r["pass"] > warmup and key in r]
    half = points[len(points) // 2 :]
    full = [(x, y) for x, y in points if x > HISTORY]
    return {
        "first": points[0][1] if points else float("nan"),
        "last": points[-1][1] if points else float("nan"),
        "slope": slope(points),
        "slope_last_half": slope(half),
        "slope_full": slope(full) if len(full) >= 10 else float("nan"),
    }


def run(
    steps: int = 600,
    every: int = 2,
    out: Path | None = None,
    warmup_passes: int = 10,
    accelerator: str = "cpu",
) -> dict[str, Any]:
    """Run the soak test, print and write the Markdown report.

    Args:
        steps: optimizer steps per run.
        every: a pass every this many steps.
        out: where to write the report (``None``: do not write).
        warmup_passes: passes left out of the fits.
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``).

    Returns:
        ``passes`` (per pass: ``pass``, ``step``, ``rss_mb``, ``traced_kb``, on CUDA ``cuda_mb`` and
        ``cuda_max_mb``), the fitted growth per pass ``rss_slope_kb`` / ``traced_slope_kb`` (after the
        warm-up) and their last-half values, ``overhead`` (pass time over training time without the
        callback), and the timings.
    """
    plain_seconds, _, _ = _train(steps, None, False, accelerator)
    watched_seconds, monitor, probe = _train(steps, every, False, accelerator)
    _, _, heap_probe = _train(steps, every, True, accelerator)
    records = probe.records
    for record, heap in zip(records, heap_probe.records):
        record["traced_kb"] = heap["traced_kb"]

    rss = _series(records, "rss_mb", warmup_passes, 1024)  # KiB
    heap = _series(records, "traced_kb", warmup_passes, 1)
    cuda = _series(records, "cuda_mb", warmup_passes, 1024) if "cuda_mb" in records[0] else None
    overhead = (watched_seconds - plain_seconds) / plain_seconds
    pass_seconds = monitor._pass_seconds / max(monitor.passes, 1)
    parameters = sum(p.numel() for p in Tiny().parameters())

    lines = [
        "# Soak test: memory over many curvature passes",
        "",
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, "
        f"lightning {L.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), {accelerator}. `python benchmarks/soak.py --steps {steps} "
        f"--every {every} --warmup {warmup_passes}`: a {parameters}-parameter Transformer, {steps} AdamW "
        f"steps, `HessianMonitor(every_n_steps={every})` with TensorBoard, figures and alerts: "
        f"{monitor.passes} passes.",
        "",
        f"| memory | after warm-up | at the end | growth per pass (fit) | last half | after pass {HISTORY} |",
        "|---|---:|---:|---:|---:|---:|",
        f"| resident set size (MiB; growth KiB) | {rss['first'] / 1024:.1f} | {rss['last'] / 1024:.1f} | "
        f"{rss['slope']:+.2f} | {rss['slope_last_half']:+.2f} | {rss['slope_full']:+.2f} |",
        f"| Python heap, tracemalloc (KiB) | {heap['first']:.0f} | {heap['last']:.0f} | "
        f"{heap['slope']:+.3f} | {heap['slope_last_half']:+.3f} | {heap['slope_full']:+.3f} |",
    ]
    if cuda is not None:
        lines.append(
            f"| CUDA allocated (MiB; growth KiB) | {cuda['first'] / 1024:.2f} | {cuda['last'] / 1024:.2f} | "
            f"{cuda['slope']:+.2f} | {cuda['slope_last_half']:+.2f} | {cuda['slope_full']:+.2f} |"
        )
    lines += [
        "",
        "| time | seconds |",
        "|---|---:|",
        f"| training without the callback | {plain_seconds:.2f} |",
        f"| training with the callback | {watched_seconds:.2f} |",
        f"| one pass (mean) | {pass_seconds:.3f} |",
        f"| overhead (with / without - 1) | {100 * overhead:.0f}% |",
        "",
        "Every few passes:",
        "",
        "| pass | step | RSS (MiB) | Python heap (KiB) |" + (" CUDA max (MiB) |" if cuda else ""),
        "|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    stride = max(1, len(records) // 12)
    for record in records[::stride] + ([records[-1]] if (len(records) - 1) % stride else []):
        row = (
            f"| {record['pass']:.0f} | {record['step']:.0f} | {record['rss_mb']:.1f} | "
            f"{record['traced_kb']:.0f} |"
        )
        lines.append(row + (f" {record['cuda_max_mb']:.2f} |" if cuda else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return {
        "passes": records,
        "rss_slope_kb": rss["slope"],
        "rss_slope_last_half_kb": rss["slope_last_half"],
        "traced_slope_kb": heap["slope"],
        "traced_slope_last_half_kb": heap["slope_last_half"],
        "rss_slope_full_kb": rss["slope_full"],
        "traced_slope_full_kb": heap["slope_full"],
        "overhead": overhead,
        "plain_seconds": plain_seconds,
        "watched_seconds": watched_seconds,
        "pass_seconds": pass_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10, help="passes left out of the fits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args.steps, args.every, args.out, args.warmup, args.accelerator)


if __name__ == "__main__":
    main()
