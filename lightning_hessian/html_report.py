"""A self-contained HTML report of a run: ``python -m lightning_hessian report RUN_DIR``.

One file, no network: the logged scalars (:func:`~lightning_hessian.run_data.read_run`: TensorBoard event
files or a ``metrics.csv``) go into an inline JSON block that an inline SVG renderer (``assets/report.js``)
draws. Sections: stability (both sharpness ratios against 1, the sharpnesses against their thresholds, the
alerts marked), λ_max per layer (query, key, value and attention output of one layer in one chart) and per
kind across layers, the alerts on a timeline and as a list, and the latest value of every block in a table.
Charts switch to a log scale by themselves when their positive values span more than two decades.
"""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from lightning_hessian import tags
from lightning_hessian.formatting import format_number
from lightning_hessian.run_data import RunData, read_run

__all__ = ["render_html", "report_charts", "write_html_report"]

REPORT_NAME = "curvature_report.html"  # written into the run directory when no path is given
_ATTENTION = ("query", "key", "value", "attn_out")
_KIND_ORDER = (*_ATTENTION, "norm", "ffn_in", "ffn_out", "embedding", "head", "other", "model")
_COLUMNS = (  # latest-table columns: (statistic, header)
    ("top_eigenvalue", "λ_max"),
    ("min_eigenvalue", "λ_min"),
    ("trace", "trace"),
    ("gauss_newton_top", "GN λ_max"),
    ("functional_top", "functional λ_max"),
    ("functional_min", "functional λ_min"),
)
_PASS_TAGS = ("curvature", "stability", "alerts")  # tags logged at passes: the timeline's step range
_SPAN_FOR_LOG = 100.0  # a chart starts on a log scale when its positive values span this factor


