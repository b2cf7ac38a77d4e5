"""The scaling experiment (``experiments/repro_scaling.py``): its fits, measurement, data and report.

The statistics are checked in float64 against direct computations, the per-kind measurement against dense
Hessians from ``torch.func``, the report's verdicts against synthetic results with known slopes; the whole
``--quick`` run once (marked slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _dense import dense_hessian
from _scripts import importing_from
from scipy import stats
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import find_blocks

with importing_from("experiments"):
    import repro_scaling
    import scaling_families
    import scaling_fits
    import scaling_report

# Importing the examples (for their models) imports Lightning, whose dependencies warn about torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


# --- fits ---------------------------------------------------------------------------------------------------


def test_loglog_slope_recovers_a_power_law_and_matches_polyfit():
    x = np.array([32.0, 64.0, 128.0])
    assert scaling_fits.loglog_slope(x, 3.0 * x**1.7) == pytest.approx(1.7, abs=1e-12)
    rng = np.random.default_rng(0)
    y = np.exp(rng.normal(size=3)) * x**-0.4
    assert scaling_fits.loglog_slope(x, y) == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], abs=1e-12)


def test_fit_slopes_gives_the_student_t_interval_of_the_per_seed_slopes():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    rng = np.random.default_rng(1)
    values = np.exp(rng.normal(scale=0.3, size=(5, 4))) * x**0.8
    fit = scaling_fits.fit_slopes(x, values)
    slopes = np.array([np.polyfit(np.log(x), np.log(v), 1)[0] for v in values])
    low, high = stats.t.interval(0.95, len(slopes) - 1, loc=slopes.mean(), scale=stats.sem(slopes))
    np.testing.assert_allclose(fit.per_seed, slopes, rtol=1e-12)
    assert (fit.mean, fit.low, fit.high) == pytest.approx((slopes.mean(), low, high), rel=1e-12)


@pytest.mark.parametrize(
    ("exponents", "verdict"),
    [
        ((1.0, 1.1, 0.9), "grows"),
        ((-1.0, -1.2, -0.8), "shrinks"),
        ((1.0, -1.0, 0.2), "no trend detected"),
        ((-0.3, 0.0, -0.2), "no trend detected"),  # the interval just reaches above 0
        ((0.03, 0.01, 0.02), "flat"),  # grows, but by a negligible amount
        ((-0.03, -0.01, -0.02), "flat"),
    ],
)
def test_verdicts_follow_the_interval(exponents, verdict):
    x = np.array([1.0, 2.0, 4.0])
    fit = scaling_fits.fit_slopes(x, np.array([x**e for e in exponents]))
    assert fit.verdict == verdict
    if verdict != "flat":
        assert (fit.low > 0 or fit.high < 0) == (verdict != "no trend detected")
    assert (max(abs(fit.low), abs(fit.high)) < scaling_fits.FLAT) == (verdict == "flat")


def test_one_seed_has_no_interval_and_bad_input_says_what_to_do():
    x = np.array([1.0, 2.0])
    assert scaling_fits.fit_slopes(x, x[None] ** 2).verdict == "one seed: no interval"
    with pytest.raises(ValueError, match="positive, finite"):
        scaling_fits.loglog_slope(x, np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="two distinct"):
        scaling_fits.loglog_slope(np.array([2.0, 2.0]), np.array([1.0, 3.0]))


def test_fit_magnitude_keeps_the_sign_and_refuses_sign_changes():
    x = np.array([1.0, 2.0, 4.0])
    negative = -np.array([x**2, 1.1 * x**2])
    fit = scaling_fits.fit_magnitude(x, negative)
    assert fit.sign == -1 and fit.mean == pytest.approx(2.0, abs=1e-12) and "−y" in fit.text()
    assert scaling_fits.fit_magnitude(x, -negative).sign == 1
    assert scaling_fits.fit_magnitude(x, np.array([[1.0, -1.0, 2.0]])) is None


# --- measurement --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_family():
    return scaling_families.DigitsViT()


def test_measure_matches_dense_hessians_per_kind_and_layer(vit_family):
    torch.manual_seed(0)
    model = vit_family.example.ViT(patch=4, dim=4, depth=2, heads=2).double()
    images, labels = vit_family.train
    batch = (images[:6].double(), labels[:6])
    grid = repro_scaling.Grid(tol=1e-10, max_iter=200, trace_matvecs=3 * 48)  # Hutch++ exact: blocks <= 48
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = repro_scaling.measure(model, vit_family.loss_fn, batch, grid, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched

    top = {k: np.full(2, -np.inf) for k in repro_scaling.KINDS}
    trace = {k: np.zeros(2) for k in repro_scaling.KINDS}
    for block in find_blocks(model, example=batch, loss_fn=vit_family.loss_fn):
        if block.kind not in repro_scaling.KINDS or block.layer is None:
            continue
        with sdpa_kernel(SDPBackend.MATH):  # torch.func's forward-over-reverse needs the math kernel
            h = dense_hessian(model, vit_family.loss_fn, batch, block)
        top[block.kind][block.layer] = max(top[block.kind][block.layer], float(torch.linalg.eigvalsh(h)[-1]))
        trace[block.kind][block.layer] += float(h.diagonal().sum())
    for kind in repro_scaling.KINDS:
        np.testing.assert_allclose(got.top[kind], top[kind], rtol=1e-8, err_msg=kind)
        np.testing.assert_allclose(got.trace[kind], trace[kind], rtol=1e-8, atol=1e-12, err_msg=kind)
    # over layers: the largest λ_max, the summed trace
    assert got.overall("norm", "top") == pytest.approx(top["norm"].max(), rel=1e-8)
    assert got.overall("all", "trace") == pytest.approx(sum(t.sum() for t in trace.values()), rel=1e-8)
    assert got.params["norm"] == 2 * 2 * 8  # two LayerNorms (weight and bias of 4) per layer


# --- data ---------------------------------------------------------------------------------------------------


def test_vit_subsets_are_nested_and_hold_the_curvature_batch(vit_family):
    small, large = (vit_family.training_set(f, seed=3) for f in (1 / 8, 1 / 2))
    assert vit_family.size(small) == round(1500 / 8) and vit_family.size(large) == 750
    assert torch.equal(large[0][: len(small[0])], small[0])
    batch = vit_family.curvature_batch(3, 1 / 8, 64)
    assert torch.equal(batch[0], small[0][:64])
    assert not torch.equal(vit_family.curvature_batch(4, 1 / 8, 64)[0], batch[0])  # the seed draws it
    with pytest.raises(ValueError, match="does not fit"):
        vit_family.curvature_batch(3, 1 / 64, 64)


def test_gpt_curvature_windows_lie_in_the_smallest_subset():
    family = scaling_families.CharGPT()
    smallest = family.training_set(1 / 8, seed=1)
    assert family.size(family.training_set(1.0, seed=1)) == family.chunks.numel()
    x, y = family.curvature_batch(1, 1 / 8, 16)
    assert x.shape == (16, family.context) and torch.equal(x[:, 1:], y[:, :-1])
    text = ["".join(map(chr, row.tolist())) for row in smallest]  # windows are substrings of its chunks
    for row in torch.cat([x, y[:, -1:]], dim=1):
        assert any("".join(map(chr, row.tolist())) in chunk for chunk in text)


def test_grid_shares_the_base_configuration_between_axes():
    grid = repro_scaling.Grid()
    assert len(grid.configs()) == 3 + 2 + 3  # base, two widths, two depths, three smaller data sets
    assert all(grid.axis(a)[i] == (32, 2, 1.0) for a, i in (("width", 0), ("depth", 1), ("data", 3)))
    with pytest.raises(ValueError, match="axis must be"):
        grid.axis("heads")


# --- report on synthetic results ----------------------------------------------------------------------------


def _synthetic(width_exponent: float, noise: float) -> repro_scaling.ScalingResult:
    """Every kind's λ_max ~ width**width_exponent (times seed noise); flat in depth and data; traces > 0."""
    grid = repro_scaling.Grid(
        widths=(8, 16, 32), depths=(1, 2), fractions=(0.5, 1.0), base_width=8, seeds=(0, 1, 2)
    )
    rng = np.random.default_rng(0)
    runs = []
    for seed in grid.seeds:
        for width, depth, fraction in grid.configs():
            scale = width**width_exponent * np.exp(noise * rng.normal())

            def curvature(factor: float, depth=depth, scale=scale, width=width) -> repro_scaling.Curvature:
                top = {
                    k: np.full(depth, factor * scale * (2.0 if k == "value" else 1.0))
                    for k in repro_scaling.KINDS
                }
                trace = {k: np.full(depth, 10 * factor * scale) for k in repro_scaling.KINDS}
                return repro_scaling.Curvature(
                    top, trace, dict.fromkeys(repro_scaling.KINDS, width**2), 1.0, 0
                )

            runs.append(
                repro_scaling.Run(
                    width,
                    depth,
                    fraction,
                    seed,
                    int(1000 * fraction),
                    curvature(1.0),
                    curvature(3.0),
                    0.5,
                    0.9,
                    1.0,
                    1.0,
                )
            )
    return repro_scaling.ScalingResult(grid, {"vit": runs}, {"vit": 1.0}, {"vit": 1.0})


