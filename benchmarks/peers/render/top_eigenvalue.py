"""Task 1 in Markdown: every configuration's row, the two targets, where the time goes, the profile."""

from __future__ import annotations

import math

from ..common import relative
from ..top_eigenvalue import ACCURACY, Measured, TopResult
from .markdown import Target, fmt, table

HEADER = ["tool", "configuration", "seconds", "× gradient", "products", "ms / product", "in products"]


def render_top_eigenvalue(result: TopResult) -> tuple[list[str], list[Target]]:
    """Task 1's section and targets: ours against the fastest accurate peer and PyHessian's default."""
    lines = _configurations(result)
    ours = result.fastest_accurate("ours")
    if ours is None:
        return lines, [(f"task 1 ({result.spec.name}): ours accurate to 1e-4", False, "no tol reached 1e-4")]
    families = {m.config.family for m in result.measured if not m.config.family.startswith("ours")}
    peers = [m for m in (result.fastest_accurate(f) for f in families) if m is not None]
    fastest_peer = min(peers, key=lambda m: m.time) if peers else None
    targets = _targets(result, ours, fastest_peer)
    if fastest_peer is not None:
        lines += ["", _where_the_time_goes(ours, fastest_peer)]
    rows = [
        [f"`{p.name}`", f"{p.self_ms:.1f}", f"{100 * p.share:.0f}%", str(p.calls)] for p in result.profile
    ]
    lines += [
        "",
        f"torch.profiler, one pass of ours at {ours.config.label} (self CPU time by operator):",
        "",
        *table(["operator", "self ms", "share", "calls"], rows),
    ]
    return lines, targets


def _configurations(result: TopResult) -> list[str]:
    """The heading, what was measured, and one row per configuration (✓ accurate, ★ the tool's fastest)."""
    ref, unit = result.reference, result.unit
    lines = [
        f"### Task 1 — whole-model top eigenvalue: {result.description}",
        "",
        f"Reference λmax = {ref:.10g} (float64, our Lanczos at tol 1e-10); scipy `eigsh` (tol 1e-12) on "
        f"plain autograd float64 products: {result.crosscheck:.10g} (relative difference "
        f"{relative(result.crosscheck, ref):.1e}). One gradient: {unit * 1e3:.1f} ms. Each configuration "
        f"ran once per seed ({len(result.seeds)} seeds, interleaved); time and products = median, error = "
        f"the worst seed; ms / product and the share of the time spent in products are over all seeds. ✓ = "
        f"accurate to {ACCURACY:g} on every seed; ★ = the fastest accurate configuration of that tool.",
        "",
    ]
    best = {m.config.family: result.fastest_accurate(m.config.family) for m in result.measured}
    rows = []
    for m in result.measured:
        mark = ("✓" if result.accurate(m) else "✗") + (" ★" if best[m.config.family] is m else "")
        rows.append(
            [
                m.config.family,
                m.config.label,
                f"{m.time:.3f}",
                f"{m.time / unit:.1f}",
                f"{m.products:g}",
                f"{m.ms_per_product:.1f}",
                f"{100 * m.product_share:.0f}%",
                fmt(m.error(ref)),
                mark,
            ]
        )
    return lines + table([*HEADER, "max rel. error", "1e-4"], rows, "ll" + "r" * 6 + "l")


def _describe(m: Measured, result: TopResult) -> str:
    return (
        f"{m.config.family} {m.config.label}: {m.time:.3f} s = {m.time / result.unit:.1f} gradients, "
        f"{m.products:g} products of {m.ms_per_product:.1f} ms, error {fmt(m.error(result.reference))}"
    )


def _targets(result: TopResult, ours: Measured, fastest_peer: Measured | None) -> list[Target]:
    name, ref = result.spec.name, result.reference
    ours_default = next(m for m in result.family("ours: Lanczos") if m.config.default)
    pyhessian_default = next(m for m in result.family("PyHessian: power") if m.config.default)
    ratio = fastest_peer.time / ours.time if fastest_peer else math.inf
    peer = f"{_describe(fastest_peer, result)} → {ratio:.2f}x (target ≥ 2x)" if fastest_peer else "none"
    return [
        (
            f"task 1 ({name}): accurate to 1e-4 in ≤ half the time of the fastest accurate peer",
            ratio >= 2,
            f"{_describe(ours, result)}; fastest accurate peer {peer}",
        ),
        (
            f"task 1 ({name}): no slower than PyHessian's default",
            ours.time <= pyhessian_default.time,
            f"ours {ours.time:.3f} s vs PyHessian default {_describe(pyhessian_default, result)}; ours at "
            f"its default tol=1e-4: {ours_default.time:.3f} s, {ours_default.products:g} products, error "
            f"{fmt(ours_default.error(ref))}",
        ),
    ]


def _where_the_time_goes(ours: Measured, peer: Measured) -> str:
    """Products × cost per product, for ours and the fastest peer."""
    ratio = peer.time / ours.time
    return (
        f"Where the time goes (ours {ours.config.label} vs {peer.config.family} "
        f"{peer.config.label}): ours {ours.products:g} products × {ours.ms_per_product:.1f} ms "
        f"({100 * ours.product_share:.0f}% of its time; the rest is the graph build and Lanczos), the "
        f"peer {peer.products:g} × {peer.ms_per_product:.1f} ms "
        f"({100 * peer.product_share:.0f}%). The time ratio {ratio:.2f}x is the product-count "
        f"ratio {peer.products / ours.products:.2f} times the cost-per-product ratio "
        f"{peer.ms_per_product / ours.ms_per_product:.2f}, less our graph build."
    )
