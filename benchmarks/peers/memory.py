"""Task 6: peak resident memory, one fresh process per measurement (``benchmarks/_peak_memory.py``).

Whole-process RSS says nothing about GPU memory: the entry point runs this task on the CPU only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).resolve().parents[1] / "_peak_memory.py"


@dataclass
class MemoryRow:
    """One measurement: its peak resident size above the start, and how far the peak was already above it."""

    measurement: str
    peak_delta_mb: float
    slack_mb: float


@dataclass
class MemoryResult:
    """Task 6's rows, in ``_peak_memory.MEASUREMENTS`` order."""

    spec_name: str
    rows: list[MemoryRow]

    def row(self, measurement: str) -> MemoryRow:
        return next(r for r in self.rows if r.measurement == measurement)


def measure_memory(spec_name: str, threads: int, quick: bool) -> MemoryResult:
    """Task 6 on the model ``spec_name``, each measurement in a fresh process.

    ``quick`` leaves out the gradient and hessian-eigenthings' power iteration.
    """
    sys.path.insert(0, str(WORKER.parent))
    from _peak_memory import MEASUREMENTS

    chosen = MEASUREMENTS if not quick else MEASUREMENTS[1:5] + MEASUREMENTS[6:]
    rows = []
    for name in chosen:
        out = subprocess.run(
            [sys.executable, str(WORKER), name, spec_name, str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(MemoryRow(r["measurement"], r["peak_delta_mb"], r["slack_mb"]))
    return MemoryResult(spec_name, rows)
