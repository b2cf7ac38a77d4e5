"""Figures that show the answer with no TensorBoard settings: stability, attention per layer, layer heatmaps.

TensorBoard's scalar charts colour lines by run, smooth them and clip outliers; these figures are drawn
from the pass history instead, with a distinct colour per line, a reference line at ratio 1, log scales
where the values span decades and the alerts marked:

* :func:`stability_figure`: the sharpness λ_max and the preconditioned sharpness λ_max(P⁻¹H) against their
  thresholds (log scale), and both ratios against 1, with vertical lines where alerts fired;
* :func:`attention_figure`: one panel per layer, its query, key, value and attention-output λ_max together;
* :func:`layer_heatmap_figure`: one panel per block kind, layer (rows) by step (columns), coloured by
  log10 λ_max on one scale shared by all panels.

Each takes a matplotlib ``Figure`` class (so matplotlib stays optional) and returns ``None`` when it has
nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_hessian import tags
from lightning_hessian.alerts import PassRecord
from lightning_hessian.report import CurvatureReport

__all__ = ["attention_figure", "layer_heatmap_figure", "stability_figure"]

_DPI = 90
_DECADES = 2.0  # a panel gets a log y-axis when its positive values span more than this many decades
_ALERT_COLORS = {"critical": "#d62728", "warning": "#ff7f0e"}  # info alerts are not drawn
_ATTENTION_COLORS = {"query": "#1f77b4", "key": "#d62728", "value": "#2ca02c", "attn_out": "#9467bd"}


def _series(history: Sequence[PassRecord], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and finite values of one tag over the passes (a repeated step keeps its latest pass)."""
    points = sorted({r.step: r.scalars.get(tag) for r in history}.items())
    kept = [(s, float(v)) for s, v in points if v is not None and math.isfinite(v)]
    return np.array([s for s, _ in kept], float), np.array([v for _, v in kept], float)


def _log_if_spread(ax: Any, values: Sequence[np.ndarray]) -> None:
    """Log y-axis when the positive values span more than :data:`_DECADES` decades."""
    positive = np.concatenate([v[v > 0] for v in values]) if values else np.array([])
    if positive.size and np.log10(positive.max() / positive.min()) > _DECADES:
        ax.set_yscale("log")


def _mark_alerts(ax: Any, alerts: Sequence[tuple[int, str]]) -> None:
    for step, severity in sorted(set(alerts)):
        if severity in _ALERT_COLORS:
            ax.axvline(step, color=_ALERT_COLORS[severity], linewidth=1.5, linestyle=":")