def test_report_verdicts_follow_the_fits():
    result = _synthetic(width_exponent=1.0, noise=0.01)
    fit = result.slope("vit", "width", "trained", "all", "top")
    assert fit.mean == pytest.approx(1.0, abs=0.05) and fit.verdict == "grows"
    groups = scaling_report.verdicts(result, "vit", "trained")
    assert groups["width"] == {"grows": [*repro_scaling.KINDS, "all"]}
    assert "data" not in scaling_report.verdicts(result, "vit", "init")  # one model at initialisation
    assert (
        scaling_report.value_dominance(result, "vit", "init")
        == (sum(r.depth for r in result.runs["vit"]),) * 3
    )
    text = scaling_report.section(result, 1.0, "cmd")
    assert "0 (one model)" in text and "↑" in text and text.endswith(scaling_report.END + "\n")
    rho, _, n = scaling_report.loss_correlation(result, "vit")  # every training loss is equal: no ranking
    assert n == len(result.runs["vit"]) and np.isnan(rho)
    for rank, run in enumerate(sorted(result.runs["vit"], key=lambda r: r.trained.overall("all", "top"))):
        run.train_loss = float(-rank)  # loss falls as λ_max grows
    assert scaling_report.loss_correlation(result, "vit")[0] == pytest.approx(-1.0)
    flat = _synthetic(width_exponent=0.0, noise=0.5)
    assert scaling_report.verdicts(flat, "vit", "trained")["width"].get("grows") is None


