"""Markdown tables, number formats and the met / missed / tie verdicts of the targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Target = tuple[str, "bool | str", str]  # (what was aimed at, met / missed / "tie", the numbers behind it)


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, exponent notation below 1e-3; ``-`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(marks) + "|",
        *["| " + " | ".join(str(c) for c in row) + " |" for row in rows],
    ]


def verdict(ok: bool | str) -> str:
    """``True`` met, ``False`` missed, ``"tie"``: worse on average but within noise (2 standard errors)."""
    return {True: "**met**", False: "**missed**", "tie": "**tie** (within noise)"}[ok]


def mean_and_error(samples: Sequence[float], digits: int) -> str:
    """``mean ± standard error`` to ``digits`` decimals."""
    se = np.std(samples, ddof=1) / math.sqrt(len(samples))
    return f"{float(np.mean(samples)):.{digits}f} ± {se:.{digits}f}"


def compare_means(ours: Sequence[float], peer: Sequence[float]) -> tuple[bool | str, str]:
    """Is the mean of ``ours`` at most that of ``peer``? A tie if worse by less than 2 standard errors."""
    se = math.sqrt(np.var(ours, ddof=1) / len(ours) + np.var(peer, ddof=1) / len(peer))
    diff = float(np.mean(ours) - np.mean(peer))
    status: bool | str = True if diff <= 0 else ("tie" if diff <= 2 * se else False)
    return status, f"difference {diff:+.4f} ± {se:.4f} (standard error)"