def stability_figure(
    figure_cls: type, history: Sequence[PassRecord], alerts: Sequence[tuple[int, str]]
) -> Any | None:
    """Sharpnesses against their thresholds (left), the ratios against 1 (right); alerts as vertical lines."""
    pairs = [
        ("sharpness λ_max", tags.SHARPNESS, "2/lr", tags.THRESHOLD, "#1f77b4"),
        (
            "λ_max(P⁻¹H)",
            tags.PRECONDITIONED_SHARPNESS,
            "Adam threshold",
            tags.PRECONDITIONED_THRESHOLD,
            "#ff7f0e",
        ),
        ("critical sharpness 2/η_c (update)", tags.CRITICAL_SHARPNESS, "2/lr", tags.THRESHOLD, "#2ca02c"),
        ("curvature along the update", tags.UPDATE_CURVATURE, "2/lr", tags.THRESHOLD, "#9467bd"),
    ]
    ratios = [
        ("sharpness ratio", tags.SHARPNESS_RATIO, "#1f77b4"),
        ("preconditioned ratio", tags.PRECONDITIONED_RATIO, "#ff7f0e"),
        ("critical ratio lr/η_c", tags.CRITICAL_RATIO, "#2ca02c"),
        ("preconditioned gradient ratio", tags.PRECONDITIONED_GRADIENT_RATIO, "#d62728"),
    ]
    if not any(_series(history, tag)[0].size for _, tag, _ in ratios):
        return None
    fig = figure_cls(figsize=(11, 3.8), dpi=_DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    drawn: list[np.ndarray] = []
    for label, tag, threshold_label, threshold_tag, color in pairs:
        for name, t, style in ((label, tag, "-"), (threshold_label, threshold_tag, "--")):
            steps, values = _series(history, t)
            if steps.size:
                left.plot(steps, values, style, color=color, marker="o", markersize=3, label=name)
                drawn.append(values)
    _log_if_spread(left, drawn)
    left.set_title("sharpness against its threshold (dashed)")
    drawn = [np.array([1.0])]
    for label, tag, color in ratios:
        steps, values = _series(history, tag)
        if steps.size:
            right.plot(steps, values, "-", color=color, marker="o", markersize=3, label=label)
            drawn.append(values)
    right.axhline(1.0, color="k", linewidth=1.2, linestyle="--", label="1: unstable above")
    _log_if_spread(right, drawn)
    right.set_title("ratios (> 1: unstable)")
    for ax in (left, right):
        _mark_alerts(ax, alerts)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Stability (dotted verticals: warning / critical alerts)")
    return fig


def _layered(report: CurvatureReport, kinds: Sequence[str] | None = None) -> dict[str, list[tuple[int, str]]]:
    """``(layer, block name)`` by kind, for blocks with a layer, sorted by layer (a layer may have several
    blocks of one kind, e.g. two LayerNorms); kinds in the report's order."""
    out: dict[str, list[tuple[int, str]]] = {}
    for b in report:
        if b.layer is not None and (kinds is None or b.kind in kinds):
            out.setdefault(b.kind, []).append((b.layer, b.name))
    return {kind: sorted(pairs) for kind, pairs in out.items()}


def attention_figure(figure_cls: type, report: CurvatureReport, history: Sequence[PassRecord]) -> Any | None:
    """One panel per layer: λ_max of its query, key, value and attention-output blocks over the passes."""
    by_kind = _layered(report, tuple(_ATTENTION_COLORS))
    layers = sorted({layer for pairs in by_kind.values() for layer, _ in pairs})
    if not layers:
        return None
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    fig = figure_cls(figsize=(4.2 * cols, 3.2 * rows + 0.5), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        drawn = []
        for kind, color in _ATTENTION_COLORS.items():
            for name in (n for la, n in by_kind.get(kind, []) if la == layer):
                steps, values = _series(history, tags.block_tag(name, "top_eigenvalue"))
                ax.plot(steps, values, color=color, marker="o", markersize=3, label=kind)
                drawn.append(values)
        _log_if_spread(ax, drawn)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(layers) :]:
        ax.set_axis_off()
    fig.suptitle(f"Attention λ_max per layer ({report.curvature})")
    return fig


def layer_heatmap_figure(
    figure_cls: type, report: CurvatureReport, history: Sequence[PassRecord]
) -> Any | None:
    """Per kind, a layer x step heatmap of log10 λ_max, one colour scale for all kinds (grey: missing)."""
    by_kind = _layered(report)
    steps = np.array(sorted({r.step for r in history}), float)
    scalars: Mapping[int, Mapping[str, Any]] = {r.step: r.scalars for r in history}
    grids = {}
    for kind, pairs in by_kind.items():
        repeated = len({la for la, _ in pairs}) < len(pairs)  # label rows by name when layers repeat
        labels = [f"{la}: {n.rsplit('.', 1)[-1]}" if repeated else str(la) for la, n in pairs]
        top = [
            [_log10(scalars[int(s)].get(tags.block_tag(n, "top_eigenvalue"))) for s in steps]
            for _, n in pairs
        ]
        grids[kind] = (labels, np.ma.masked_invalid(np.array(top)))
    grids = {k: v for k, v in grids.items() if not v[1].mask.all()}
    if not grids or not steps.size:
        return None
    low = min(float(g.min()) for _, g in grids.values())
    high = max(float(g.max()) for _, g in grids.values())
    cols = min(len(grids), 4)
    rows = math.ceil(len(grids) / cols)
    fig = figure_cls(figsize=(3.3 * cols + 1, 2.4 * rows + 0.6), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    mids = (steps[1:] + steps[:-1]) / 2
    half = mids[0] - steps[0] if mids.size else 0.5  # outer cells as wide as their inner halves
    edges = np.concatenate(
        [[steps[0] - half], mids, [steps[-1] + (steps[-1] - mids[-1] if mids.size else 0.5)]]
    )
    mesh = None
    for ax, (kind, (layers, grid)) in zip(axes, grids.items()):
        ax.set_facecolor("0.85")
        mesh = ax.pcolormesh(
            edges, np.arange(len(layers) + 1) - 0.5, grid, cmap="viridis", vmin=low, vmax=high, shading="flat"
        )
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.invert_yaxis()  # first layer on top
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    for ax in axes[len(grids) :]:
        ax.set_axis_off()
    fig.colorbar(mesh, ax=axes.tolist(), label=r"$\log_{10} \lambda_{\max}$")
    fig.suptitle(f"λ_max by layer and step, per kind ({report.curvature})")
    return fig


def _log10(value: Any) -> float:
    return math.log10(value) if value is not None and math.isfinite(value) and value > 0 else math.nan
