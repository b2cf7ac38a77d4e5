"""Curvature passes as logger output: scalars for every Lightning logger, dashboards for TensorBoard.

Every logger gets the pass's scalars (tags of :mod:`lightning_hessian.tags`) through ``log_metrics``.
Weights & Biases and MLflow loggers also get the figures and texts below (as images / HTML, as PNG / Markdown
artifacts: :mod:`lightning_hessian.logger_sinks`). A TensorBoard logger gets

* a custom-scalars layout (the "Custom Scalars" tab), written once per writer: categories
  ``Curvature: Stability``, ``Curvature: Attention``, ``Curvature: Norms and FFN``,
  ``Curvature: Embedding and head``, ``Curvature: Trace``, ``Curvature: Negative curvature``,
  ``Curvature: Gauss-Newton split``, ``Curvature: Theory vs measured``, ``Curvature: Alerts`` and
  ``Curvature: Pass cost``, with multiline charts over exact, escaped tag regexes built from the report's
  blocks and the logged ``theory/`` tags. Charts without data are left out;
* figures (matplotlib, optional) :data:`IMAGE_SPECTRAL_DENSITY`, :data:`IMAGE_DENSITY_OVER_TIME` and
  :data:`IMAGE_TOP_EIGENVALUES`, and the figures of :mod:`lightning_hessian.dashboard_figures`, readable with
  no TensorBoard settings: :data:`IMAGE_STABILITY` (sharpness against its thresholds, ratios against 1,
  alerts marked), :data:`IMAGE_ATTENTION` (query, key, value and attention output of each layer in one
  panel) and :data:`IMAGE_LAYER_HEATMAPS` (layer x step heatmap of λ_max per kind);
* Markdown text :data:`TEXT_LATEST` (a table of the latest values), :data:`TEXT_THEORY` (the theory
  versus measured table, when the pass has one), :data:`TEXT_ALERTS` (this pass's alerts, only when
  some fired) and :data:`TEXT_HOW_TO_READ` (how to read the charts, written with the layout).

TensorBoard reads one layout per run; a layout of your own written to the same writer competes with this one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_hessian import dashboard_figures, tags
from lightning_hessian.alerts import SEVERITIES, Alert, PassRecord
from lightning_hessian.blocks import KINDS
from lightning_hessian.formatting import format_number
from lightning_hessian.logger_sinks import LoggerSink, TensorBoardSink, sink_for
from lightning_hessian.report import BlockCurvature, CurvatureReport

__all__ = [
    "IMAGE_ATTENTION",
    "IMAGE_DENSITY_OVER_TIME",
    "IMAGE_LAYER_HEATMAPS",
    "IMAGE_SPECTRAL_DENSITY",
    "IMAGE_STABILITY",
    "IMAGE_TOP_EIGENVALUES",
    "TEXT_ALERTS",
    "TEXT_HOW_TO_READ",
    "TEXT_LATEST",
    "TEXT_THEORY",
    "CurvatureDashboard",
]

IMAGE_SPECTRAL_DENSITY = "curvature/spectral_density"  # small multiples, one panel per block, latest pass
IMAGE_DENSITY_OVER_TIME = "curvature/density_over_time"  # step x eigenvalue heatmap of one density
IMAGE_TOP_EIGENVALUES = "curvature/top_eigenvalue_heatmap"  # block x step heatmap of log10 λ_max
IMAGE_STABILITY = "curvature/stability"  # sharpness vs thresholds, ratios vs 1, alerts marked
IMAGE_ATTENTION = "curvature/attention_per_layer"  # Q, K, V, attention output of each layer in one panel
IMAGE_LAYER_HEATMAPS = "curvature/layer_heatmaps"  # per kind, layer x step heatmap of log10 λ_max
TEXT_LATEST = "curvature/latest"  # Markdown table of the latest pass
TEXT_ALERTS = "alerts"  # Markdown list of this pass's alerts
TEXT_THEORY = "theory/latest"  # Markdown table of theory versus measured (lightning_hessian.theory)
TEXT_HOW_TO_READ = "curvature/how_to_read"  # Markdown: how to read the charts (written with the layout)
HOW_TO_READ = """**How to read the curvature charts**

