"""CurvatureDashboard: scalars for every logger; layout, figures and text read back from TensorBoard files."""

from __future__ import annotations

import builtins
import copy
import csv
import json
import math
import re
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from _reports import block, model_report
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from lightning_hessian import CurvatureReport, tags
from lightning_hessian.alerts import Alert, PassRecord
from lightning_hessian.dashboard import (
    IMAGE_ATTENTION,
    IMAGE_DENSITY_OVER_TIME,
    IMAGE_LAYER_HEATMAPS,
    IMAGE_SPECTRAL_DENSITY,
    IMAGE_STABILITY,
    IMAGE_TOP_EIGENVALUES,
    TEXT_ALERTS,
    TEXT_LATEST,
    CurvatureDashboard,
    _spectral_density_figure,
)

STEPS = (10, 20, 30)
ALERTS = {
    20: [
        Alert("edge_of_stability", "critical", 20, "Sharpness crossed 2/lr.", tags.SHARPNESS_RATIO, 1.3),
        Alert("negative_curvature", "warning", 20, "Large negative curvature in the head."),
    ],
    30: [Alert("spike", "info", 30, "Top eigenvalue of the FFN jumped.")],
}
LAYOUT_TAG = "custom_scalars__config__"  # where SummaryWriter.add_custom_scalars stores the layout
CATEGORIES = {
    f"Curvature: {c}"
    for c in (
        "Stability",
        "Attention",
        "Norms and FFN",
        "Embedding and head",
        "Trace",
        "Negative curvature",
        "Alerts",
        "Pass cost",
    )
}


@pytest.fixture(scope="module")
def report() -> CurvatureReport:
    """The encoder's blocks, made-up numbers; densities for the whole model and two blocks."""
    return model_report("encoder", densities=2)


def _scaled(report: CurvatureReport, factor: float) -> CurvatureReport:
    """The report with the whole spectrum scaled: a later pass with different numbers."""
    out = copy.deepcopy(report)
    for b in out:
        b.top_eigenvalues = [v * factor for v in b.top_eigenvalues]
        b.min_eigenvalue = None if b.min_eigenvalue is None else b.min_eigenvalue * factor
        b.trace = None if b.trace is None else b.trace * factor
        if b.density is not None:
            grid, values = b.density
            b.density = (grid * factor, values / factor)
    return out


def _scalars(report: CurvatureReport) -> dict[str, float | None]:
    """What the callback hands over: report scalars plus stability / pass-cost tags."""
    s: dict[str, float | None] = dict(report.scalars())
    sharpness = report.full.top_eigenvalue if report.full is not None else math.nan
    s.update(
        {
            tags.SHARPNESS: sharpness,
            tags.LEARNING_RATE: 0.1,
            tags.THRESHOLD: 20.0,
            tags.SHARPNESS_RATIO: sharpness / 20.0,
            tags.PRECONDITIONED_SHARPNESS: math.nan,  # non-finite: logged as it is
            tags.PRECONDITIONED_THRESHOLD: None,  # None: skipped
            tags.PASS_SECONDS: report.seconds,
            tags.PASS_MATVECS: report.matvecs,
        }
    )
    return s


def _log_passes(dashboard, loggers, reports, alerts=ALERTS, steps=STEPS) -> list[PassRecord]:
    history: list[PassRecord] = []
    for step, rep in zip(steps, reports):
        scalars = _scalars(rep)
        history.append(PassRecord(step, {k: v for k, v in scalars.items() if v is not None}))
        dashboard.log_pass(loggers, step, scalars, rep, alerts.get(step, []), history)
    return history


def _events(logger: Logger) -> EventAccumulator:
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layouts(acc: EventAccumulator) -> list[layout_pb2.Layout]:
    """The custom-scalars layouts: a string tensor holding the serialized ``Layout`` proto."""
    layouts = []
    for event in acc.Tensors(LAYOUT_TAG) if LAYOUT_TAG in acc.Tags()["tensors"] else []:
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _texts(acc: EventAccumulator, tag: str) -> dict[int, str]:
    """``add_text`` stores a string tensor under ``<tag>/text_summary``."""
    tag += "/text_summary"
    if tag not in acc.Tags()["tensors"]:
        return {}
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def _charts(layout: layout_pb2.Layout) -> dict[tuple[str, str], list[str]]:
    return {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}


@pytest.fixture(scope="module")
def run(report, tmp_path_factory):
    """Three passes to a TensorBoard and a CSV logger."""
    root = tmp_path_factory.mktemp("dashboard")
    tb, csv_logger = TensorBoardLogger(root / "tb"), CSVLogger(root / "csv")
    dashboard = CurvatureDashboard()
    reports = [_scaled(report, f) for f in (1.0, 1.5, 2.0)]
    history = _log_passes(dashboard, [tb, csv_logger], reports)
    csv_logger.save()
    return dict(tb=tb, csv=csv_logger, acc=_events(tb), history=history, reports=reports, dashboard=dashboard)


