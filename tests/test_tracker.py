"""CurvatureTracker in a plain PyTorch loop: tiers within a budget, training bitwise unchanged."""

from __future__ import annotations

import pytest
import torch
from _models import loss_fn, make_batch, make_model

from lightning_hessian import CurvatureTracker, tags


def train(steps: int, tracker: CurvatureTracker | None) -> tuple[torch.nn.Module, list]:
    """nanoGPT with AdamW on a fixed stream of batches; the tracker, if any, measures on one batch."""
    model = make_model("nanogpt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curvature_batch = make_batch("nanogpt", seed=99)
    found = []
    torch.manual_seed(0)
    for step in range(steps):
        loss = loss_fn(model, make_batch("nanogpt", seed=step))
        loss.backward()
        if tracker is not None:
            tracker.before_step(model)
        optimizer.step()
        optimizer.zero_grad()
        if tracker is not None and (
            m := tracker.after_step(model, loss_fn, curvature_batch, optimizer, samples=4)
        ):
            found.append(m)
    return model, found


def test_a_plain_loop_gets_every_tier_and_trains_bitwise_as_without():
    plain, _ = train(150, None)
    tracker = CurvatureTracker(budget=0.9, stabilization=2)  # the opt-in criterion included
    watched, found = train(150, tracker)
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    kinds = {kind for m in found for kind in m.kinds}
    assert kinds == {"update", "model", "blocks"}
    assert [m.step for m in found] == sorted({m.step for m in found})  # one measurement per step at most
    update = next(m for m in found if "update" in m.kinds)
    assert tags.UPDATE_CURVATURE in update.scalars and tags.THRESHOLD in update.scalars
    model = next(m for m in found if "model" in m.kinds)
    assert model.scalars[tags.SHARPNESS] > 0 and tags.SHARPNESS_RATIO in model.scalars
    assert tracker.latest.full is not None
    assert tracker.planner.steps == 149 and 0 < tracker.planner.overhead
    # [KG]'s criterion at every other whole-model measurement, against the samples seen (4 per step)
    live = [m for m in found if tags.STABILIZATION_CRITERION in m.scalars]
    assert len(live) == (len([m for m in found if "model" in m.kinds]) + 1) // 2
    first = live[0].scalars
    assert first[tags.STABILIZATION_SAMPLES] == 4 * live[0].step
    assert first[tags.STABILIZATION_REFERENCE] == first[tags.STABILIZATION_CRITERION]
    k = first[tags.STABILIZATION_SAMPLES]
    assert first[tags.STABILIZATION_CRITERION] == pytest.approx(
        first[tags.STABILIZATION_VARIANCE] / (k * (k + 1))
    )
    assert tracker.state_dict()["samples_seen"] == 600
    assert tracker.expected_tags() >= {t for t in first if t.startswith("stabilization/")}


def test_before_step_keeps_the_weights_only_when_the_update_is_measured():
    model = make_model("nanogpt")
    tracker = CurvatureTracker(budget=0.05)
    assert tracker.before_step(model) == []  # no step time yet: nothing planned, nothing kept
    assert tracker._snapshot is None
    assert tracker.after_step(model, loss_fn, make_batch("nanogpt")) is None


def test_unknown_tiers_are_refused():
    with pytest.raises(ValueError, match="unknown tier"):
        CurvatureTracker(shares={"everything": 1.0})


def test_whole_model_measurements_add_the_block_rayleigh_quotients_on_their_turn(monkeypatch):
    import lightning_hessian.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "RAYLEIGH_EVERY", 1)  # every whole-model measurement
    _, found = train(150, CurvatureTracker(budget=0.9))
    model = [m for m in found if "model" in m.kinds]
    assert model and all(any(t.endswith("/top_rayleigh") for t in m.scalars) for m in model)
    monkeypatch.setattr(tracker_module, "RAYLEIGH_EVERY", 10**6)  # never
    _, found = train(150, CurvatureTracker(budget=0.9))
    assert not any(t.endswith("/top_rayleigh") for m in found for t in m.scalars)


def test_a_fabric_loop_trains_bitwise_as_without():
    """The same guarantee through Lightning Fabric (the tracker measures the module Fabric wraps)."""
    from lightning.fabric import Fabric

    def fabric_train(tracker: CurvatureTracker | None) -> torch.nn.Module:
        fabric = Fabric(accelerator="cpu", devices=1)
        model = make_model("nanogpt")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model, optimizer = fabric.setup(model, optimizer)
        curvature_batch = make_batch("nanogpt", seed=99)
        torch.manual_seed(0)
        for step in range(150):
            fabric.backward(loss_fn(model, make_batch("nanogpt", seed=step)))
            if tracker is not None:
                tracker.before_step(model.module)
            optimizer.step()
            optimizer.zero_grad()
            if tracker is not None:
                tracker.after_step(model.module, loss_fn, curvature_batch, optimizer)
        return model.module

    tracker = CurvatureTracker(budget=0.9)
    plain, watched = fabric_train(None), fabric_train(tracker)
    assert {"update", "model"} <= {k for k, v in tracker.planner.spent.items() if v > 0}
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_resumed_loop_continues_its_steps_and_its_budget():
    model = make_model("nanogpt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = make_batch("nanogpt", seed=99)

    def run(tracker: CurvatureTracker, steps: int) -> list:
        found = []
        for step in range(steps):
            loss_fn(model, make_batch("nanogpt", seed=step)).backward()
            tracker.before_step(model)
            optimizer.step()
            optimizer.zero_grad()
            if (m := tracker.after_step(model, loss_fn, batch, optimizer)) is not None:
                found.append(m)
        return found

    first = CurvatureTracker(budget=0.9)
    run(first, 60)
    resumed = CurvatureTracker(budget=0.9)
    resumed.load_state_dict(first.state_dict())
    later = run(resumed, 60)
    assert later and all(m.step > 60 for m in later)  # the step axis goes on
    assert resumed.planner.steps == 119
    # the training time before the checkpoint still counts: the credit was not reset to zero
    assert resumed.planner.training_seconds > first.planner.training_seconds
