"""Figures and texts reach Weights & Biases (offline) and MLflow (local files) in real Trainer runs.

Each logger test is skipped when its package is missing (``pip install -e ".[loggers]"``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _lightning import fit
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_hessian import HessianMonitor, tags
from lightning_hessian.alerts import ThresholdRule
from lightning_hessian.dashboard import (
    IMAGE_STABILITY,
    IMAGE_TOP_EIGENVALUES,
    TEXT_ALERTS,
    TEXT_LATEST,
    CurvatureDashboard,
)
from lightning_hessian.logger_sinks import MLflowSink, TensorBoardSink, WandbSink, _markdown_html

TOP = tags.block_tag("model", "top_eigenvalue")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the alert below is printed as a warning


def _monitor() -> HessianMonitor:
    """Passes at steps 2 and 4, with an alert at each (no densities: they cost seconds)."""
    pytest.importorskip("matplotlib")  # the figures
    rule = ThresholdRule("any sharpness", tag_pattern=r"stability/sharpness", above=0.0, severity="warning")
    return HessianMonitor(every_n_steps=2, alerts=[rule])


def _offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A WandbLogger that never reaches the network and writes nothing outside ``tmp_path``."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(name, value)
    return WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-hessian-test")


def _local_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An MLFlowLogger on a local file store (MLflow >= 3.x refuses one without the opt-in below)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name="curvature", tracking_uri=f"file:{tmp_path}/mlruns")


def test_wandb_offline_gets_figures_texts_and_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    logger = _offline_wandb(tmp_path, monkeypatch)
    monitor = _monitor()
    try:
        fit(tmp_path, [monitor], max_steps=4, logger=logger)
        files = Path(logger.experiment.dir)
        summary = dict(logger.experiment.summary)  # the last value of every key (offline: none on disk)
    finally:
        wandb.finish()
    steps = [r.step for r in monitor.history]
    assert steps == [2, 4]
    media = files / "media"
    for tag in (IMAGE_STABILITY, IMAGE_TOP_EIGENVALUES):  # one PNG per pass and figure
        pngs = sorted((media / "images").glob(f"{tag}_*.png"))
        assert len(pngs) == len(steps), tag
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    latest = sorted((media / "html").glob(f"{TEXT_LATEST}_*.html"))
    assert len(latest) == len(steps)
    page = latest[-1].read_text()
    assert "<table>" in page and "<code>model</code>" in page and "<b>Step 4</b>" in page
    assert len(list((media / "html").glob(f"{TEXT_ALERTS}_*.html"))) == len(steps)

    assert summary[TOP] == pytest.approx(monitor.history[-1].scalars[TOP], rel=1e-6)
    for tag, kind in ((IMAGE_STABILITY, "image-file"), (TEXT_LATEST, "html-file")):  # the last pass's
        assert summary[tag]["_type"] == kind and (files / summary[tag]["path"]).is_file()


def test_mlflow_local_gets_figure_and_text_artifacts_and_scalars(tmp_path, monkeypatch):
    logger = _local_mlflow(tmp_path, monkeypatch)
    monitor = _monitor()
    fit(tmp_path, [monitor], max_steps=4, logger=logger)
    steps = [r.step for r in monitor.history]
    assert steps == [2, 4]
    artifacts = tmp_path / "mlruns" / logger.experiment_id / logger.run_id / "artifacts"
    for step in steps:
        for tag in (IMAGE_STABILITY, IMAGE_TOP_EIGENVALUES):
            png = artifacts / tag / f"step_{step:07d}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        latest = (artifacts / TEXT_LATEST / f"step_{step:07d}.md").read_text()
        assert latest.startswith(f"**Step {step}**") and "| `model` |" in latest
        assert (artifacts / TEXT_ALERTS / f"step_{step:07d}.md").read_text().startswith("**1 alert")

    history = logger.experiment.get_metric_history(logger.run_id, TOP)
    assert [m.step for m in history] == steps
    assert history[-1].value == pytest.approx(monitor.history[-1].scalars[TOP], rel=1e-6)


def test_figures_are_drawn_once_per_pass_for_every_logger(tmp_path, monkeypatch):
    drawn: list[dict] = []
    draw = CurvatureDashboard._draw

    def counting_draw(self, *args, **kwargs):
        drawn.append(draw(self, *args, **kwargs))
        return drawn[-1]

    received: dict[str, list] = {}  # sink class -> the figures it was given, pass after pass
    for sink in (TensorBoardSink, WandbSink, MLflowSink):
        monkeypatch.setattr(sink, "write", _spy(sink.write, received.setdefault(sink.__name__, [])))
    monkeypatch.setattr(CurvatureDashboard, "_draw", counting_draw)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    expected = ["TensorBoardSink"]
    if _has("wandb"):
        loggers.append(_offline_wandb(tmp_path, monkeypatch))
        expected.append("WandbSink")
    if _has("mlflow"):
        loggers.append(_local_mlflow(tmp_path, monkeypatch))
        expected.append("MLflowSink")
    monitor = _monitor()
    try:
        fit(tmp_path, [monitor], max_steps=4, logger=loggers)
    finally:
        if _has("wandb"):
            import wandb

            wandb.finish()
    assert len(drawn) == len(monitor.history) == 2 and all(drawn)
    for name in expected:  # the very Figure objects of the one drawing
        assert [[id(f) for f in figs.values()] for figs in received[name]] == [
            [id(f) for f in figs.values()] for figs in drawn
        ], name

    drawn.clear()  # a logger without a sink gets scalars only, and nothing is drawn for it
    fit(tmp_path / "csv_only", [_monitor()], max_steps=2, logger=CSVLogger(tmp_path / "csv_only"))
    assert drawn == []


def _spy(write, seen: list):
    def spied(self, step, figures, texts):
        seen.append(dict(figures))
        return write(self, step, figures, texts)

    return spied


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_markdown_renders_tables_lists_and_inline_marks():
    markdown = (
        "**Step 3**: hessian, *loss* 0.5\n\n| block | λ_max |\n|:---|---:|\n| `a\\|b` | 1.5 † |\n\n"
        "- **WARNING** `rule`: x < 2\n  continued\n- second"
    )
    page = _markdown_html(markdown)
    assert "<p><b>Step 3</b>: hessian, <i>loss</i> 0.5</p>" in page
    assert "<th style='text-align:left'>block</th><th style='text-align:right'>λ_max</th>" in page
    assert "<td style='text-align:left'><code>a|b</code></td><td style='text-align:right'>1.5 †</td>" in page
    assert "<ul><li><b>WARNING</b> <code>rule</code>: x &lt; 2 continued</li><li>second</li></ul>" in page