def test_write_section_replaces_only_its_own_section(tmp_path):
    report = tmp_path / "reproduction.md"
    older = scaling_report.HEADING.replace("## 8.", "## 5.")  # written before other sections came first
    report.write_text(f"# Page\n\n## 6. Other\n\n{older}\nOLD\n{scaling_report.END}\n\n## 9. Next\n")
    new = f"{scaling_report.HEADING}\n\n{scaling_report.BEGIN}\nNEW\n{scaling_report.END}\n"
    scaling_report.write_section(new, report)
    assert report.read_text() == f"# Page\n\n## 6. Other\n\n{new}\n## 9. Next\n"
    scaling_report.write_section(new, tmp_path / "fresh.md")  # a new results folder: the section alone
    assert (tmp_path / "fresh.md").read_text() == new


# --- the whole quick run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_writes_report_figures_and_numbers(tmp_path):
    repro_scaling.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "reproduction.md").read_text()
    assert "| axis | kind |" in text and "[O] Fig. 1" in text and "Thm 7" in text
    for family in ("vit", "gpt"):
        assert (tmp_path / "images" / f"repro_scaling_{family}.png").stat().st_size > 10_000
    import json

    raw = json.loads((tmp_path / "scaling.json").read_text())
    for family, runs in raw.items():
        assert len(runs) == len(repro_scaling.QUICK.configs()) * len(repro_scaling.QUICK.seeds)
        base = [r for r in runs if (r["width"], r["depth"]) == (16, 1) and r["seed"] == 0]
        assert len({json.dumps(r["init"]) for r in base}) == 1  # the data axis shares its initial model
        assert len({json.dumps(r["trained"]) for r in base}) == len(base)  # and trains differently
        for r in runs:
            assert r["trained"]["loss"] < r["init"]["loss"], (family, r["width"], r["depth"], r["fraction"])
