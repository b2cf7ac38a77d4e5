r"""A time budget for the monitor: what to measure when, so that curvature costs a fixed share of training.

The monitor's measurements come in kinds (tiers) of very different cost: a few forwards along the update
(``"update"``), a warm-started whole-model eigenvalue (``"model"``), an exact per-block Lanczos pass over a
group of blocks (``"blocks"``). :class:`BudgetPlanner` gives each kind a share :math:`s_k` of the budget
:math:`b` (a fraction of the training time :math:`T`) and keeps a credit per kind,

.. math::

    c_k = s_k \, b \, T - \text{seconds spent on kind } k,

and a kind is due when its credit covers what its next measurement is expected to cost. Expected costs are
measured, not assumed: the median of the kind's last few measurements (per group for the deep tier, whose
groups differ in cost: an earlier layer's pruned products run through every later layer); before the first
one, a prior in training steps times the measured seconds per training step. So the total time spent stays
within :math:`b \, T` plus at most one measurement's overshoot per kind, on any model and machine, and
cheap kinds come often while expensive ones come rarely: the budget is met by planning, never by skipping
a measurement half-way.

The planner only counts seconds; it knows nothing of Lightning or models (see
:class:`~lightning_hessian.tracker.CurvatureTracker`, which runs the measurements it plans).
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Mapping
from typing import Any

__all__ = ["BudgetPlanner"]

_HISTORY = 5  # measurements per kind (or group) whose median is the expected cost


class BudgetPlanner:
    """Credits per kind of measurement out of a fraction of the training time.

    Args:
        budget: the fraction of training time all measurements together may take, e.g. ``0.05``.
        shares: kind -> share of the budget (normalised to sum 1; kinds with share 0 never run).
        prior_steps: kind -> cost of a first measurement in training steps, used until one is measured.
    """

    def __init__(self, budget: float, shares: Mapping[str, float], prior_steps: Mapping[str, float]) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget < 1:
            raise ValueError(
                f"budget must be a fraction of training time in (0, 1), e.g. 0.05; got {budget!r}."
            )
        if not shares or any(not isinstance(s, int | float) or s < 0 for s in shares.values()):
            raise ValueError(f"shares must map kinds to non-negative numbers, got {shares!r}.")
        total = sum(shares.values())
        if total <= 0:
            raise ValueError("shares: at least one kind needs a positive share.")
        self.budget = float(budget)
        self.shares = {k: float(s) / total for k, s in shares.items()}
        self.prior_steps = dict(prior_steps)
        self.training_seconds = 0.0
        self.steps = 0
        self.spent = dict.fromkeys(self.shares, 0.0)
        self._costs: dict[tuple[str, Hashable], list[float]] = {}

    # --- what training gives -------------------------------------------------------------------------------

    def observe(self, training_seconds: float, steps: int) -> None:
        """The training time so far (the monitor's own time excluded) and the optimizer steps taken."""
        self.training_seconds = max(float(training_seconds), 0.0)
        self.steps = int(steps)

    @property
    def step_seconds(self) -> float | None:
        """Seconds per training step so far (``None`` before the first step)."""
        return self.training_seconds / self.steps if self.steps > 0 and self.training_seconds > 0 else None

    @property
    def seconds(self) -> float:
        """Seconds spent on measurements so far."""
        return sum(self.spent.values())

    @property
    def overhead(self) -> float:
        """Measurement time over training time so far."""
        return self.seconds / self.training_seconds if self.training_seconds > 0 else 0.0

    # --- planning ------------------------------------------------------------------------------------------

    def expected(self, kind: str, group: Hashable = None) -> float | None:
        """The expected seconds of the next measurement of ``kind`` (and ``group``), ``None`` if unknown.

        A group never measured costs what the kind's measured groups cost on average, else the prior.
        """
        own = self._costs.get((kind, group))
        if own:
            return statistics.median(own)
        measured = [statistics.median(c) for (k, _), c in self._costs.items() if k == kind and c]
        if measured:
            return statistics.fmean(measured)
        if self.step_seconds is None or kind not in self.prior_steps:
            return None
        return self.prior_steps[kind] * self.step_seconds

    def credit(self, kind: str) -> float:
        """Seconds ``kind`` may still spend: its share of the budget of the training so far, less spent."""
        return self.shares.get(kind, 0.0) * self.budget * self.training_seconds - self.spent.get(kind, 0.0)

    def due(self, kind: str, group: Hashable = None) -> bool:
        """Whether ``kind``'s credit covers its next measurement (of ``group``)."""
        if self.shares.get(kind, 0.0) <= 0:
            return False
        expected = self.expected(kind, group)
        return expected is not None and self.credit(kind) >= expected

    def spend(self, kind: str, seconds: float, group: Hashable = None) -> None:
        """Book a measurement of ``kind`` (``group``) that took ``seconds``."""
        self.spent[kind] = self.spent.get(kind, 0.0) + float(seconds)
        costs = self._costs.setdefault((kind, group), [])
        costs.append(float(seconds))
        del costs[:-_HISTORY]

    def charge(self, kind: str, seconds: float) -> None:
        """Book time around a measurement of ``kind`` (logging, figures) against its credit only."""
        self.spent[kind] = self.spent.get(kind, 0.0) + float(seconds)

    def interval(self, kind: str, group: Hashable = None) -> float | None:
        """Training steps between two measurements of ``kind`` (``group``) at the budget, once known."""
        expected, per_step = self.expected(kind, group), self.step_seconds
        share = self.shares.get(kind, 0.0)
        if expected is None or per_step is None or share <= 0:
            return None
        return expected / (share * self.budget * per_step)

    # --- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "training_seconds": self.training_seconds,
            "steps": self.steps,
            "spent": dict(self.spent),
            "costs": [[kind, group, list(costs)] for (kind, group), costs in self._costs.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.training_seconds = float(state.get("training_seconds", 0.0))
        self.steps = int(state.get("steps", 0))
        self.spent = {**dict.fromkeys(self.shares, 0.0), **dict(state.get("spent", {}))}
        self._costs = {(kind, group): list(costs) for kind, group, costs in state.get("costs", [])}
