"""The figures that need no TensorBoard settings: drawn from hand-built reports, read back from the event
files."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from _reports import model_report
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_hessian import CurvatureReport, tags
from lightning_hessian.alerts import Alert, PassRecord
from lightning_hessian.dashboard import (
    HOW_TO_READ,
    IMAGE_ATTENTION,
    IMAGE_LAYER_HEATMAPS,
    IMAGE_STABILITY,
    TEXT_HOW_TO_READ,
    CurvatureDashboard,
)
from lightning_hessian.dashboard_figures import attention_figure, layer_heatmap_figure, stability_figure

STEPS = (10, 20, 30)
RATIOS = {10: 0.01, 20: 2.5, 30: 0.2}  # spans decades: log scale
CRITICAL = "#d62728"


@pytest.fixture(scope="module")
def report() -> CurvatureReport:
    """The encoder's blocks (two layers of query / key / value / attn_out / FFN / norms), made-up numbers."""
    return model_report("encoder", densities=0)


def _history(report: CurvatureReport) -> list[PassRecord]:
    """Three passes: block λ_max scaled by 1, 2, 4; ratios from RATIOS; thresholds 2/lr fixed."""
    history = []
    for i, step in enumerate(STEPS):
        scalars = {
            k: v * 2**i for k, v in report.scalars().items() if v is not None and "top_eigenvalue" in k
        }
        scalars |= {
            tags.SHARPNESS: 40 * RATIOS[step],
            tags.THRESHOLD: 40.0,
            tags.SHARPNESS_RATIO: RATIOS[step],
            tags.PRECONDITIONED_SHARPNESS: 500 * RATIOS[step],
            tags.PRECONDITIONED_THRESHOLD: 1000.0,
            tags.PRECONDITIONED_RATIO: RATIOS[step] / 2,
        }
        history.append(PassRecord(step, scalars))
    return history


@pytest.fixture(scope="module")
def events(report, tmp_path_factory):
    tb = TensorBoardLogger(tmp_path_factory.mktemp("figures"))
    dashboard, history = CurvatureDashboard(), _history(report)
    alerts = {20: [Alert("stability_threshold", "critical", 20, "ratio above 1", tags.SHARPNESS_RATIO, 2.5)]}
    for i, step in enumerate(STEPS):
        dashboard.log_pass([tb], step, history[i].scalars, report, alerts.get(step, []), history[: i + 1])
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc, dashboard


def _png(acc: EventAccumulator, tag: str, step: int) -> np.ndarray:
    event = next(e for e in acc.Images(tag) if e.step == step)
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def _has_color(pixels: np.ndarray, hex_color: str, at_least: int = 20) -> bool:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb).sum(-1) <= 30).sum()) >= at_least


def test_new_figures_are_in_the_event_files_at_every_pass(events):
    acc, _ = events
    for tag in (IMAGE_STABILITY, IMAGE_ATTENTION, IMAGE_LAYER_HEATMAPS):
        assert [e.step for e in acc.Images(tag)] == list(STEPS), tag
    stability = _png(acc, IMAGE_STABILITY, 30)
    assert _has_color(stability, "#1f77b4") and _has_color(stability, "#ff7f0e")  # two distinct colours
    assert _has_color(stability, CRITICAL)  # the critical alert at step 20 is marked
    assert not _has_color(_png(acc, IMAGE_STABILITY, 10), CRITICAL)  # not before it fired
    attention = _png(acc, IMAGE_ATTENTION, 30)
    assert all(_has_color(attention, c) for c in ("#1f77b4", "#d62728", "#2ca02c", "#9467bd"))  # Q, K, V, out


def test_how_to_read_card_is_written_once(events):
    acc, dashboard = events
    (card,) = acc.Tensors(TEXT_HOW_TO_READ + "/text_summary")
    assert card.tensor_proto.string_val[0].decode() == HOW_TO_READ and card.step == STEPS[0]
    assert dashboard.state_dict()["alerts"] == [[20, "critical"]]  # checkpointed for the stability figure


def test_stability_figure_reference_line_log_scale_and_alerts(report):
    history = _history(report)
    fig = stability_figure(Figure, history, [(20, "critical"), (30, "info")])
    left, right = fig.axes
    assert left.get_yscale() == "log" and right.get_yscale() == "log"  # values span decades
    lines = {line.get_label(): line for line in right.get_lines()}
    assert list(lines["1: unstable above"].get_ydata()) == [1.0, 1.0]
    assert list(lines["sharpness ratio"].get_ydata()) == [RATIOS[s] for s in STEPS]
    assert to_hex(lines["sharpness ratio"].get_color()) != to_hex(lines["preconditioned ratio"].get_color())
    verticals = [line for line in right.get_lines() if line.get_xdata()[0] == line.get_xdata()[-1]]
    assert [(line.get_xdata()[0], to_hex(line.get_color())) for line in verticals] == [(20, CRITICAL)]
    flat = [PassRecord(s, {tags.SHARPNESS_RATIO: 0.5 + s / 100}) for s in STEPS]
    assert stability_figure(Figure, flat, []).axes[1].get_yscale() == "linear"
    assert stability_figure(Figure, [PassRecord(1, {tags.SHARPNESS: 1.0})], []) is None


def test_attention_figure_has_qkv_of_a_layer_in_one_panel(report):
    history = _history(report)
    fig = attention_figure(Figure, report, history)
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["layer 0", "layer 1"]
    ax = fig.axes[1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["query", "key", "value", "attn_out"]
    assert len({to_hex(line.get_color()) for line in lines.values()}) == 4
    q = tags.block_tag("encoder.layers.1.self_attn.q", "top_eigenvalue")
    assert list(lines["query"].get_ydata()) == pytest.approx([r.scalars[q] for r in history])


def test_layer_heatmaps_per_kind(report):
    history = _history(report)
    fig = layer_heatmap_figure(Figure, report, history)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out", "norm"}
    assert [t.get_text() for t in panels["norm"].get_yticklabels()] == [
        "0: norm1",
        "0: norm2",
        "1: norm1",
        "1: norm2",
    ]
    grid = panels["value"].collections[0].get_array().reshape(2, len(STEPS))
    v1 = tags.block_tag("encoder.layers.1.self_attn.v", "top_eigenvalue")
    assert np.allclose(grid[1], [math.log10(r.scalars[v1]) for r in history])
    assert layer_heatmap_figure(Figure, report, []) is None
