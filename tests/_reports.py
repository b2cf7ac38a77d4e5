"""Hand-built curvature reports, for tests that only render or read reports (dashboard, figures).

A real pass (``analyze``) costs seconds; these reports have the blocks that
:func:`~lightning_hessian.find_blocks` gives for a model of ``_models`` and made-up, seeded statistics, so a
test of what is drawn or logged needs no Hessian-vector product.
"""

from __future__ import annotations

import math

import torch
from _models import make_model

from lightning_hessian import BlockCurvature, CurvatureReport, find_blocks


def block(
    name: str,
    kind: str,
    top: float,
    *,
    layer: int | None = None,
    numel: int = 16,
    smallest: float | None = None,
    trace: float | None = None,
    density: bool = False,
) -> BlockCurvature:
    """One block's statistics; ``density=True`` adds a Gaussian bump centred between λ_min and λ_max."""
    low = top if smallest is None else smallest
    return BlockCurvature(
        name,
        kind,
        layer,
        numel,
        top_eigenvalues=[top],
        top_residuals=[1e-6 * abs(top)],
        converged=True,
        min_eigenvalue=smallest,
        min_converged=None if smallest is None else True,
        trace=trace,
        trace_stderr=None if trace is None else 0.0,
        density=_bump(low, top) if density else None,
        matvecs=20,
        seconds=0.01,
    )


def _bump(low: float, high: float, points: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit-mass Gaussian on ``[low, high]`` widened by 10% (float64 tensors, as from ``analyze``)."""
    pad = 0.1 * max(high - low, abs(high), 1e-12)
    grid = torch.linspace(low - pad, high + pad, points, dtype=torch.float64)
    centre, width = (low + high) / 2, (high - low + pad) / 6
    values = torch.exp(-0.5 * ((grid - centre) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    return grid, values


def model_report(
    family: str = "encoder", *, densities: int = 2, full: bool = True, seed: int = 0
) -> CurvatureReport:
    """A report with the blocks of ``_models``' ``family`` and seeded made-up statistics.

    Every block has a positive λ_max (log-uniform in [0.02, 1]), a negative λ_min and a positive trace.
    With ``densities > 0`` the whole model (``full``) and the first ``densities`` blocks carry a spectral
    density (each panel of the density figure costs a few tenths of a second to draw: only a few have one).
    """
    gen = torch.Generator().manual_seed(seed)
    found = find_blocks(make_model(family))
    tops = torch.empty(len(found), dtype=torch.float64).uniform_(math.log(0.02), 0.0, generator=gen).exp()
    blocks = {
        b.name: block(
            b.name,
            b.kind,
            float(top),
            layer=b.layer,
            numel=b.numel,
            smallest=-0.3 * float(top),
            trace=3.0 * float(top),
            density=i < densities,
        )
        for i, (b, top) in enumerate(zip(found, tops))
    }
    whole = None
    if full:
        numel = sum(b.numel for b in found)
        whole = block("model", "model", 2.5, numel=numel, smallest=-1.5, trace=20.0, density=densities > 0)
    settings = {"top_k": 1, "smallest": True, "trace": True, "density": densities > 0}
    return CurvatureReport(
        blocks=blocks, full=whole, loss=2.3, seconds=1.0, matvecs=20 * (len(blocks) + full), settings=settings
    )
