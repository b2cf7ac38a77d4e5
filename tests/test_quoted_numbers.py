"""docs/quoted_numbers.py: every number docs/dashboards.md quotes is tied to a logged value, and checked."""

from __future__ import annotations

import pytest
from _scripts import ROOT, importing_from
from torch.utils.tensorboard import SummaryWriter

from lightning_hessian.run_data import read_run

DOCS = ROOT / "docs"
with importing_from("docs"):
    import quoted_numbers


@pytest.fixture
def run(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, sharpness in ((10, 212.4), (75, 118.04), (100, 45.6)):
        writer.add_scalar("stability/sharpness", sharpness, step)
        writer.add_scalar("curvature/model/top_eigenvalue", sharpness, step)
        writer.add_scalar("stability/threshold", 8640.0 if step == 10 else 67.0, step)
    writer.add_text("alerts", "**2 alerts at step 75**\n\n- **CRITICAL** `a`: x\n- **WARNING** `b`: y", 75)
    writer.close()
    return read_run(tmp_path / "run")


def test_numbers_are_checked_and_rewritten(run):
    text = (
        "λ_max = 118<!--q stability/sharpness@75--> against 8,640<!--q stability/threshold@10-->, "
        "peak 212<!--q stability/sharpness@10-100:max-->, low 45.6<!--q stability/sharpness@10-100:min-->, "
        "3<!--q passes--> passes, 1<!--q alerts:critical--> critical alert."
    )
    assert quoted_numbers.check(text, run) == []
    wrong = text.replace("118<!--", "117<!--").replace("3<!--q passes", "4<!--q passes")
    problems = quoted_numbers.check(wrong, run)
    assert len(problems) == 2 and "117 quoted, the run has 118" in problems[0]
    assert quoted_numbers.rewrite(wrong, run) == text
    assert quoted_numbers.check("1<!--q stability/missing@10-->", run)[0].startswith("stability/missing@10")


@pytest.mark.parametrize(
    ("number", "like", "expected"),
    [
        (118.04, "118", "118"),
        (1859.6, "1,860", "1,860"),
        (0.3912, "0.39", "0.39"),
        (2.0, "2.0", "2.0"),
        (0.0041, "0.004", "0.004"),
        (12702.0, "12,700", "12,700"),
    ],
)
def test_render_keeps_the_written_precision(number, like, expected):
    assert quoted_numbers.render(number, like) == expected


def test_dashboards_md_quotes_numbers_only_with_a_source():
    text = (DOCS / "dashboards.md").read_text()
    markers = quoted_numbers.QUOTED.findall(text)
    assert len(markers) >= 20
    for _, source in markers:
        assert source in ("passes",) or source.startswith("alerts:") or quoted_numbers.SOURCE.match(source)