- Start with the image `curvature/stability`: the sharpness λ_max against 2/lr and Adam's preconditioned
  sharpness λ_max(P⁻¹H) against its threshold (dashed, same colour), and both ratios against the black
  line at 1. Above 1 the step overshoots along the sharpest direction: expect a loss spike or a jump to a
  flatter region. Dotted verticals mark warning (orange) and critical (red) alerts.
- Budget mode adds, on the same ratio axis, lr/η_c (`stability/critical_ratio`: the step just taken,
  taken again, would raise the loss above 1) and Adam's preconditioned curvature along the gradient over
  2/lr (`stability/preconditioned_gradient_ratio`: loss spikes follow its crossing of 1); its own cost is
  `monitor/overhead` (Pass cost), and each block is measured once per `monitor/rotation_steps` steps.
- `curvature/attention_per_layer`: query, key, value and attention output of one layer in one panel
  (log scale when they span decades). Query and key overtaking value means growing attention logits.
- `curvature/layer_heatmaps`: per block kind, which layer is sharpest when.
- The images need no settings. In the Custom Scalars tab (`Curvature: ...`), set Smoothing to 0 and untick
  "Ignore outliers in chart scaling", or the peaks are smoothed away and clipped; TensorBoard draws all
  lines of one run in one colour (hover a chart to tell them apart).
- The `curvature/latest` text card has every block's latest values; `alerts` lists each pass's alerts.
"""

_CMAP = "viridis"  # one colormap for every heatmap
_DPI = 90
_FLOOR = 1e-6  # densities are clipped at this fraction of their peak before taking logs
_GRID_POINTS = 200  # eigenvalue grid of the density-over-time heatmap
_ATTENTION = ("query", "key", "value", "attn_out")
_NORM_FFN = ("norm", "ffn_in", "ffn_out")
_SEVERITY_ORDER = {severity: rank for rank, severity in enumerate(reversed(SEVERITIES))}  # most severe first


class _Density(NamedTuple):
    """One pass's spectral density of the tracked block (for the density-over-time heatmap)."""

    step: int
    block: str
    grid: np.ndarray
    values: np.ndarray


