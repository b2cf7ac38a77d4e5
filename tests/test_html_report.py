"""The HTML report of a real run: read back from TensorBoard and CSV logs, parsed, and drawn in Chromium."""

from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianMonitor, tags, write_html_report
from lightning_hessian.__main__ import main
from lightning_hessian.alerts import ThresholdRule
from lightning_hessian.html_report import render_html, report_charts
from lightning_hessian.run_data import LoggedAlert, RunData, read_run

SEQ, VOCAB, D = 6, 13, 16
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class TwoLayers(L.LightningModule):
    """Tokens -> two Transformer encoder layers -> mean pool -> 3 classes (blocks with layers 0 and 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self.head(self.encoder(self.embed(tokens)).mean(1)), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)

    def train_dataloader(self):
        tokens = torch.randint(VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three passes (steps 2, 4, 6) to a TensorBoard and a CSV logger, an alert at every pass."""
    root = tmp_path_factory.mktemp("html_report")
    L.seed_everything(0, verbose=False)
    rule = ThresholdRule("sharp", tag_pattern=tags.SHARPNESS, above=0.0, severity="warning")
    monitor = HessianMonitor(every_n_steps=2, alerts=[rule], figures=False)
    tb, csv_logger = TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")
    trainer = L.Trainer(
        max_steps=6,
        logger=[tb, csv_logger],
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    with pytest.warns(UserWarning, match="sharp"):
        trainer.fit(TwoLayers())
    history = {r.step: r.scalars for r in monitor.history}
    assert sorted(history) == [2, 4, 6]
    return dict(tb=Path(tb.log_dir), csv=Path(csv_logger.log_dir) / "metrics.csv", history=history, root=root)


def test_tensorboard_run_is_read_back(run):
    data = read_run(run["tb"])
    top = tags.block_tag("model", "top_eigenvalue")
    for step, scalars in run["history"].items():
        assert dict(data.scalars[top])[step] == pytest.approx(scalars[top], rel=1e-6)
    assert data.blocks["encoder.layers.1.self_attn.q"] == ("query", 1)
    assert data.blocks["model"][0] == "model" and not data.kinds_guessed
    assert [(a.step, a.severity, a.rule) for a in data.alerts] == [(s, "warning", "sharp") for s in (2, 4, 6)]


def test_csv_run_is_read_back_with_guessed_kinds(run):
    tb, csv = read_run(run["tb"]), read_run(run["csv"])
    assert csv.kinds_guessed and csv.blocks == tb.blocks  # the guesses agree with the logged kinds here
    for tag, points in tb.scalars.items():
        if tag.startswith(("curvature/", "stability/")):
            assert [s for s, _ in csv.scalars[tag]] == [s for s, _ in points], tag
            assert [v for _, v in csv.scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert [(a.step, a.severity) for a in csv.alerts] == [(s, "unknown") for s in (2, 4, 6)]  # counts only


def test_the_run_folder_is_found_below_the_root(run):
    assert read_run(run["root"] / "tb").source == run["tb"]
    with pytest.raises(FileNotFoundError):
        read_run(run["root"] / "missing")


class _Page(HTMLParser):
    """Collects the report's sections, chart placeholders, table rows and inline data."""

    def __init__(self) -> None:
        super().__init__()
        self.headings, self.charts, self.rows, self.scripts, self.links = [], [], [], [], []
        self._tag, self._row = None, None

    def handle_starttag(self, tag, attrs):
        attrs, self._tag = dict(attrs), tag
        if tag == "div" and attrs.get("class") == "chart":
            self.charts.append(int(attrs["data-chart"]))
        self.links += [v for k, v in attrs.items() if k in ("src", "href")]
        if tag == "tr":
            self._row = []
        if tag == "script":
            self.scripts.append([attrs.get("id"), ""])

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._tag == "h2":
            self.headings.append(data)
        if self._row is not None and data.strip():
            self._row.append(data.strip())
        if self._tag == "script":
            self.scripts[-1][1] += data


def test_report_has_every_section_and_the_latest_values(run, tmp_path):
    path = write_html_report(run["tb"], tmp_path / "report.html")
    page = _Page()
    page.feed(path.read_text())
    assert page.headings == [
        "Stability",
        "λ_max per layer",
        "λ_max per kind",
        "Alerts",
        "Latest value of every block",
    ]
    assert not page.links  # self-contained: nothing to fetch
    data = json.loads(next(text for id_, text in page.scripts if id_ == "report-data"))
    assert page.charts == list(range(len(data["charts"])))
    charts = {c["title"]: c for c in data["charts"]}
    ratios = charts["Sharpness ratios (> 1: unstable)"]
    assert ratios["ref"] == 1.0 and {m["step"] for m in ratios["markers"]} == {2, 4, 6}
    assert {s["name"] for s in ratios["series"]} == {tags.SHARPNESS_RATIO, tags.PRECONDITIONED_RATIO}
    layer1 = [s["name"].split()[0] for s in charts["Layer 1: attention λ_max"]["series"]]
    assert layer1 == ["query", "key", "value", "attn_out"]  # Q, K and V of a layer in one chart
    assert "ffn_in λ_max across layers" in charts and "model λ_max" in charts
    last = run["history"][6]
    rows = {r[0]: r for r in page.rows if r and r[0] in {n for n, _ in read_run(run["tb"]).blocks.items()}}
    assert rows["model"][3] == f"{last[tags.block_tag('model', 'top_eigenvalue')]:.4g}"
    assert rows["encoder.layers.0.linear1"][1:3] == ["ffn_in", "0"]
    assert len(rows) == len(read_run(run["tb"]).blocks)


def test_log_scale_when_values_span_decades():
    data = RunData(
        Path("x"),
        scalars={
            tags.SHARPNESS: [(1, 1.0), (2, 500.0)],
            tags.THRESHOLD: [(1, 3.0)],
            tags.SHARPNESS_RATIO: [(1, 0.5), (2, math.nan)],
        },
    )
    charts = {c["title"]: c for _, specs in report_charts(data) for c in specs}
    assert charts["Sharpness λ_max against 2/lr"]["log"] is True
    ratio = charts["Sharpness ratios (> 1: unstable)"]
    assert ratio["log"] is False and ratio["series"][0]["points"] == [[1, 0.5], [2, None]]  # NaN -> null
    data.alerts = [LoggedAlert(2, "critical", "x", "</script><b>"), LoggedAlert(1, "info", "y", "z")]
    markers = {c["title"]: c for _, specs in report_charts(data) for c in specs}[ratio["title"]]["markers"]
    assert [m["step"] for m in markers] == [2]  # info alerts are not stability events
    text = render_html(data)
    assert "</script><b>" not in text and text.count("</script>") == 2  # escaped in the table and the data


def test_command_line(run, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(run["csv"]), "-o", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_report_renders_in_chromium(run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium (apt-get install chromium)")
    path = write_html_report(run["tb"], tmp_path / "report.html")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.route(
            "**/*",
            lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_(),
        )  # no network
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-rendered=yes]", timeout=10_000)
        charts = page.locator("div.chart")
        n_series = sum(len(c["series"]) for _, s in report_charts(read_run(run["tb"])) for c in s)
        assert charts.count() > 5 and page.locator("div.chart svg").count() == charts.count()
        assert page.locator("path.series").count() == n_series
        assert page.locator("line.ref").count() == 1 and page.locator("circle.alert-dot").count() == 3
        first = charts.first
        first.locator("button.key").first.click()  # toggling a series removes its line
        assert page.locator("path.series").count() == n_series - 1
        box = first.locator("rect.overlay").bounding_box()
        page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
        assert "step 6" in first.locator(".tip").inner_text()
        browser.close()
    assert not errors


def test_stabilization_chart_only_when_logged():
    title = "Stabilisation criterion S_D/(k(k+1)) against its O(k⁻²) reference (opt-in)"
    plain = RunData(Path("x"), scalars={tags.SHARPNESS: [(1, 1.0)]})
    assert title not in {c["title"] for _, specs in report_charts(plain) for c in specs}
    data = RunData(
        Path("x"),
        scalars={
            tags.STABILIZATION_CRITERION: [(10, 1e-4), (20, 1e-8)],
            tags.STABILIZATION_REFERENCE: [(10, 1e-4)],
        },
    )
    chart = {c["title"]: c for _, specs in report_charts(data) for c in specs}[title]
    assert [s["name"] for s in chart["series"]] == [
        tags.STABILIZATION_CRITERION,
        tags.STABILIZATION_REFERENCE,
    ]
    assert chart["log"] is True
