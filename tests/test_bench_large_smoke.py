"""Smoke test of ``benchmarks/bench_large.py --tiny``: the GPU benchmark's script runs end to end on CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_large.py"


@pytest.mark.slow
def test_bench_large_tiny(tmp_path):
    out = tmp_path / "large.md"
    # A subprocess: the benchmarks' own _models module must not shadow the tests' one.
    subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], check=True, timeout=600)
    text = out.read_text()
    assert text.count("| finite_difference |") == 5  # 2 kernels for one product, 3 monitor tiers
    # Finite-difference products and estimates agree with the exact ones (float32, smooth GELU model).
    errors = [float(e) for e in re.findall(r"\| ([0-9.]+e[-+][0-9]+) \|$", text, re.M)]
    assert len(errors) == 5 and max(errors) < 1e-2, errors