class CurvatureDashboard:
    """Writes curvature passes to every Lightning logger; richer views when a logger is TensorBoard.

    Args:
        figures: draw matplotlib figures for the TensorBoard, Weights & Biases and MLflow loggers, once per
            pass however many there are (needs ``matplotlib``; without it the dashboard warns once and
            writes everything else).
        density_history: how many passes of spectral density the density-over-time heatmap shows.
        prefix: put before every tag written (scalars, figures, texts, the dashboards' charts), e.g.
            ``"full/"`` for a :class:`~lightning_hessian.HessianMonitor` named ``"full"``. A TensorBoard
            writer holds one custom-scalars layout: with two prefixed dashboards on one writer, the
            CUSTOM SCALARS tab shows the one written last (the SCALARS tab shows both).
    """

    def __init__(self, *, figures: bool = True, density_history: int = 100, prefix: str = "") -> None:
        if isinstance(density_history, bool) or not isinstance(density_history, int) or density_history < 1:
            raise ValueError(f"density_history must be a positive int, got {density_history!r}.")
        self.figures = figures
        self.density_history = density_history
        self.prefix = prefix
        self._densities: list[_Density] = []
        self._alerts: list[tuple[int, str]] = []  # (step, severity) of every alert, for the stability figure
        self._layouts: set[int] = set()  # ids of the writers that have the layout (not checkpointed)
        self._warned = False

    def log_pass(
        self,
        loggers: Sequence[Logger],
        step: int,
        scalars: Mapping[str, float],
        report: CurvatureReport,
        alerts: Sequence[Alert],
        history: Sequence[PassRecord],
        theory: str | None = None,
        layout_tags: Iterable[str] | None = None,
        draw: bool = True,
    ) -> None:
        """Log one curvature pass (rank 0 only).

        Args:
            loggers: the trainer's loggers; all get the scalars, TensorBoard ones the dashboards too,
                Weights & Biases and MLflow ones the figures and texts.
            step: the optimizer step of the pass.
            scalars: the pass's scalars (``report.scalars()`` plus stability and pass-cost tags); ``None``
                values are skipped, non-finite ones logged as they are.
            report: the pass's report.
            alerts: the alerts fired at this pass.
            history: every pass so far, this one last.
            theory: the pass's theory-versus-measured Markdown table
                (:meth:`~lightning_hessian.theory.TheoryComparison.table`), if any.
            layout_tags: the tags the dashboards chart (default: those of this pass). A monitor whose
                passes each measure a part of the model passes every tag it will log, so that the layout,
                written once, has a chart for every block.
            draw: draw the figures at this pass (a monitor skips them for its cheapest measurements).
        """
        metrics: dict[str, Any] = {k: v for k, v in scalars.items() if v is not None}
        metrics[tags.ALERT_COUNT] = len(alerts)
        written = {self.prefix + k: v for k, v in metrics.items()}
        sinks: list[LoggerSink] = []  # what each logger gets beyond its scalars (logger_sinks)
        for logger in loggers:
            logger.log_metrics(written, step)
            sink = sink_for(logger, self.prefix)
            if sink is not None:
                sinks.append(sink)
        if self.figures:
            self._remember_density(step, report)
            fired = [(int(step), a.severity) for a in alerts]
            self._alerts = [a for a in self._alerts if a[0] < step] + fired  # a resumed step replaces its own
        if not sinks:
            return

        # Drawn once, whatever the number of loggers: every sink gets the same Figure objects.
        figures = self._draw(step, report, history) if self.figures and draw else {}
        texts = {TEXT_LATEST: _latest_markdown(step, report)}
        if theory:
            texts[TEXT_THEORY] = f"**Theory vs measured at step {step}**\n\n{theory}"
        if alerts:
            texts[TEXT_ALERTS] = _alerts_markdown(step, alerts)
        for sink in sinks:
            if isinstance(sink, TensorBoardSink) and sink.key not in self._layouts:
                charted = set(metrics) if layout_tags is None else {*metrics, *layout_tags}
                sink.write_layout(
                    _layout(report, charted, sink.layout_prefix), step, {TEXT_HOW_TO_READ: HOW_TO_READ}
                )
                self._layouts.add(sink.key)
            sink.write(step, figures, texts)

    def state_dict(self) -> dict[str, Any]:
        """The density and alert history, as plain Python values (the layout is rewritten after a resume)."""
        return {
            "densities": [
                {"step": d.step, "block": d.block, "grid": d.grid.tolist(), "values": d.values.tolist()}
                for d in self._densities
            ],
            "alerts": [list(a) for a in self._alerts],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._densities = [
            _Density(
                int(d["step"]), str(d["block"]), np.asarray(d["grid"], float), np.asarray(d["values"], float)
            )
            for d in state.get("densities", [])
        ][-self.density_history :]
        self._alerts = [(int(step), str(severity)) for step, severity in state.get("alerts", [])]

    def _remember_density(self, step: int, report: CurvatureReport) -> None:
        """Add this pass's density of the tracked block: the whole model, else the sharpest block."""
        found = {b.name: (b, d) for b in report if (d := _density(b)) is not None}
        if not found:
            return
        last = self._densities[-1].block if self._densities else None
        if report.full is not None and report.full.name in found:
            name = report.full.name
        elif last in found:
            name = last  # stay on one block so the heatmap's rows stay comparable
        else:
            name = max(found, key=lambda n: _finite(found[n][0].top_eigenvalue, -math.inf))
        grid, values = found[name][1]
        # A switch of block restarts the history; a repeated step (resume) replaces the later passes.
        kept = [d for d in self._densities if d.block == name and d.step < step]
        self._densities = [*kept, _Density(int(step), name, grid, values)][-self.density_history :]

    def _draw(self, step: int, report: CurvatureReport, history: Sequence[PassRecord]) -> dict[str, Any]:
        """The figures of this pass by tag; none when matplotlib is missing (warned once)."""
        try:
            # Optional dependency. Plain Figure objects (not pyplot) leave the user's backend alone, and
            # belong to no global figure registry: nothing to close, they are freed with the last reference.
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned:
                rank_zero_warn(
                    "CurvatureDashboard: matplotlib is not installed, so no curvature figures are drawn. "
                    "`pip install matplotlib` to get them, or pass figures=False to silence this warning."
                )
                self._warned = True
            return {}
        current = self._densities if self._densities and self._densities[-1].step == step else []
        drawn = {
            IMAGE_SPECTRAL_DENSITY: _spectral_density_figure(Figure, step, report),
            IMAGE_DENSITY_OVER_TIME: _density_over_time_figure(Figure, current),
            IMAGE_TOP_EIGENVALUES: _top_eigenvalue_figure(Figure, report, history),
            IMAGE_STABILITY: dashboard_figures.stability_figure(Figure, history, self._alerts),
            IMAGE_ATTENTION: dashboard_figures.attention_figure(Figure, report, history),
            IMAGE_LAYER_HEATMAPS: dashboard_figures.layer_heatmap_figure(Figure, report, history),
        }
        return {tag: fig for tag, fig in drawn.items() if fig is not None}


# --- custom-scalars layout -----------------------------------------------------------------------------


def _kinds(report: CurvatureReport) -> dict[str, list[str]]:
    """Block names by kind, kinds in :data:`KINDS` order (unknown kinds, then ``model``, last)."""
    by_kind: dict[str, list[str]] = {}
    for b in report:
        by_kind.setdefault(b.kind, []).append(b.name)
    rank = {kind: i for i, kind in enumerate(KINDS)}
    return dict(sorted(by_kind.items(), key=lambda kv: (kv[0] == "model", rank.get(kv[0], len(KINDS)))))


def _layout(report: CurvatureReport, logged: Iterable[str], prefix: str) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: ``{category: {chart: ["Multiline", [tag regex, ...]]}}``.

    Regexes are exact (escaped, anchored: TensorBoard uses ``re.match``) tags of the report's blocks, so
    ``top_eigenvalue`` does not also catch ``top_eigenvalue_2``. Only tags logged at this pass are charted.
    """
    logged = set(logged)
    by_kind = _kinds(report)

    def chart(*candidates: str) -> list[str]:
        return [f"^{re.escape(prefix + t)}$" for t in candidates if t in logged]

    def per_kind(kinds: Iterable[str], stats: Sequence[str], label: str) -> dict[str, list[str]]:
        return {
            f"{kind} {label}": chart(*(tags.block_tag(n, s) for n in by_kind[kind] for s in stats))
            for kind in kinds
            if kind in by_kind
        }

    sharpness = tags.SHARPNESS
    if sharpness not in logged and report.full is not None:
        sharpness = tags.block_tag(report.full.name, "top_eigenvalue")
    other = [k for k in by_kind if k not in _ATTENTION + _NORM_FFN + ("model",)]
    negative: dict[str, list[str]] = {}
    for kind in by_kind:
        negative |= per_kind([kind], ["min_eigenvalue"], "λ_min")
        negative |= per_kind([kind], ["negative_ratio"], "negative ratio")
    categories = {
        "Stability": {
            "sharpness λ_max vs threshold 2/lr": chart(sharpness, tags.THRESHOLD),
            "sharpness ratios (> 1: unstable)": chart(
                tags.SHARPNESS_RATIO,
                tags.PRECONDITIONED_RATIO,
                tags.CRITICAL_RATIO,
                tags.PRECONDITIONED_GRADIENT_RATIO,
            ),
            # 2/lr is charted here only next to what the update tier measured
            "curvature along the update, critical sharpness vs 2/lr": (
                chart(tags.UPDATE_CURVATURE, tags.CRITICAL_SHARPNESS, tags.THRESHOLD)
                if {tags.UPDATE_CURVATURE, tags.CRITICAL_SHARPNESS} & logged
                else []
            ),
            "alignment of gradient and update with the top eigenvector": chart(
                tags.GRADIENT_ALIGNMENT, tags.UPDATE_ALIGNMENT
            ),
            "preconditioned sharpness vs threshold": chart(
                tags.PRECONDITIONED_SHARPNESS, tags.PRECONDITIONED_THRESHOLD
            ),
            "block heterogeneity (Jensen-Shannon distance)": chart(tags.HETEROGENEITY),
            # [KG]'s stabilisation criterion (opt-in) against its O(k^-2) reference
            "stabilisation S_D/(k(k+1)) vs O(k^-2) reference": chart(
                tags.STABILIZATION_CRITERION, tags.STABILIZATION_REFERENCE
            ),
        },
        "Attention": per_kind(_ATTENTION, ["top_eigenvalue"], "λ_max across layers"),
        "Norms and FFN": per_kind(_NORM_FFN, ["top_eigenvalue"], "λ_max across layers"),
        "Embedding and head": per_kind(other, ["top_eigenvalue"], "λ_max"),
        "Trace": per_kind(by_kind, ["trace"], "trace"),
        "Top eigenvector": {
            **per_kind(by_kind, ["top_share"], "share of the top eigenvector"),
            **per_kind(by_kind, ["top_rayleigh"], "own curvature along the top eigenvector"),
        },
        "Negative curvature": negative,
        "Gauss-Newton split": per_kind(
            by_kind, ["gauss_newton_top", "functional_top"], "Gauss-Newton vs functional λ_max"
        ),
        "Theory vs measured": _theory_charts(logged, chart),
        "Alerts": {"alerts fired per pass": chart(tags.ALERT_COUNT)},
        "Pass cost": {
            "seconds per pass": chart(tags.PASS_SECONDS),
            "matvecs per pass": chart(tags.PASS_MATVECS),
            "monitor time / training time": chart(tags.MONITOR_OVERHEAD),
            "steps per rotation over every block": chart(tags.MONITOR_ROTATION),
        },
    }
    layout = {
        f"Curvature: {title}": {name: ["Multiline", regexes] for name, regexes in charts.items() if regexes}
        for title, charts in categories.items()
    }
    return {title: charts for title, charts in layout.items() if charts}


def _theory_charts(logged: set[str], chart: Any) -> dict[str, list[str]]:
    """Per attention layer: ratios, bounds against measured λ_max, per-head Jacobian norms, input scale.

    What each ratio means (docs/theory.md): ``measured / single-layer Gauss-Newton`` is the primary number,
    the block's λ_max over c λ_max(mean over sequences of J_s^T J_s), c = 2/(L d): how much the rest of the
    network and the loss amplify (> 1) or damp (< 1) the layer's own curvature, comparable across Q, K, V.
    ``measured / outer bound`` divides by a worst-case bound instead: mostly the bound's looseness
    (far below 1 for Q/K). ``measured ‖H‖ / bound`` is a theorem only in the papers' setting (≤ 1).
    """
    prefix = tags.THEORY + "/"
    theory = sorted(t for t in logged if t.startswith(prefix))

    def names(stat: str) -> list[str]:
        return [t[len(prefix) : -len(stat) - 1] for t in theory if t.endswith("/" + stat)]

    blocks = names("outer_bound")
    charts: dict[str, list[str]] = {}
    for layer in names("input_norm"):
        own = [b for b in blocks if b.startswith(layer + ".")]
        heads = [t for t in theory if t.startswith(f"{prefix}{layer}/head_")]
        charts[f"{layer}: measured λ_max / single-layer Gauss-Newton (> 1: amplified downstream)"] = chart(
            *(tags.theory_tag(b, "gauss_newton_ratio") for b in own)
        )
        charts[f"{layer}: measured λ_max / outer bound (looseness of the bound, not curvature)"] = chart(
            *(tags.theory_tag(b, "outer_ratio") for b in own)
        )
        charts[f"{layer}: measured ‖H‖ / bound (proven setting only: ≤ 1)"] = chart(
            *(tags.theory_tag(b, "bound_ratio") for b in own)
        )
        charts[f"{layer}: measured λ_max against single-layer Gauss-Newton and bounds"] = chart(
            *(
                t
                for b in own
                for t in (
                    tags.block_tag(b, "top_eigenvalue"),
                    tags.theory_tag(b, "gauss_newton"),
                    tags.theory_tag(b, "outer_bound"),
                    tags.theory_tag(b, "bound"),
                )
            )
        )
        charts[f"{layer}: single-layer Gauss-Newton c·λ_max(mean J'J) per head"] = chart(
            *(t for t in heads if "/gauss_newton_" in t)
        )
        charts[f"{layer}: Jacobian norms per head ‖G_Q‖, ‖G_K‖, ‖G_V‖"] = chart(
            *(t for t in heads if "/jacobian_" in t)
        )
        charts[f"{layer}: input scale ‖X‖ and ‖G_QK‖ / ‖G_V‖"] = chart(
            tags.theory_tag(layer, "input_norm"), tags.theory_tag(layer, "qk_over_v")
        )
    for layer in names(
        "block_bound"
    ):  # [P] Thm 6, the whole post-norm layer (lightning_hessian.block_theory)
        charts[f"{layer}: measured ‖H‖ of the layer against the full-block bound [P] Thm 6"] = chart(
            tags.theory_tag(layer, "block_measured"), tags.theory_tag(layer, "block_bound")
        )
        charts[f"{layer}: measured / full-block bound (≤ 1 where proven)"] = chart(
            tags.theory_tag(f"{layer}/block", "bound_ratio"), tags.theory_tag(layer, "block_ratio")
        )
    return charts


# --- text ----------------------------------------------------------------------------------------------


def _latest_markdown(step: int, report: CurvatureReport) -> str:
    """The latest values of every block (and the model): the report's own Markdown table, with the step."""
    return f"**Step {step}**: " + report.markdown()


def _alerts_markdown(step: int, alerts: Sequence[Alert]) -> str:
    """This pass's alerts as a Markdown list, most severe first."""
    lines = [f"**{len(alerts)} alert{'s' if len(alerts) != 1 else ''} at step {step}**", ""]
    for a in sorted(alerts, key=lambda a: _SEVERITY_ORDER.get(a.severity, len(_SEVERITY_ORDER))):
        line = f"- **{a.severity.upper()}** `{a.rule}`: {a.message}"
        if a.tag is not None:
            line += f" (`{a.tag}`" + ("" if a.value is None else f" = {format_number(a.value)}") + ")"
        lines.append(line)
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------------------


def _finite(value: Any, default: float = math.nan) -> float:
    """``float(value)``, or ``default`` for ``None``."""
    return default if value is None else float(value)


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):  # densities come as CPU float64 tensors
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _density(block: BlockCurvature) -> tuple[np.ndarray, np.ndarray] | None:
    """The block's density ``(grid, values)`` sorted by eigenvalue, or ``None`` if it has no usable one."""
    if block.density is None:
        return None
    grid, values = (_array(x) for x in block.density)
    keep = np.isfinite(grid) & np.isfinite(values)
    if grid.shape != values.shape or keep.sum() < 2:
        return None
    order = np.argsort(grid[keep])
    grid, values = grid[keep][order], np.maximum(values[keep][order], 0.0)
    return (grid, values) if values.max() > 0 else None


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around increasing centres (for ``pcolormesh`` with uneven steps)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def _rebin(edges: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The mean density of ``(x, y)`` over each cell between consecutive ``edges`` (mass-conserving)."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.diff(x) * (y[1:] + y[:-1]) / 2)])
    mass = np.diff(np.interp(edges, x, cumulative, left=0.0, right=cumulative[-1]))
    return mass / np.diff(edges)


def _short(name: str, width: int = 30) -> str:
    """Drop leading dotted components of a long block name."""
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) > width:
        parts.pop(0)
    return name if len(parts) == len(name.split(".")) else "…" + ".".join(parts)


