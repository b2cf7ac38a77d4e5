"""Smoke test of ``benchmarks/bench_overhead.py --tiny``: the benchmark the README's overhead table comes from
still runs and writes its table (a subprocess: the benchmark puts benchmarks/ and examples/ on its path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overhead.py"


@pytest.mark.slow
def test_bench_overhead_tiny_writes_its_table(tmp_path):
    command = [sys.executable, str(BENCH), "--tiny", "--logdir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "overhead_tiny.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[6]) >= 1, row  # the update tier measured
    assert cells[-2].split()[0] != "-", row  # the whole-model tier measured and was checked
