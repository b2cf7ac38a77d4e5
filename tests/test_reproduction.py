"""The paper-reproduction experiments (``experiments/``): the qualitative claims that must hold robustly.

The attention-scaling and Theorem 7 experiments run in their ``--quick`` form (a second or two each); the
whole ``--quick`` pipeline, with the ViT, the figures and the report, runs once (marked slow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _scripts import ROOT, importing_from

EXPERIMENTS = ROOT / "experiments"
with importing_from("experiments"):
    import repro_attention
    import repro_block_bound
    import repro_layernorm
    import repro_live_bounds
    import repro_stabilization
    import repro_theorem7
    import reproduce_papers

# Importing the example (for its ViT) imports Lightning, whose dependencies warn about torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


@pytest.fixture(scope="module")
def attention():
    res = repro_attention.run(quick=True)
    return res, repro_attention.summary(res)


def test_attention_small_scale_slopes_match_the_formulas(attention):
    _, summ = attention
    for key, row in summ["slopes"].items():
        for norm in ("fro", "spec"):
            assert abs(row[norm]["small_mean"] - row["expected"]) < 0.15, (key, norm, row[norm])
    # the two headline exponents, per draw
    assert abs(summ["slopes"][("V", "V", "total")]["fro"]["small_mean"] - 2) < 0.15
    assert abs(summ["slopes"][("Q", "Q", "outer")]["fro"]["small_mean"] - 6) < 0.15


def test_value_dominates_query_at_small_scale_and_is_overtaken(attention):
    res, summ = attention
    assert res.scales[0] == pytest.approx(0.01)
    assert np.all(summ["ratio_at_0.01"] > 1e4)  # ||H(V,V)|| / ||H(Q,Q)|| at s = 0.01, every draw
    cross = summ["crossover"]
    assert np.all(np.isfinite(cross)) and np.all((cross > 0.1) & (cross < 10))


def test_attention_blocks_agree_with_autograd(attention):
    res, _ = attention
    for name in ("matvec_vs_autograd", "dense_vs_autograd", "outer_vs_gauss_newton"):
        assert res.check[name] < 1e-10, (name, res.check[name])


@pytest.fixture(scope="module")
def theorem7():
    return repro_theorem7.run(quick=True)


def test_theorem7_bound_holds_at_every_k_away_from_the_optimum(theorem7):
    res = theorem7
    assert res.grad_norm < 1e-6  # w* is the full-data minimiser
    assert any(r > 0 for r in res.radii)
    for r in res.radii:
        assert res.worst_ratio[r] <= 1.0, (r, res.worst_ratio[r])  # max over k and data orders
        assert np.all(res.observed_max[r] <= res.bound[r])
        assert abs(repro_theorem7.loglog_slope(res.k, res.observed[r]) + 1) < 0.1


def test_theorem7_at_the_optimum_is_the_trivial_identity(theorem7):
    # at w = w* the observed difference is exactly the value term: nothing about curvature is tested there
    terms = theorem7.terms[0.0]
    np.testing.assert_allclose(theorem7.observed[0.0], terms["value"], rtol=1e-12, atol=1e-15)
    assert np.all(terms["curvature"] == 0) and np.all(terms["gradient"] == 0)
    # away from it the curvature term is present and grows with the radius
    r_small, r_large = theorem7.radii[1], theorem7.radii[-1]
    assert np.all(theorem7.terms[r_large]["curvature"][:100] > theorem7.terms[r_small]["curvature"][:100])


def test_layernorm_placement_and_temperature_change_the_growth_as_derived():
    """Pre-LN removes the scale (slopes ~0), post-LN leaves H(Q,Q) ~ s^4 and H(V,V) ~ s^0, no LayerNorm
    gives the s^5 / s^2 of [O]; a temperature 4x larger makes V/Q at small s 16x larger (τ^2)."""
    res = repro_layernorm.run(draws=1, n_scales=4)  # scales 0.01, 0.1, 1, 10: two in the small window
    assert np.allclose(repro_layernorm.slopes(res, ("none", 1.0), "Q"), 5, atol=0.1)
    assert np.allclose(repro_layernorm.slopes(res, ("none", 1.0), "V"), 2, atol=0.05)
    for block in "QV":
        assert np.all(np.abs(repro_layernorm.slopes(res, ("pre", 1.0), block)) < 0.3)
    assert np.allclose(repro_layernorm.slopes(res, ("post", 1.0), "Q"), 4, atol=0.5)
    assert np.all(np.abs(repro_layernorm.slopes(res, ("post", 1.0), "V")) < 0.5)
    base = repro_layernorm.ratio_at_smallest(res, ("none", 1.0))
    assert np.allclose(repro_layernorm.ratio_at_smallest(res, ("none", 4.0)) / base, 16, rtol=0.05)
    assert np.allclose(repro_layernorm.ratio_at_smallest(res, ("none", 0.25)) / base, 1 / 16, rtol=0.05)
    assert np.all(repro_layernorm.ratio_at_smallest(res, ("pre", 1.0)) < 1e-3 * base)


def test_corrected_bound_holds_during_training_in_the_papers_setting():
    res = repro_live_bounds.run(quick=True)
    summ = repro_live_bounds.summary(res)
    assert summ["proven_every_pass"] and len(res.steps) >= 5
    for n in repro_live_bounds.NAMES:
        assert 0 < summ[n]["min_corrected_ratio"] <= summ[n]["max_corrected_ratio"] <= 1, (n, summ[n])
    assert 0.3 < summ["V"]["max_corrected_ratio"]  # the value bound is nearly tight
    assert res.loss[-1] < 0.5 * res.loss[0]  # it trained
    assert max(res.peak) > 1.5 / res.seq_len  # attention left the uniform regime the paper's bound assumes


@pytest.mark.slow
def test_full_block_bound_holds_during_training_at_realistic_size():
    res = repro_block_bound.run(quick=True)
    summ = repro_block_bound.summary(res)
    assert summ["proven_every_pass"] and len(res.steps) >= 3
    assert 0 < summ["min_ratio"] <= summ["max_ratio"] <= 1
    assert res.loss[-1] < res.loss[0]  # it trained
    assert "holds at every pass" in repro_block_bound.section(res, summ, 0.0)


def test_quick_run_writes_outside_the_tracked_files(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(reproduce_papers, "reproduce", lambda quick, out: calls.append((quick, Path(out))))
    reproduce_papers.main(["--quick"])
    reproduce_papers.main([])
    reproduce_papers.main(["--quick", "--out", str(tmp_path)])
    (quick, out), full, chosen = calls
    root = EXPERIMENTS.parent
    assert quick and out.is_dir() and not out.resolve().is_relative_to(root)  # a fresh temporary folder
    out.rmdir()
    assert full == (False, root / "docs") and chosen == (True, tmp_path)


@pytest.mark.slow
def test_quick_pipeline_writes_report_and_figures(tmp_path):
    out = reproduce_papers.reproduce(quick=True, out=tmp_path / "docs")
    assert out["report"].is_file()
    text = out["report"].read_text()
    headings = (
        "## 1. [O]",
        "## 2.",
        "## 3. [P] Theorem 7",
        "## 4. [P] Theorem 1 during training",
        "## 5.",
        "## 6. [KG]",
        "## 7. [P] Theorems 5-6",
        "## 8. Per-block curvature",
    )
    for heading in headings:
        assert heading in text
    assert "holds at every k, order and radius" in text
    assert "holds at every pass" in text
    # The claims issue 15 found overstated are stated with their caveats.
    assert "agree, trivially" in text and "Not [P]'s experiment" in text
    assert "released data, 20 repeats" in text and "Value and key blocks dominate" in text
    vit = out["vit"]
    assert set(vit.gn_min_init) == set(vit.init.blocks) and set(vit.gn_min_trained) == set(vit.trained.blocks)
    assert "with PSD (Lanczos tolerance" in text
    for fig in out["figures"]:
        assert fig.is_file() and fig.name.startswith("repro_") and fig.stat().st_size > 10_000
    # ViT: the value block dominates the query and key blocks of every layer at initialisation ([O] Fig. 1)
    for ratio_q, ratio_k in reproduce_papers.repro_vit.value_query_ratios(out["vit"].init).values():
        assert ratio_q > 1 and ratio_k > 1
    assert out["vit"].test_accuracy > out["vit"].init_accuracy + 0.3  # it did train
    # Scaling: every family and configuration measured, and the verdicts come with their intervals.
    assert set(out["scaling"].runs) == {"vit", "gpt"} and "| axis | kind |" in text
    assert "no trend detected" in text or "grows" in text or "shrinks" in text


@pytest.mark.slow
def test_stabilization_closed_form_matches_monte_carlo_and_writes_its_section(tmp_path):
    res = repro_stabilization.run(quick=True)
    for d in res.dims:  # in the local regime the closed form is the probe average of the true losses
        mean, err = res.monte_carlo[d, res.sigma]
        assert abs(res.closed[d, res.sigma] - mean) <= 4 * err + 0.05 * mean, d
    assert abs(res.slope_closed + 2) < 0.3 and abs(res.slope_mc + 2) < 0.3
    assert len(res.live_k) >= 5 and res.live_k == sorted(res.live_k)
    report = tmp_path / "reproduction.md"
    report.write_text("# Page\n\n## 6. [KG] OLD-SECTION\n" + repro_stabilization.END + "\n\n## 7. Next\n")
    repro_stabilization.write_section(repro_stabilization.section(res, 1.0, "cmd"), report)
    text = report.read_text()
    assert text.count("## 6. [KG]") == 1 and "OLD-SECTION" not in text
    assert text.endswith(repro_stabilization.END + "\n\n## 7. Next\n")
    assert "agree in the local regime" in text
