"""Smoke test of ``benchmarks/bench_deep_tier.py`` on a 1-layer model: the benchmark the README's deep-tier
accuracy comes from still runs, measures every block cold and then warm, and finds the logged values within
5% of the float64 truth (a subprocess: the benchmark puts benchmarks/ and examples/ on its path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_deep_tier.py"


@pytest.mark.slow
def test_bench_deep_tier_tiny_writes_its_table(tmp_path):
    out = tmp_path / "deep_tier.md"
    command = [
        sys.executable,
        str(BENCH),
        "--layers",
        "1",
        "--dim",
        "16",
        "--budget",
        "0.9",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        cells[0]: cells
        for line in out.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| block kind")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert {"query", "key", "value", "attn_out", "norm", "ffn_in", "ffn_out", "embedding"} <= set(rows)
    measurements, warm = rows["all"][1].split(" (")
    assert int(warm.split()[0]) * 2 == int(measurements)  # two rotations: every block cold, then warm
    assert rows["all"][3] == "100%", rows["all"]  # every logged λ_max within 5% of the truth
    assert float(rows["all"][5]) < 1e-3  # tol 1e-3 on the residual: the error is far smaller
