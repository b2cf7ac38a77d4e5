"""The result of a curvature pass: per-block :class:`BlockCurvature` results in a :class:`CurvatureReport`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from lightning_hessian import tags
from lightning_hessian.formatting import MISSING, NOT_CONVERGED, format_number

__all__ = ["BlockCurvature", "CurvatureReport"]


@dataclass
class BlockCurvature:
    """Curvature statistics of one parameter block (or of the whole model).

    Attributes:
        name, kind, layer, numel: the block (see :class:`lightning_hessian.Block`).
        top_eigenvalues: the largest eigenvalues, descending (Lanczos Ritz values).
        top_residuals: their Ritz residuals :math:`\\|H y - \\theta y\\|`; an eigenvalue of the block lies
            within this distance of each value.
        converged: whether every requested top eigenvalue met the tolerance.
        min_eigenvalue, min_residual, min_converged: the smallest eigenvalue, if requested.
        trace, trace_stderr: the trace estimate (Hutch++) and its standard error (0 when exact).
        density: ``(grid, values)`` of the smoothed spectral density (stochastic Lanczos quadrature), if
            requested; ``density_nodes`` / ``density_weights`` hold the raw quadrature.
        gauss_newton_top, functional_top, functional_min: with ``split=True``, the top eigenvalue of the
            Gauss-Newton part and the extreme eigenvalues of the functional part.
        preconditioned_top: with a ``preconditioner``, the whole model's λ_max(P^-1 H).
        products: the product backend every number of this block came from: ``"exact"`` (double
            backward) or ``"finite_difference"`` (:mod:`lightning_hessian.finite_difference`).
        matvecs: matrix-vector products spent on this block; seconds: wall time spent on it (approximate,
            shared products are attributed evenly).
        ritz_vectors: the top Ritz vectors (for warm starts; not part of :meth:`to_dict`).
    """

    name: str
    kind: str
    layer: int | None
    numel: int
    top_eigenvalues: list[float] = field(default_factory=list)
    top_residuals: list[float] = field(default_factory=list)
    converged: bool | None = None
    min_eigenvalue: float | None = None
    min_residual: float | None = None
    min_converged: bool | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    density: tuple[np.ndarray, np.ndarray] | None = None
    density_nodes: np.ndarray | None = None
    density_weights: np.ndarray | None = None
    gauss_newton_top: float | None = None
    functional_top: float | None = None
    functional_min: float | None = None
    preconditioned_top: float | None = None
    products: str = "exact"
    matvecs: int = 0
    seconds: float = 0.0
    ritz_vectors: Tensor | None = field(default=None, repr=False)

    @property
    def top_eigenvalue(self) -> float | None:
        """The largest eigenvalue, or ``None`` if not computed."""
        return self.top_eigenvalues[0] if self.top_eigenvalues else None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists for arrays), without Ritz vectors: ready for JSON."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "ritz_vectors":
                continue
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = [v.tolist() for v in value]
            out[f.name] = value
        return out


@dataclass
class CurvatureReport:
    """Per-block curvature of a model, as returned by :func:`lightning_hessian.analyze`.

    Attributes:
        blocks: block name -> :class:`BlockCurvature`, in model order.
        full: the whole model's curvature, when ``full=True`` was asked.
        curvature: ``"hessian"``, ``"gauss_newton"`` or ``"functional"``.
        loss: the (batch-size weighted mean) loss on the data.
        seconds: wall time of the pass. matvecs: all matrix-vector products of the pass.
        settings: the estimator settings used.
    """

    blocks: dict[str, BlockCurvature]
    full: BlockCurvature | None = None
    curvature: str = "hessian"
    loss: float = math.nan
    seconds: float = 0.0
    matvecs: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        """Iterate over the blocks' results, then the whole model's (if any)."""
        yield from self.blocks.values()
        if self.full is not None:
            yield self.full

    def scalars(self) -> dict[str, float]:
        """Every scalar statistic, as ``{"curvature/<block>/<stat>": value}`` (:mod:`lightning_hessian.tags`).

        The whole model is the block ``model``. Statistics that were not computed are left out.
        """
        out: dict[str, float] = {}
        for b in self:
            stats: dict[str, float | None] = {
                "min_eigenvalue": b.min_eigenvalue,
                "trace": b.trace,
                "gauss_newton_top": b.gauss_newton_top,
                "functional_top": b.functional_top,
                "functional_min": b.functional_min,
                "preconditioned_top": b.preconditioned_top,
            }
            for i, value in enumerate(b.top_eigenvalues):
                stats["top_eigenvalue" if i == 0 else f"top_eigenvalue_{i + 1}"] = value
            top, bottom = b.top_eigenvalue, b.min_eigenvalue
            if top is not None and bottom is not None and top > 0:
                stats["negative_ratio"] = max(0.0, -bottom) / top
            out.update({tags.block_tag(b.name, k): float(v) for k, v in stats.items() if v is not None})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, ready for JSON."""
        return {
            "curvature": self.curvature,
            "loss": self.loss,
            "seconds": self.seconds,
            "matvecs": self.matvecs,
            "settings": dict(self.settings),
            "blocks": {name: block.to_dict() for name, block in self.blocks.items()},
            "full": None if self.full is None else self.full.to_dict(),
        }

    def rows(self) -> list[list[str]]:
        """The report as table cells, header first: what :meth:`table` and :meth:`markdown` render."""
        header = ["block", "kind", "layer", "params", "λ_max", "λ_min", "trace", "matvecs"]
        split = any(b.gauss_newton_top is not None for b in self)
        if split:
            header[6:6] = ["GN λ_max", "func λ_max", "func λ_min"]
        rows = [header]
        for b in self:
            row = [
                b.name,
                b.kind,
                MISSING if b.layer is None else str(b.layer),
                str(b.numel),
                format_number(b.top_eigenvalue, b.converged),
                format_number(b.min_eigenvalue, b.min_converged),
                format_number(b.trace),
                str(b.matvecs),
            ]
            if split:
                row[6:6] = [
                    format_number(v) for v in (b.gauss_newton_top, b.functional_top, b.functional_min)
                ]
            rows.append(row)
        return rows

    def _footer(self) -> tuple[str, str | None]:
        backends = " / ".join(sorted({b.products for b in self})) or "exact"
        summary = (
            f"{self.curvature} ({backends} products), loss {self.loss:.4g}, {self.matvecs} matvecs, "
            f"{self.seconds:.2f} s"
        )
        unconverged = any(b.converged is False or b.min_converged is False for b in self)
        return summary, f"{NOT_CONVERGED} not converged within max_iter" if unconverged else None

    def table(self) -> str:
        """A fixed-width text table, one row per block (and one for the model); ``*`` marks non-converged."""
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        summary, note = self._footer()
        return "\n".join([*lines, summary + (f"  ({note})" if note else "")])

    def markdown(self) -> str:
        """The same table in Markdown: a summary line, the table, and the non-converged note if any."""
        rows = self.rows()
        summary, note = self._footer()

        def cells(row: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("*", "\\*") for c in row) + " |"

        lines = [
            summary,
            "",
            cells(rows[0]),
            "|" + "|".join([":---"] * 2 + ["---:"] * (len(rows[0]) - 2)) + "|",
        ]
        lines += [cells([f"`{r[0]}`", *r[1:]]) for r in rows[1:]]
        if note:
            lines += ["", note.replace("*", "\\*")]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