def test_scalars_in_tensorboard(run):
    acc, history = run["acc"], run["history"]
    scalar_tags = set(acc.Tags()["scalars"])
    assert tags.PRECONDITIONED_THRESHOLD not in scalar_tags  # None is skipped
    for tag in history[-1].scalars:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(STEPS), tag
        for e, record in zip(events, history):
            expected = record.scalars[tag]
            if math.isnan(expected):
                assert math.isnan(e.value), tag
            else:
                assert e.value == pytest.approx(expected, rel=1e-6, abs=1e-30), tag
    assert [e.value for e in acc.Scalars(tags.ALERT_COUNT)] == [len(ALERTS.get(s, [])) for s in STEPS]


def test_scalars_in_csv(run):
    with open(run["csv"].experiment.metrics_file_path, newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == list(STEPS)
    for record in run["history"]:
        row = rows[record.step]
        for tag, value in record.scalars.items():
            logged = float(row[tag])
            assert math.isnan(logged) if math.isnan(value) else logged == pytest.approx(value, rel=1e-6)
        assert float(row[tags.ALERT_COUNT]) == len(ALERTS.get(record.step, []))


def test_layout_regexes_match_logged_tags(run, report):
    acc = run["acc"]
    (layout,) = _layouts(acc)  # written once
    assert {c.title for c in layout.category} == CATEGORIES  # no split was computed: no Gauss-Newton charts
    scalar_tags = acc.Tags()["scalars"]
    charted = set()
    for (category, chart), regexes in _charts(layout).items():
        assert regexes, (category, chart)
        for regex in regexes:
            matched = [t for t in scalar_tags if re.match(regex, t)]  # TensorBoard's own matching
            assert len(matched) == 1, (chart, regex, matched)
            charted.update(matched)
    for b in report:  # every block's top eigenvalue, trace and λ_min is on some chart
        for stat in ("top_eigenvalue", "trace", "min_eigenvalue", "negative_ratio"):
            assert tags.block_tag(b.name, stat) in charted or (b.kind == "model" and stat == "top_eigenvalue")
    charts = _charts(layout)
    stability = charts["Curvature: Stability", "sharpness λ_max vs threshold 2/lr"]
    assert [r for r in stability] == [f"^{re.escape(t)}$" for t in (tags.SHARPNESS, tags.THRESHOLD)]
    query = charts["Curvature: Attention", "query λ_max across layers"]
    assert query == [
        f"^{re.escape(tags.block_tag(b.name, 'top_eigenvalue'))}$" for b in report if b.kind == "query"
    ]
    assert len(query) == 2  # both layers on one chart
    assert charts["Curvature: Alerts", "alerts fired per pass"] == [f"^{re.escape(tags.ALERT_COUNT)}$"]


def test_images(run):
    acc = run["acc"]
    assert set(acc.Tags()["images"]) == {
        IMAGE_SPECTRAL_DENSITY,
        IMAGE_DENSITY_OVER_TIME,
        IMAGE_TOP_EIGENVALUES,
        IMAGE_STABILITY,
        IMAGE_ATTENTION,
        IMAGE_LAYER_HEATMAPS,
    }
    for tag in acc.Tags()["images"]:
        events = acc.Images(tag)
        assert [e.step for e in events] == list(STEPS)
        assert all(
            e.width > 100 and e.height > 100 and e.encoded_image_string[:4] == b"\x89PNG" for e in events
        )


def test_text(run, report):
    acc = run["acc"]
    latest = _texts(acc, TEXT_LATEST)
    assert sorted(latest) == list(STEPS)
    for b in report:
        assert f"`{b.name}`" in latest[30]
    assert "| block | kind | layer | params | λ_max | λ_min | trace | matvecs |" in latest[30]
    assert f"{run['reports'][-1].full.top_eigenvalue:.4g}" in latest[30]
    alerts = _texts(acc, TEXT_ALERTS)
    assert sorted(alerts) == [20, 30]  # only passes with alerts
    for step, fired in ALERTS.items():
        for a in fired:
            assert a.message in alerts[step] and a.severity.upper() in alerts[step] and a.rule in alerts[step]
    assert alerts[20].index("CRITICAL") < alerts[20].index("WARNING")


def test_state_dict_round_trip(run, report, tmp_path):
    state = run["dashboard"].state_dict()
    json.dumps(state)  # plain Python values
    assert [d["step"] for d in state["densities"]] == list(STEPS)
    assert {d["block"] for d in state["densities"]} == {"model"}
    resumed = CurvatureDashboard(density_history=2)
    resumed.load_state_dict(state)
    assert [d["step"] for d in resumed.state_dict()["densities"]] == [20, 30]
    # A resumed run writes the layout again, into its new event file, and keeps the density history.
    tb = TensorBoardLogger(tmp_path)
    _log_passes(resumed, [tb], [report], steps=(40,))
    acc = _events(tb)
    assert len(_layouts(acc)) == 1
    assert [d["step"] for d in resumed.state_dict()["densities"]] == [30, 40]
    assert IMAGE_DENSITY_OVER_TIME in acc.Tags()["images"]
    # A pass without densities draws no density figures (no stale heatmap) and keeps the history.
    no_density = copy.deepcopy(report)
    for b in no_density:
        b.density = None
    _log_passes(resumed, [tb], [no_density], steps=(50,))
    acc = _events(tb)
    assert [e.step for e in acc.Images(IMAGE_DENSITY_OVER_TIME)] == [40]
    assert [e.step for e in acc.Images(IMAGE_TOP_EIGENVALUES)] == [40, 50]
    assert [d["step"] for d in resumed.state_dict()["densities"]] == [30, 40]


def test_figures_off(report, tmp_path):
    tb = TensorBoardLogger(tmp_path)
    dashboard = CurvatureDashboard(figures=False)
    _log_passes(dashboard, [tb], [report, report])
    acc = _events(tb)
    assert acc.Tags()["images"] == []
    assert tags.SHARPNESS in acc.Tags()["scalars"] and len(_layouts(acc)) == 1 and _texts(acc, TEXT_LATEST)
    assert dashboard.state_dict() == {"densities": [], "alerts": []}


def test_report_without_optional_statistics(tmp_path):
    minimal = CurvatureReport(
        blocks={"head": block("head", "head", 0.7), "embed": block("embed", "embedding", 0.07)}
    )
    empty = CurvatureReport(blocks={})
    tb = TensorBoardLogger(tmp_path)
    dashboard = CurvatureDashboard()
    _log_passes(dashboard, [tb], [minimal, minimal, empty], alerts={})
    acc = _events(tb)
    assert set(acc.Tags()["images"]) == {IMAGE_TOP_EIGENVALUES}  # no density: no density figures
    (layout,) = _layouts(acc)
    assert {c.title for c in layout.category} == {
        "Curvature: Stability",
        "Curvature: Embedding and head",
        "Curvature: Alerts",
        "Curvature: Pass cost",
    }
    assert "`head`" in _texts(acc, TEXT_LATEST)[10]
    assert [e.step for e in acc.Scalars(tags.ALERT_COUNT)] == list(STEPS)


def test_without_matplotlib(report, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    tb = TensorBoardLogger(tmp_path)
    dashboard = CurvatureDashboard()
    with pytest.warns(UserWarning, match="pip install matplotlib") as record:
        _log_passes(dashboard, [tb], [report, report])
    assert sum("matplotlib" in str(w.message) for w in record) == 1
    monkeypatch.undo()
    acc = _events(tb)
    assert acc.Tags()["images"] == []
    assert [e.step for e in acc.Scalars(tags.SHARPNESS)] == [10, 20]
    assert _texts(acc, TEXT_LATEST) and len(_layouts(acc)) == 1


class _RecordingLogger(Logger):
    """A non-TensorBoard logger, optionally exposing a SummaryWriter as its experiment."""

    def __init__(self, writer: SummaryWriter | None = None) -> None:
        super().__init__()
        self.writer = writer
        self.logged: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self):
        return self.writer

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def test_other_loggers_and_prefix(report, tmp_path):
    plain = _RecordingLogger()
    writer = SummaryWriter(tmp_path / "custom")
    custom = _RecordingLogger(writer)
    prefixed = TensorBoardLogger(tmp_path / "prefixed", prefix="fit")
    _log_passes(
        CurvatureDashboard(figures=False), [plain, custom, prefixed], [report], alerts={10: ALERTS[20]}
    )
    assert [step for step, _ in plain.logged] == [10]
    assert (
        plain.logged[0][1][tags.ALERT_COUNT] == 2 and tags.PRECONDITIONED_THRESHOLD not in plain.logged[0][1]
    )
    writer.close()

    custom_acc = EventAccumulator(str(tmp_path / "custom"), size_guidance={"tensors": 0})
    custom_acc.Reload()
    assert len(_layouts(custom_acc)) == 1 and TEXT_ALERTS + "/text_summary" in custom_acc.Tags()["tensors"]

    acc = _events(prefixed)  # TensorBoardLogger(prefix="fit") logs "fit-<tag>": the regexes follow
    (layout,) = _layouts(acc)
    scalar_tags = acc.Tags()["scalars"]
    for regexes in _charts(layout).values():
        assert all(any(re.match(r, t) for t in scalar_tags) for r in regexes)
    assert f"fit-{tags.SHARPNESS}" in scalar_tags


def test_density_history_must_be_positive():
    with pytest.raises(ValueError, match="density_history"):
        CurvatureDashboard(density_history=0)


def test_density_floor_handles_tensor_and_degenerate_densities(report, tmp_path):
    """A density of zeros or NaNs is skipped; the others are still drawn."""
    broken = copy.deepcopy(report)
    first, second = list(broken.blocks.values())[:2]
    first.density = (first.density[0], torch.zeros_like(first.density[1]))
    second.density = (second.density[0], torch.full_like(second.density[1], math.nan))
    tb = TensorBoardLogger(tmp_path)
    _log_passes(CurvatureDashboard(), [tb], [broken], alerts={})
    assert IMAGE_SPECTRAL_DENSITY in _events(tb).Tags()["images"]


def test_an_all_zero_density_is_neither_drawn_nor_tracked():
    """A density that is zero everywhere (nothing to draw on a log scale) gets no panel, and the density over
    time follows the sharpest block that has one instead of the whole model."""
    report = CurvatureReport(
        blocks={
            "q": block("q", "query", 4.0, smallest=-1.0, density=True),
            "k": block("k", "key", 9.0, smallest=-1.0, density=True),
            "v": block("v", "value", 2.0, smallest=-1.0, density=True),
        },
        full=block("model", "model", 12.0, smallest=-1.0, density=True),
    )
    for b in (report.full, report.blocks["k"]):
        b.density = (b.density[0], torch.zeros_like(b.density[1]))
    fig = _spectral_density_figure(Figure, 10, report)
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["q (query)", "v (value)"]
    dashboard = CurvatureDashboard()
    dashboard.log_pass([], 10, report.scalars(), report, [], [])
    assert [d["block"] for d in dashboard.state_dict()["densities"]] == ["q"], "tracked an all-zero density"
    for b in report:
        b.density = (b.density[0], torch.zeros_like(b.density[1]))
    assert _spectral_density_figure(Figure, 20, report) is None


def test_rebinning_keeps_narrow_densities_visible():
    from lightning_hessian.dashboard import _edges, _rebin

    grid = np.linspace(-200.0, 200.0, 200)  # a common grid set by a wide early pass
    x = np.linspace(-0.5, 0.5, 101)  # a late pass whose density is narrower than one common cell
    y = np.exp(-(x**2) / 0.02)
    y /= np.trapezoid(y, x)
    edges = _edges(grid)
    values = _rebin(edges, x, y)
    assert np.sum(values * np.diff(edges)) == pytest.approx(1.0, rel=1e-9)
    assert values.max() > 0


def test_the_update_tier_chart_appears_only_with_the_update_tier():
    from lightning_hessian.dashboard import _layout
    from lightning_hessian.report import BlockCurvature, CurvatureReport

    report = CurvatureReport(blocks={"a": BlockCurvature("a", "query", 0, 4)})
    title = "curvature along the update, critical sharpness vs 2/lr"
    scheduled = _layout(report, {tags.SHARPNESS, tags.THRESHOLD, tags.SHARPNESS_RATIO}, "")
    assert title not in scheduled["Curvature: Stability"]  # 2/lr alone would make an empty-looking chart
    budget = _layout(report, {tags.UPDATE_CURVATURE, tags.THRESHOLD, tags.CRITICAL_RATIO}, "")
    charted = budget["Curvature: Stability"][title][1]
    assert any("update_curvature" in r for r in charted) and any("threshold" in r for r in charted)
    assert any(
        "critical_ratio" in r for r in budget["Curvature: Stability"]["sharpness ratios (> 1: unstable)"][1]
    )


def test_the_stabilization_chart_appears_only_when_it_is_logged():
    from lightning_hessian.dashboard import _layout
    from lightning_hessian.report import BlockCurvature, CurvatureReport

    report = CurvatureReport(blocks={"a": BlockCurvature("a", "query", 0, 4)})
    title = "stabilisation S_D/(k(k+1)) vs O(k^-2) reference"
    assert title not in _layout(report, {tags.SHARPNESS}, "")["Curvature: Stability"]
    logged = {tags.SHARPNESS, tags.STABILIZATION_CRITERION, tags.STABILIZATION_REFERENCE}
    charted = _layout(report, logged, "")["Curvature: Stability"][title][1]
    assert charted == ["^stabilization/criterion$", "^stabilization/reference$"]
