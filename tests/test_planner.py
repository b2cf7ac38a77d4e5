"""BudgetPlanner: credits out of a fraction of training time, costs from measurements, never over budget."""

from __future__ import annotations

import random

import pytest

from lightning_hessian.planner import BudgetPlanner


def _run(planner: BudgetPlanner, costs: dict, steps: int, step_seconds: float = 1.0, group_of=None) -> dict:
    """Simulate training: after every step, measure each due kind, which takes ``costs[kind](group)``."""
    counts = dict.fromkeys(costs, 0)
    for step in range(1, steps + 1):
        planner.observe(step * step_seconds, step)
        for kind, cost in costs.items():
            group = group_of(kind, counts[kind]) if group_of else None
            if planner.due(kind, group):
                planner.spend(kind, cost(group), group)
                counts[kind] += 1
    return counts


def test_total_time_stays_within_the_budget_on_any_costs():
    rng = random.Random(0)
    for _ in range(8):
        budget = rng.choice([0.01, 0.05, 0.2])
        planner = BudgetPlanner(budget, {"a": 1, "b": 2, "c": 1}, {"a": 1, "b": 10, "c": 5})
        true = {k: rng.uniform(0.1, 30) for k in "abc"}
        costs = {k: (lambda group, c=c: c * rng.uniform(0.8, 1.2)) for k, c in true.items()}
        steps = 3000
        _run(planner, costs, steps)
        # at most one measurement's overshoot per kind beyond the budget
        assert planner.seconds <= budget * steps + 1.2 * sum(true.values())
        assert planner.overhead <= budget + 1.2 * sum(true.values()) / steps


def test_cheap_kinds_come_often_and_expensive_ones_rarely_in_proportion_to_their_share():
    planner = BudgetPlanner(0.1, {"cheap": 1, "dear": 1}, {"cheap": 1, "dear": 1})
    counts = _run(planner, {"cheap": lambda g: 0.5, "dear": lambda g: 10.0}, 2000)
    # each gets 0.05 s per training second: 2000 * 0.05 / cost measurements
    assert counts["cheap"] == pytest.approx(200, rel=0.05)
    assert counts["dear"] == pytest.approx(10, abs=1)
    assert planner.interval("cheap") == pytest.approx(10)
    assert planner.interval("dear") == pytest.approx(200)


def test_first_measurement_waits_for_the_prior_cost_in_training_steps():
    planner = BudgetPlanner(0.05, {"a": 1}, {"a": 2})
    planner.observe(0.0, 0)
    assert not planner.due("a")  # no step time yet: no estimate
    planner.observe(39.0, 39)  # credit 1.95 s < 2 steps * 1 s
    assert not planner.due("a")
    planner.observe(40.0, 40)
    assert planner.due("a")
    planner.spend("a", 5.0)  # it cost more than the prior: the next waits for the measured cost
    planner.observe(141.0, 141)
    assert planner.expected("a") == 5.0 and not planner.due("a")
    planner.observe(200.0, 200)
    assert planner.due("a")


def test_groups_have_their_own_costs_and_unmeasured_groups_take_the_mean():
    planner = BudgetPlanner(0.5, {"blocks": 1}, {"blocks": 1})
    planner.observe(100.0, 100)
    planner.spend("blocks", 4.0, group=0)
    planner.spend("blocks", 1.0, group=1)
    assert planner.expected("blocks", 0) == 4.0
    assert planner.expected("blocks", 1) == 1.0
    assert planner.expected("blocks", 7) == 2.5
    # the median of the last measurements: one outlier does not move it
    for cost in (4.0, 4.0, 40.0):
        planner.spend("blocks", cost, group=0)
    assert planner.expected("blocks", 0) == 4.0


def test_a_kind_with_no_share_never_runs_and_shares_are_normalised():
    planner = BudgetPlanner(0.05, {"a": 3, "b": 0}, {"a": 1, "b": 1})
    assert planner.shares == {"a": 1.0, "b": 0.0}
    planner.observe(1000.0, 100)  # 10 s per step, credit 50 s
    assert planner.due("a") and not planner.due("b")


def test_state_dict_round_trip_continues_the_same_plan():
    planner = BudgetPlanner(0.05, {"a": 1, "b": 1}, {"a": 1, "b": 3})
    _run(planner, {"a": lambda g: 1.0, "b": lambda g: 3.0}, 500)
    restored = BudgetPlanner(0.05, {"a": 1, "b": 1}, {"a": 1, "b": 3})
    restored.load_state_dict(planner.state_dict())
    assert restored.spent == planner.spent and restored.expected("b") == planner.expected("b")
    assert [restored.due(k) for k in "ab"] == [planner.due(k) for k in "ab"]


@pytest.mark.parametrize(
    "budget, shares",
    [(0, {"a": 1}), (1, {"a": 1}), (True, {"a": 1}), (0.05, {}), (0.05, {"a": -1}), (0.05, {"a": 0})],
)
def test_bad_settings_are_refused(budget, shares):
    with pytest.raises(ValueError):
        BudgetPlanner(budget, shares, {"a": 1})