def write_html_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the HTML report of a logged run and return its path.

    Args:
        run_dir: a run directory, an event file or a ``metrics.csv`` (see :func:`read_run`).
        path: the HTML file to write; default ``curvature_report.html`` in the folder that was read.
    """
    data = read_run(run_dir)
    folder = data.source if data.source.is_dir() else data.source.parent
    out = Path(path) if path is not None else folder / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return out


def report_charts(data: RunData) -> list[tuple[str, list[dict[str, Any]]]]:
    """The charts of the report by section: ``[(section, [chart spec, ...]), ...]``, empty charts left out."""
    markers = [
        {"step": a.step, "severity": a.severity, "text": f"{a.rule}: {a.message}"}
        for a in data.alerts
        if a.severity != "info"  # info alerts (negative curvature, heterogeneity) are not about stability
    ]
    stability = [
        _chart(
            data,
            "Sharpness ratios (> 1: unstable)",
            [
                tags.SHARPNESS_RATIO,
                tags.PRECONDITIONED_RATIO,
                tags.CRITICAL_RATIO,
                tags.PRECONDITIONED_GRADIENT_RATIO,
            ],
            ref=1.0,
            ref_label="1: stability threshold",
            markers=markers,
        ),
        _chart(data, "Sharpness λ_max against 2/lr", [tags.SHARPNESS, tags.THRESHOLD], markers=markers),
        _chart(
            data,
            "Curvature along the update and critical sharpness 2/η_c against 2/lr",
            [tags.UPDATE_CURVATURE, tags.CRITICAL_SHARPNESS, tags.THRESHOLD],
            markers=markers,
        ),
        _chart(
            data,
            "Preconditioned sharpness λ_max(P⁻¹H) against its threshold",
            [tags.PRECONDITIONED_SHARPNESS, tags.PRECONDITIONED_THRESHOLD],
            markers=markers,
        ),
        _chart(data, "Block heterogeneity (Jensen-Shannon distance)", [tags.HETEROGENEITY]),
        _chart(
            data,
            "Stabilisation criterion S_D/(k(k+1)) against its O(k⁻²) reference (opt-in)",
            [tags.STABILIZATION_CRITERION, tags.STABILIZATION_REFERENCE],
        ),
        _chart(data, "Monitor time / training time", [tags.MONITOR_OVERHEAD]),
    ]
    by_layer: dict[int, list[str]] = {}
    by_kind: dict[str, list[str]] = {}
    for name, (kind, layer) in data.blocks.items():
        if kind in _ATTENTION and layer is not None:
            by_layer.setdefault(layer, []).append(name)
        else:
            by_kind.setdefault(kind, []).append(name)
    top = "top_eigenvalue"
    layers = [
        _chart(
            data,
            f"Layer {layer}: attention λ_max",
            [tags.block_tag(n, top) for n in names],
            names=[f"{data.blocks[n][0]} ({n})" for n in names],
        )
        for layer, names in sorted(by_layer.items())
    ]
    ranked = sorted(by_kind.items(), key=lambda kv: _rank(kv[0]))
    kinds = [
        _chart(
            data,
            f"{kind} λ_max" + (" across layers" if len(names) > 1 else ""),
            [tags.block_tag(n, top) for n in names],
            names=names,
        )
        for kind, names in ranked
    ]
    sections = [("Stability", stability), ("λ_max per layer", layers), ("λ_max per kind", kinds)]
    return [(title, [c for c in charts if c is not None]) for title, charts in sections]


def render_html(data: RunData, title: str | None = None) -> str:
    """The report as one HTML document (inline CSS, JavaScript and data)."""
    title = title or f"Curvature report: {data.source}"
    charts: list[dict[str, Any]] = []
    body: list[str] = []
    for section, specs in report_charts(data):
        if not specs:
            continue
        body.append(f"<section><h2>{html.escape(section)}</h2><div class='grid'>")
        for spec in specs:
            body.append(
                f"<figure><figcaption>{html.escape(spec['title'])}</figcaption>"
                f"<div class='chart' data-chart='{len(charts)}'></div></figure>"
            )
            charts.append(spec)
        body.append("</div></section>")
    body.append(_alerts_section(data))
    body.append(_latest_section(data))
    steps = [s for t, points in data.scalars.items() if t.startswith(_PASS_TAGS) for s, _ in points]
    payload = {
        "charts": charts,
        "alerts": [a.__dict__ for a in data.alerts],
        "span": [min(steps), max(steps)] if steps else [0, 1],
    }
    blob = json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c")  # no "</script>" inside
    asset = resources.files("lightning_hessian").joinpath("assets")
    style, script = (asset.joinpath(n).read_text(encoding="utf-8") for n in ("report.css", "report.js"))
    guessed = " Block kinds and layers were guessed from the block names (a CSV run logs none)."
    intro = (
        f"Read from <code>{html.escape(str(data.source))}</code>: {len(data.scalars)} scalar tags, "
        f"{len(data.alerts)} alerts.{guessed if data.kinds_guessed else ''} Click a legend entry to hide or "
        "show its line; hover a chart for the values at a step."
    )
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{intro}</p>{''.join(body)}"
        f"<script type='application/json' id='report-data'>{blob}</script><script>{script}</script>"
        "</body></html>\n"
    )


def _rank(kind: str) -> int:
    return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)


def _chart(
    data: RunData,
    title: str,
    chart_tags: list[str],
    *,
    names: list[str] | None = None,
    ref: float | None = None,
    ref_label: str | None = None,
    markers: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """A line-chart spec over the tags that were logged, or ``None`` if none was."""
    series = [
        {"name": label, "points": [[step, _json_number(v)] for step, v in data.scalars[tag]]}
        for tag, label in zip(chart_tags, names or chart_tags)
        if data.scalars.get(tag)
    ]
    if not series:
        return None
    positive = [v for s in series for _, v in s["points"] if v is not None and v > 0]
    log = bool(positive) and max(positive) / min(positive) > _SPAN_FOR_LOG
    return {
        "title": title,
        "series": series,
        "ref": ref,
        "ref_label": ref_label,
        "log": log,
        "markers": markers or [],
    }


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _alerts_section(data: RunData) -> str:
    if not data.alerts:
        return "<section><h2>Alerts</h2><p>No alerts fired.</p></section>"
    rows = "".join(
        f"<tr class='{html.escape(a.severity)}'><td>{a.step}</td><td>{html.escape(a.severity)}</td>"
        f"<td><code>{html.escape(a.rule)}</code></td><td>{html.escape(a.message)}</td></tr>"
        for a in data.alerts
    )
    return (
        "<section><h2>Alerts</h2><div class='grid'><figure><figcaption>Alerts by pass (hover a dot)"
        "</figcaption><div class='timeline'></div></figure></div>"
        "<table class='alerts'><thead><tr><th>step</th>"
        f"<th>severity</th><th>rule</th><th>message</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _latest_section(data: RunData) -> str:
    """Per block, the latest logged value of each statistic (and the step of the latest λ_max)."""
    latest = {tag: points[-1] for tag, points in data.scalars.items() if points}
    columns = [(s, h) for s, h in _COLUMNS if any(tags.block_tag(b, s) in latest for b in data.blocks)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    rows = []
    for name, (kind, layer) in sorted(data.blocks.items(), key=lambda kv: kv[0] == "model"):
        cells = [latest.get(tags.block_tag(name, s)) for s, _ in columns]
        step = latest.get(tags.block_tag(name, "top_eigenvalue"), (None, None))[0]
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(kind)}</td>"
            f"<td>{'–' if layer is None else layer}</td>"
            + "".join(f"<td class='num'>{format_number(None if c is None else c[1])}</td>" for c in cells)
            + f"<td class='num'>{'–' if step is None else step}</td></tr>"
        )
    return (
        "<section><h2>Latest value of every block</h2><table class='latest'><thead><tr><th>block</th>"
        f"<th>kind</th><th>layer</th>{head}<th>step</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "</section>"
    )
