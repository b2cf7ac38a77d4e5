"""How numbers read in tables, messages and reports: one format, one mark for missing, one for unconverged."""

from __future__ import annotations

import math

__all__ = ["MISSING", "NOT_CONVERGED", "format_number"]

MISSING = "-"
NOT_CONVERGED = "*"


def format_number(value: float | None, converged: bool | None = None) -> str:
    """4 significant digits; :data:`MISSING` for ``None``; :data:`NOT_CONVERGED` appended when ``converged``
    is ``False`` (Lanczos stopped at ``max_iter``); ``nan`` / ``inf`` as Python writes them."""
    if value is None:
        return MISSING
    text = f"{value:.4g}" if math.isfinite(value) else str(value)
    return text + NOT_CONVERGED if converged is False else text