def _kind_color(kind: str) -> str:
    """A fixed colour per block kind (matplotlib's ``C0``..``C9`` cycle), black for the model."""
    return "k" if kind not in KINDS else f"C{KINDS.index(kind) % 10}"


def _spectral_density_figure(figure_cls: type, step: int, report: CurvatureReport) -> Any | None:
    """Small multiples of every block's spectral density at this pass (log-scale density)."""
    panels = [(b, d) for b in report if (d := _density(b)) is not None]
    if not panels:
        return None
    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = figure_cls(figsize=(2.6 * cols, 1.9 * rows + 0.8), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (b, (grid, values)) in zip(axes, panels):
        floor = values.max() * _FLOOR  # log axes need a floor: Gaussian tails reach 1e-300
        clipped = np.maximum(values, floor)
        ax.fill_between(grid, floor, clipped, color=_kind_color(b.kind), alpha=0.25, linewidth=0)
        ax.plot(grid, clipped, color=_kind_color(b.kind), linewidth=1)
        ax.set_yscale("log")
        ax.minorticks_off()  # log minor ticks cost most of the drawing time of many small panels
        ax.locator_params(axis="x", nbins=4)
        ax.set_ylim(bottom=floor)
        ax.axvline(0.0, color="0.5", linewidth=0.6, linestyle=":")
        ax.set_title(f"{_short(b.name)} ({b.kind})", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle(f"Spectral density per block ({report.curvature}), step {step}")
    fig.supxlabel("eigenvalue")
    fig.supylabel("density (log scale)")
    return fig


def _density_over_time_figure(figure_cls: type, densities: Sequence[_Density]) -> Any | None:
    """Heatmap of the tracked block's density: step (x) by eigenvalue (y), colour log10 density."""
    if not densities:
        return None
    grid = np.linspace(min(d.grid[0] for d in densities), max(d.grid[-1] for d in densities), _GRID_POINTS)
    # Each pass has its own grid (its spectral range): move each onto one common grid, conserving mass, so
    # that a density narrower than a common cell still shows up.
    edges = _edges(grid)
    values = np.stack([_rebin(edges, d.grid, d.values) for d in densities], axis=1)
    if not values.max() > 0:
        return None
    z = np.log10(np.maximum(values, values.max() * _FLOOR))
    steps = np.array([d.step for d in densities], dtype=float)
    fig = figure_cls(figsize=(8, 4.5), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(_edges(steps), _edges(grid), z, cmap=_CMAP, shading="flat")
    fig.colorbar(mesh, ax=ax, label=r"$\log_{10}$ density")
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"Spectral density over time: {densities[-1].block}")
    return fig


def _top_eigenvalue_figure(
    figure_cls: type, report: CurvatureReport, history: Sequence[PassRecord]
) -> Any | None:
    """Heatmap of log10 λ_max: blocks (rows, model order) by pass step (columns)."""
    names = [b.name for b in report]
    records = sorted({r.step: r for r in history}.items())  # a repeated step keeps its latest pass
    if not names or not records:
        return None
    top = np.array(
        [[_finite(r.scalars.get(tags.block_tag(n, "top_eigenvalue"))) for _, r in records] for n in names]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.ma.masked_invalid(np.where(top > 0, np.log10(np.where(top > 0, top, 1.0)), np.nan))
    if z.mask.all():
        return None
    steps = np.array([step for step, _ in records], dtype=float)
    fig = figure_cls(figsize=(8, max(3.0, 0.2 * len(names) + 1.5)), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")  # masked cells (missing, or λ_max <= 0) show as grey
    mesh = ax.pcolormesh(_edges(steps), np.arange(len(names) + 1) - 0.5, z, cmap=_CMAP, shading="flat")
    fig.colorbar(mesh, ax=ax, label=r"$\log_{10} \lambda_{\max}$")
    ax.set_yticks(np.arange(len(names)))
    ax.set_yticklabels(names, fontsize=max(4, min(8, 400 // len(names))))
    ax.invert_yaxis()  # first block on top
    ax.set_xlabel("step")
    ax.set_title(f"Top eigenvalue per block ({report.curvature})")
    return fig
