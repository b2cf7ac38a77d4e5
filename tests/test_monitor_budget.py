"""HessianMonitor's budget mode (no schedule): tiers planned within a time budget, in real Trainer runs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from _lightning import assert_same_training, fit
from lightning.pytorch.callbacks import TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_hessian import HessianMonitor, tags
from lightning_hessian.alerts import ThresholdRule

QUIET = dict(figures=False, theory=False)


def block_names(monitor: HessianMonitor) -> list[str]:
    return list(monitor.tracker.latest.blocks)


def measured_steps(monitor: HessianMonitor, tag: str) -> list[int]:
    return [r.step for r in monitor.history if tag in r.scalars]


def test_every_tier_runs_and_every_block_is_measured_within_the_budget(tmp_path):
    torch.set_num_threads(1)
    monitor = HessianMonitor(budget=0.9, **QUIET)
    trainer, _ = fit(tmp_path, [monitor], max_steps=500, logger="tb")
    planner = monitor.tracker.planner
    assert measured_steps(monitor, tags.UPDATE_CURVATURE), "the cheap tier never ran"
    assert measured_steps(monitor, tags.SHARPNESS), "the whole-model tier never ran"
    assert monitor.tracker.rotations >= 1, "no full rotation over the blocks"
    for name in block_names(monitor):
        assert measured_steps(monitor, tags.block_tag(name, "top_eigenvalue")), name
    # Planned, not skipped: the cheap tier comes more often than the whole model.
    assert len(measured_steps(monitor, tags.UPDATE_CURVATURE)) > len(measured_steps(monitor, tags.SHARPNESS))
    # Its own cost is logged and stays near the budget (one measurement's overshoot at most).
    overhead = monitor.history[-1].scalars[tags.MONITOR_OVERHEAD]
    assert overhead == pytest.approx(planner.overhead, rel=0.2)
    assert overhead < 0.9 * 1.5
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    for tag in (tags.MONITOR_OVERHEAD, tags.UPDATE_CURVATURE, tags.SHARPNESS, tags.MONITOR_ROTATION):
        assert tag in events.Tags()["scalars"], tag
    # The run's HTML report is written at the end, with the tiers' charts.
    page = (Path(trainer.logger.log_dir) / "curvature_report.html").read_text()
    assert "Curvature along the update" in page and "Monitor time / training time" in page


def test_no_html_report_on_request(tmp_path):
    trainer, _ = fit(tmp_path, [HessianMonitor(every_n_steps=2, html_report=False, **QUIET)], max_steps=2)
    assert not (Path(trainer.logger.log_dir) / "curvature_report.html").exists()


def test_budget_mode_leaves_training_bitwise_alone(tmp_path):
    plain = fit(tmp_path / "plain", max_steps=150)
    monitor = HessianMonitor(budget=0.9, stabilization=2, **QUIET)  # the opt-in stabilisation criterion too
    watched = fit(tmp_path / "watched", [monitor], max_steps=150)
    for tag in (tags.UPDATE_CURVATURE, tags.SHARPNESS, tags.block_tag("layer.self_attn.q", "top_eigenvalue")):
        assert measured_steps(monitor, tag), tag
    assert_same_training(plain, watched)
    # k = the training samples seen: 8 per batch, counted before the step's measurement
    live = [r for r in monitor.history if tags.STABILIZATION_CRITERION in r.scalars]
    assert live and all(r.scalars[tags.STABILIZATION_SAMPLES] == 8 * r.step for r in live)
    assert monitor.tracker.samples_seen == 8 * 150


def test_stabilization_is_a_budget_mode_tier():
    with pytest.raises(ValueError, match="budget="):
        HessianMonitor(every_n_steps=10, stabilization=2)


def test_a_run_too_short_for_its_budget_says_so_early(tmp_path):
    with pytest.warns(UserWarning, match="too short for the tier") as record:
        fit(tmp_path, [HessianMonitor(**QUIET)], max_steps=12)
    note = next(str(w.message) for w in record if "too short" in str(w.message))
    assert "budget=0.05" in note and "at_end=True" in note


def test_a_final_full_pass_on_request(tmp_path):
    monitor = HessianMonitor(at_end=True, **QUIET)
    fit(tmp_path, [monitor], max_steps=6)
    last = monitor.history[-1]
    assert last.step == 6 and tags.block_tag("model", "top_eigenvalue") in last.scalars
    assert any(t.endswith("self_attn.q/top_eigenvalue") for t in last.scalars)


def test_tiers_choose_what_is_measured(tmp_path):
    monitor = HessianMonitor(budget=0.9, tiers=["update"], **QUIET)
    fit(tmp_path, [monitor], max_steps=40)
    assert measured_steps(monitor, tags.UPDATE_CURVATURE)
    assert not measured_steps(monitor, tags.SHARPNESS)
    assert not any(tags.parse_block_tag(t) for r in monitor.history for t in r.scalars)


def test_info_alerts_go_to_the_log_and_warnings_to_the_console(tmp_path, caplog):
    rules = [
        ThresholdRule("info_rule", tags.PASS_SECONDS, above=0.0, severity="info"),
        ThresholdRule("warning_rule", tags.PASS_SECONDS, above=0.0, severity="warning"),
    ]
    monitor = HessianMonitor(every_n_steps=2, alerts=rules, at_end=False, **QUIET)
    with caplog.at_level(logging.INFO, logger="lightning_hessian"):
        with pytest.warns(UserWarning) as record:
            fit(tmp_path, [monitor], max_steps=4)
    console = [str(w.message) for w in record if "HessianMonitor [" in str(w.message)]
    assert console and all("warning_rule" in line for line in console)
    assert any("info_rule" in r.getMessage() for r in caplog.records)
    assert not any("info_rule" in line for line in console)


def test_a_pass_says_what_it_does_in_the_progress_bar(tmp_path):
    seen: list[str] = []
    bar = TQDMProgressBar()

    def loss_fn(module, batch):
        seen.append(str(bar.train_progress_bar.postfix))
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1])

    monitor = HessianMonitor(every_n_steps=3, at_end=False, loss_fn=loss_fn, **QUIET)
    fit(tmp_path, [monitor, bar], max_steps=3, enable_progress_bar=True)
    assert any("HessianMonitor: full pass" in text for text in seen)


def test_budget_and_schedule_arguments_are_not_mixed():
    with pytest.raises(ValueError, match="budget= plans"):
        HessianMonitor(every_n_steps=10, budget=0.1)
    with pytest.raises(ValueError, match="max_overhead"):
        HessianMonitor(max_overhead=0.1)
    with pytest.raises(ValueError, match="tiers"):
        HessianMonitor(tiers=["nope"])
    with pytest.raises(ValueError, match="budget must be"):
        HessianMonitor(budget=2.0)
    with pytest.raises(ValueError, match="console"):
        HessianMonitor(console="loud")


def test_the_plan_survives_a_checkpoint(tmp_path):
    monitor = HessianMonitor(budget=0.5, **QUIET)
    fit(tmp_path, [monitor], max_steps=30)
    state = monitor.state_dict()
    restored = HessianMonitor(budget=0.5, **QUIET)
    restored.load_state_dict(state)
    assert restored.tracker.planner.spent == monitor.tracker.planner.spent
    assert restored.tracker.rotations == monitor.tracker.rotations
    assert math.isfinite(restored.tracker.planner.training_seconds)
