r"""Alert rules over the history of curvature passes. Pure Python: no autograd, no torch.

Each curvature pass becomes a :class:`PassRecord`: the optimizer step and the scalars of
:mod:`lightning_hessian.tags`. An :class:`AlertManager` keeps a bounded history of them; on every new pass it
runs its enabled :class:`AlertRule` s, applies their cooldowns and returns the :class:`Alert` s that fired::

    manager = AlertManager()                          # the rules of default_rules()
    for alert in manager.update(PassRecord(step, scalars)):
        print(alert.severity, alert.message)

Built-in rules (:func:`default_rules`; every threshold is a constructor argument, the reasons for the
defaults are in each class's docstring):

- ``non_finite`` (:class:`NonFinite`, critical): a NaN or infinite scalar in the pass.
- ``stability_threshold`` (:class:`StabilityThreshold`, critical): ``λ_max / (2/lr) >= 1`` (or Adam's
  preconditioned ratio ``>= 1``); a warning from ``approach=0.9`` of the threshold.
- ``preconditioned_gradient_curvature`` (:class:`PreconditionedGradientCurvature`, warning): the curvature
  of Adam's preconditioned Hessian along the preconditioned gradient above ``2/lr`` (Bai et al.,
  arXiv:2506.04805: where loss spikes happen).
- ``progressive_sharpening`` (:class:`ProgressiveSharpening`, warning): the model's sharpness rose by a fitted
  25% or more over the last 5 passes.
- ``curvature_spike`` (:class:`CurvatureSpike`, warning): a block's ``top_eigenvalue`` above 3x the median of
  its previous (up to 5, at least 3) values.
- ``negative_curvature`` (:class:`NegativeCurvature`, info): a block's ``negative_ratio`` (-λ_min / λ_max)
  above 0.5.
- ``bound_violation`` (:class:`BoundViolation`, critical): a theory tag ``.../bound_ratio`` (measured / proven
  bound) above ``1 + 1e-6``.
- ``heterogeneity_jump`` (:class:`HeterogeneityJump`, info): the block heterogeneity above 2x the median of
  its previous values.

Rules look only at the tags a pass has (a missing tag is skipped silently) and, except :class:`NonFinite`,
ignore non-finite values: one NaN gives one alert and does not poison the medians of later passes.

Cooldowns: after a rule fires for a tag at step ``s``, the manager drops its further alerts for that tag
until step ``s + cooldown``, unless they are more severe than the one that fired (an escalation from warning
to critical is never hidden). ``cooldown=0`` reports at every pass.

Adding a rule, from simplest to most general::

    manager.rules.append(ThresholdRule("huge_attention_curvature", r"curvature/.*\.attn\..*/top_eigenvalue",
                                       above=1e4, cooldown=500))
    manager.rules.append(CallableRule("loss_of_rank", lambda history: [
        (tag, v, f"{tag} collapsed") for tag, v in history[-1].scalars.items()
        if tag.endswith("/trace") and v < 1e-8]))

    class MyRule(AlertRule):                          # the full interface
        name, severity = "my_rule", "warning"
        def check(self, history):                     # history[-1] is the new pass
            ...                                       # return [self._alert(history, "message", tag, value)]

A rule that raises does not stop training: the manager reports it once (rule ``"alerts"``, warning) and goes
on. :meth:`AlertManager.state_dict` holds the history, the fired alerts, the cooldowns and the counts as plain
JSON-ready values, so alerts continue across checkpoint/resume; the rules are configuration, not state.
"""

from __future__ import annotations

import math
import numbers
import re
import statistics
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_hessian import tags
from lightning_hessian.formatting import format_number

__all__ = [
    "SEVERITIES",
    "Alert",
    "AlertManager",
    "AlertRule",
    "BoundViolation",
    "CallableRule",
    "CurvatureSpike",
    "HeterogeneityJump",
    "NegativeCurvature",
    "NonFinite",
    "PassRecord",
    "PreconditionedGradientCurvature",
    "ProgressiveSharpening",
    "StabilityThreshold",
    "ThresholdRule",
    "as_record",
    "default_rules",
]

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class PassRecord:
    """The scalars of one curvature pass (tags of :mod:`lightning_hessian.tags`) at an optimizer step."""

    step: int
    scalars: Mapping[str, float]


@dataclass(frozen=True)
class Alert:
    """Something dangerous a rule saw in the curvature.

    Attributes:
        rule: the rule's name. severity: one of :data:`SEVERITIES`. step: the optimizer step of the pass.
        message: one sentence for a human, saying what happened and what it means.
        tag: the scalar that triggered it, if one did. value: that scalar's value.
    """

    rule: str
    severity: str
    step: int
    message: str
    tag: str | None = None
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(
            rule=self.rule,
            severity=self.severity,
            step=self.step,
            message=self.message,
            tag=self.tag,
            value=self.value,
        )


# ----------------------------------------------------------------------------------------------- helpers


def _number(value: Any) -> float | None:
    """``value`` as a float; ``None`` if it is not a number."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(scalars: Mapping[str, Any], tag: str) -> float | None:
    """The value of ``tag``; ``None`` when missing or not finite (:class:`NonFinite` reports those)."""
    value = _number(scalars.get(tag))
    return value if value is not None and math.isfinite(value) else None


def _previous(history: Sequence[PassRecord], tag: str, window: int) -> list[float]:
    """The finite values of ``tag`` in the passes before the newest: the latest ``window``, oldest first."""
    values: list[float] = []
    for i in range(len(history) - 2, -1, -1):
        if len(values) == window:
            break
        value = _finite(history[i].scalars, tag)
        if value is not None:
            values.append(value)
    return values[::-1]


def _block_tags(scalars: Mapping[str, Any], stat: str) -> Iterator[tuple[str, str]]:
    """``(block, tag)`` of every ``curvature/<block>/<stat>`` tag of a pass."""
    for tag in scalars:
        parsed = tags.parse_block_tag(tag)
        if parsed is not None and parsed[1] == stat:
            yield parsed[0], tag


def _arg(
    name: str,
    value: Any,
    low: float | None = None,
    *,
    strict: bool = False,
    integer: bool = False,
    what: str = "",
) -> Any:
    """Validate a numeric constructor argument: finite and ``>= low`` (``> low`` if ``strict``); return it."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (low is None or (value > low if strict else value >= low))):
        about = f" ({what})" if what else ""
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(
            f"{name}{about} must be {'an integer' if integer else 'a finite number'}{bound}, got {value!r}"
        )
    return value


def _one_below(severity: str) -> str:
    return SEVERITIES[max(0, SEVERITIES.index(severity) - 1)]


# ------------------------------------------------------------------------------------------------- rules


class AlertRule(ABC):
    """Base class of the alert rules: a subclass sets ``name`` / ``severity`` and implements :meth:`check`.

    Attributes:
        name: unique within a manager; the ``rule`` of its alerts. Defaults to the class attribute.
        severity: the severity of its alerts, one of :data:`SEVERITIES`. Defaults to the class attribute.
        cooldown: optimizer steps after an alert during which the manager drops this rule's further alerts for
            the same tag (unless they are more severe); 0 reports at every pass.
        enabled: whether the manager runs the rule.
    """

    name: str = ""
    severity: str = "warning"

    def __init__(
        self, name: str | None = None, severity: str | None = None, cooldown: int = 0, enabled: bool = True
    ) -> None:
        name = type(self).name if name is None else name
        severity = type(self).severity if severity is None else severity
        if not isinstance(name, str) or not name:
            raise ValueError(f"a rule needs a non-empty name: pass name='...' (got {name!r})")
        if name == "alerts":
            raise ValueError("the rule name 'alerts' is reserved for the manager's alerts: choose another")
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        self.name = name
        self.severity = severity
        self.cooldown = _arg("cooldown", cooldown, 0, integer=True, what="optimizer steps; 0 = every pass")
        self.enabled = bool(enabled)

    @abstractmethod
    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        """The alerts of the newest pass ``history[-1]`` (earlier passes give the context), without cooldowns.

        ``history`` is non-empty and oldest first; the manager applies cooldowns and ``enabled``.
        """

    def _alert(
        self,
        history: Sequence[PassRecord],
        message: str,
        tag: str | None = None,
        value: float | None = None,
        severity: str | None = None,
    ) -> Alert:
        """An alert of this rule at the newest pass's step."""
        return Alert(self.name, severity or self.severity, history[-1].step, message, tag, value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, severity={self.severity!r}, "
            f"cooldown={self.cooldown}, enabled={self.enabled})"
        )


class StabilityThreshold(AlertRule):
    """The sharpness reached (``severity``, critical) or approaches (one level lower, warning) its threshold.

    Looks at :data:`~lightning_hessian.tags.SHARPNESS_RATIO` (λ_max / (2/lr)) and
    :data:`~lightning_hessian.tags.PRECONDITIONED_RATIO` (λ_max(P⁻¹H) / ((2 + 2β1) / ((1 - β1) lr)) for Adam,
    Cohen et al., arXiv:2207.14484). A ratio >= 1 means gradient descent on the local quadratic diverges along
    the top eigenvector; ``approach <= ratio < 1`` warns first. Cohen et al. (ICLR 2021) found that full-batch
    training typically sharpens until λ_max reaches 2/lr and then hovers there ("edge of stability"), so a
    run may sit at ratio ~1 for long: give the rule a cooldown if that is expected. ``approach=0.9`` leaves
    a pass or two of warning during progressive sharpening before the crossing.

    Args:
        approach: the ratio from which to warn, in (0, 1]; 1 turns the warning off.
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "stability_threshold"
    severity = "critical"
    # ratio tag, λ_max tag, threshold tag, what λ_max is, the threshold's formula
    _CHECKS = (
        (tags.SHARPNESS_RATIO, tags.SHARPNESS, tags.THRESHOLD, "sharpness λ_max", "2/lr"),
        (
            tags.PRECONDITIONED_RATIO,
            tags.PRECONDITIONED_SHARPNESS,
            tags.PRECONDITIONED_THRESHOLD,
            "preconditioned sharpness λ_max(P⁻¹H)",
            "(2+2β1)/((1-β1)·lr)",
        ),
    )

    def __init__(self, approach: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.approach = _arg("approach", approach, 0, strict=True, what="the ratio from which to warn")
        if approach > 1:
            raise ValueError(f"approach must be <= 1 (ratios >= 1 are already critical), got {approach!r}")

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        scalars = history[-1].scalars
        alerts = []
        for ratio_tag, top_tag, threshold_tag, what, formula in self._CHECKS:
            ratio = _finite(scalars, ratio_tag)
            if ratio is None or ratio < self.approach:
                continue
            top, threshold = _finite(scalars, top_tag), _finite(scalars, threshold_tag)
            # ratio = λ_max / threshold: recover whichever of the two the pass lacks
            if top is None and threshold is not None:
                top = ratio * threshold
            if threshold is None and top is not None and ratio > 0:
                threshold = top / ratio
            figures = (
                f"{what} = {format_number(top)}, threshold {formula} = {format_number(threshold)}, "
                f"ratio {ratio:.3g}"
            )
            if ratio >= 1:
                message = (
                    f"Crossed the stability threshold ({figures}): gradient descent on the local "
                    "quadratic diverges along the top eigenvector."
                )
                alerts.append(self._alert(history, message, ratio_tag, ratio))
            else:
                message = f"Approaching the stability threshold ({figures} >= {self.approach:g})."
                alerts.append(self._alert(history, message, ratio_tag, ratio, _one_below(self.severity)))
        return alerts


def _sharpness(scalars: Mapping[str, Any]) -> tuple[str, float] | None:
    """``(tag, value)`` of the model's λ_max: ``SHARPNESS``, else ``curvature/model/top_eigenvalue``."""
    for tag in (tags.SHARPNESS, tags.block_tag("model", "top_eigenvalue")):
        value = _finite(scalars, tag)
        if value is not None:
            return tag, value
    return None


class ProgressiveSharpening(AlertRule):
    """The model's sharpness rose steadily over the last ``window`` passes (warning).

    The sharpness is :data:`~lightning_hessian.tags.SHARPNESS`, else ``curvature/model/top_eigenvalue``. The
    rule takes its latest ``window`` values (the newest pass must have one; all must be positive), fits a
    least-squares line to ``log(value)`` against the optimizer step and fires when the slope is positive and
    the fitted total relative increase over the window, ``exp(slope * (last step - first step)) - 1``, is at
    least ``min_increase``. A fit rather than "monotone non-decreasing" tolerates one noisy pass, and it
    ignores a single spike at an end point more than an end-to-end ratio would (:class:`CurvatureSpike`
    reports spikes). Progressive sharpening (Cohen et al., ICLR 2021) usually continues until λ_max reaches
    the stability threshold 2/lr, so it announces :class:`StabilityThreshold` alerts; 5 passes and 25% sit
    well above the pass-to-pass noise of a mini-batch curvature estimate.

    Args:
        window: number of passes fitted (>= 2).
        min_increase: smallest fitted relative increase that fires (0.25 = +25%).
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "progressive_sharpening"
    severity = "warning"

    def __init__(self, window: int = 5, min_increase: float = 0.25, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window = _arg("window", window, 2, integer=True, what="passes fitted")
        self.min_increase = _arg("min_increase", min_increase, 0, what="fitted relative rise, 0.25 = +25%")

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        newest = _sharpness(history[-1].scalars)
        if newest is None:
            return []
        points = []  # (step, value), newest first
        for record in reversed(history):
            found = _sharpness(record.scalars)
            if found is not None:
                points.append((record.step, found[1]))
                if len(points) == self.window:
                    break
        if len(points) < self.window or any(value <= 0 for _, value in points):
            return []
        steps = [float(step) for step, _ in points]
        try:
            slope = statistics.linear_regression(steps, [math.log(value) for _, value in points]).slope
        except statistics.StatisticsError:  # all passes at one step: no trend
            return []
        log_rise = slope * (steps[0] - steps[-1])  # compared in log space: no overflow on extreme values
        if slope <= 0 or log_rise < math.log1p(self.min_increase):
            return []
        increase = math.expm1(min(log_rise, 700.0))
        tag, value = newest
        ratio = _finite(history[-1].scalars, tags.SHARPNESS_RATIO)
        where = "" if ratio is None else f", {ratio:.2g} of 2/lr"
        message = (
            f"Progressive sharpening: the model's λ_max rose {increase:.0%} (least-squares fit) over "
            f"the last {self.window} passes, steps {points[-1][0]}-{points[0][0]}, to {value:.4g}"
            f"{where}; it typically keeps rising until it reaches the stability threshold 2/lr."
        )
        return [self._alert(history, message, tag, value)]


class _MedianJump(AlertRule):
    """Base of the rules that compare a value with the median of its previous values (robust to outliers)."""

    def __init__(self, factor: float, window: int, min_history: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = _arg("factor", factor, 1, strict=True, what="the jump over the median that alerts")
        self.window = _arg("window", window, 1, integer=True, what="previous values in the median")
        self.min_history = _arg("min_history", min_history, 1, integer=True, what="previous values needed")
        if min_history > window:
            raise ValueError(
                f"min_history ({min_history}) must be <= window ({window}): the median uses at "
                "most window previous values"
            )

    def _jump(self, history: Sequence[PassRecord], tag: str) -> tuple[float, float, int] | None:
        """``(value, median, n)`` when ``tag`` of the newest pass exceeds ``factor`` x the median of its ``n``
        previous values; ``None`` otherwise, with too few of them, or a non-positive median (no scale)."""
        value = _finite(history[-1].scalars, tag)
        if value is None:
            return None
        previous = _previous(history, tag, self.window)
        if len(previous) < self.min_history:
            return None
        median = statistics.median(previous)
        return (value, median, len(previous)) if median > 0 and value > self.factor * median else None


class CurvatureSpike(_MedianJump):
    """A block's ``top_eigenvalue`` jumped above ``factor`` x the median of its previous values (warning).

    One alert per block (the whole model is the block ``model``), needing at least ``min_history`` previous
    values of that block (at most ``window`` are used). The median of a few passes ignores one earlier
    outlier; 3x is far beyond pass-to-pass noise and beyond what progressive sharpening does in a few passes,
    so it flags sudden jumps, which tend to come with loss spikes and instabilities.

    Args:
        factor: the jump over the median that fires (> 1).
        window: most previous values in the median. min_history: fewest needed (1 <= min_history <= window).
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "curvature_spike"
    severity = "warning"

    def __init__(self, factor: float = 3.0, window: int = 5, min_history: int = 3, **kwargs: Any) -> None:
        super().__init__(factor, window, min_history, **kwargs)

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        alerts = []
        for block, tag in _block_tags(history[-1].scalars, "top_eigenvalue"):
            jump = self._jump(history, tag)
            if jump is not None:
                value, median, n = jump
                message = (
                    f"Curvature spike in block {block}: λ_max = {value:.4g} is {value / median:.3g}x "
                    f"the median {median:.4g} of its previous {n} passes."
                )
                alerts.append(self._alert(history, message, tag, value))
        return alerts


class NegativeCurvature(AlertRule):
    """A block's ``negative_ratio`` = -λ_min / λ_max exceeds ``ratio`` (info).

    Info by default: sizeable negative eigenvalues are normal at initialisation and early in training (and
    near saddle points) and usually shrink relative to λ_max as training goes on; they matter when they
    persist or grow late in training. 0.5 ignores the small negative tail most Hessians keep.

    Blocks whose own curvature is negligible next to the whole model's are skipped: a block with
    λ_max = 0.01 and λ_min = -0.01 in a model with λ_max = 100 is not where the loss is non-convex in any
    way that matters (without a whole-model value every block is checked).

    Args:
        ratio: the ``negative_ratio`` above which to fire (>= 0).
        min_fraction: skip blocks whose |λ_min| is below this fraction of the model's λ_max (>= 0).
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "negative_curvature"
    severity = "info"

    def __init__(self, ratio: float = 0.5, min_fraction: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ratio = _arg("ratio", ratio, 0, what="-λ_min / λ_max above which to fire")
        self.min_fraction = _arg("min_fraction", min_fraction, 0, what="fraction of the model's λ_max")

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        scalars = history[-1].scalars
        model_top = _finite(scalars, tags.block_tag("model", "top_eigenvalue"))
        floor = self.min_fraction * model_top if model_top is not None and model_top > 0 else 0.0
        alerts = []
        for block, tag in _block_tags(scalars, "negative_ratio"):
            value = _finite(scalars, tag)
            if value is not None and value > self.ratio:
                low = _finite(scalars, tags.block_tag(block, "min_eigenvalue"))
                if block != "model" and low is not None and -low < floor:
                    continue
                top = _finite(scalars, tags.block_tag(block, "top_eigenvalue"))
                message = (
                    f"Negative curvature in block {block}: λ_min = {format_number(low)} is {value:.3g} of "
                    f"λ_max = {format_number(top)} in magnitude (> {self.ratio:g}); the loss is locally "
                    "non-convex there."
                )
                alerts.append(self._alert(history, message, tag, value))
        return alerts


class NonFinite(AlertRule):
    """A NaN or infinite scalar in the new pass (critical): one alert naming up to 5 of the tags.

    The alert's tag and value are the first such scalar's. Training diverged, or the curvature pass
    overflowed; the other rules ignore non-finite values.

    Args:
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "non_finite"
    severity = "critical"
    _SHOWN = 5

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        bad = [
            (tag, x)
            for tag, value in history[-1].scalars.items()
            if (x := _number(value)) is not None and not math.isfinite(x)
        ]
        if not bad:
            return []
        names = ", ".join(tag for tag, _ in bad[: self._SHOWN])
        more = f" and {len(bad) - self._SHOWN} more" if len(bad) > self._SHOWN else ""
        message = (
            f"{len(bad)} non-finite scalar(s) ({names}{more}): training diverged or the curvature "
            "pass overflowed."
        )
        return [self._alert(history, message, *bad[0])]


class BoundViolation(AlertRule):
    """A theory tag ``.../bound_ratio`` (measured / proven bound) exceeds ``1 + tolerance`` (critical).

    A proven bound that does not hold means a bug, or a setting outside the theorem's assumptions. The
    default tolerance only absorbs floating-point round-off of tight bounds. One alert per tag.

    Args:
        tolerance: how far above 1 a ratio may lie (>= 0).
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "bound_violation"
    severity = "critical"

    def __init__(self, tolerance: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = _arg("tolerance", tolerance, 0, what="slack above a bound ratio of 1")

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        scalars = history[-1].scalars
        alerts = []
        for tag in scalars:
            value = _finite(scalars, tag) if tag.endswith("/bound_ratio") else None
            if value is not None and value > 1 + self.tolerance:
                message = (
                    f"Bound violated: {tag} = {value:.6g} > 1, a measured quantity exceeds its proven "
                    "bound (a bug, or the setting is outside the theorem's assumptions)."
                )
                alerts.append(self._alert(history, message, tag, value))
        return alerts


class HeterogeneityJump(_MedianJump):
    """:data:`~lightning_hessian.tags.HETEROGENEITY` jumped above ``factor`` x its previous median (info).

    The heterogeneity is the mean pairwise Jensen-Shannon distance of the blocks' spectral densities (Zhang et
    al., "Why Transformers Need Adam: A Hessian Perspective", arXiv:2402.16788): high heterogeneity is what
    makes one learning rate for all blocks a poor fit. It is bounded and moves slowly, so doubling is a real
    change in how differently the blocks curve; info because it is not dangerous in itself.

    Args:
        factor: the jump over the median that fires (> 1).
        window: most previous values in the median. min_history: fewest needed (1 <= min_history <= window).
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "heterogeneity_jump"
    severity = "info"

    def __init__(self, factor: float = 2.0, window: int = 5, min_history: int = 3, **kwargs: Any) -> None:
        super().__init__(factor, window, min_history, **kwargs)

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        jump = self._jump(history, tags.HETEROGENEITY)
        if jump is None:
            return []
        value, median, n = jump
        message = (
            f"Block heterogeneity (JS distance) jumped to {value:.4g}, {value / median:.3g}x the "
            f"median {median:.4g} of its previous {n} passes: the blocks' spectra are drifting apart."
        )
        return [self._alert(history, message, tags.HETEROGENEITY, value)]


class ThresholdRule(AlertRule):
    r"""A user-defined threshold: the tags matching ``tag_pattern`` with a value ``> above`` or ``< below``.

    Args:
        name: the rule's name.
        tag_pattern: a regular expression matched with ``re.fullmatch`` against whole tags, e.g.
            ``r"curvature/.*/top_eigenvalue"`` (every block's λ_max) or ``r"curvature/layers\.0\..*/trace"``
            (escape the dots of block names).
        above, below: fire when a value lies strictly above ``above`` or strictly below ``below`` (at least
            one; both: outside ``[below, above]``).
        severity, cooldown, enabled: see :class:`AlertRule`.
    """

    def __init__(
        self,
        name: str,
        tag_pattern: str | re.Pattern[str],
        above: float | None = None,
        below: float | None = None,
        severity: str = "warning",
        cooldown: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__(name, severity, cooldown, enabled)
        try:
            self.pattern = re.compile(tag_pattern)
        except (re.error, TypeError) as error:
            raise ValueError(
                f"tag_pattern must be a regular expression for re.fullmatch, got {tag_pattern!r}: {error}"
            ) from error
        if above is None and below is None:
            raise ValueError("give above=, below= or both: the values outside them fire")
        self.above = None if above is None else _arg("above", above)
        self.below = None if below is None else _arg("below", below)
        if self.above is not None and self.below is not None and self.below >= self.above:
            raise ValueError(f"below ({below}) must be < above ({above}): values outside [below, above] fire")

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        scalars = history[-1].scalars
        alerts = []
        for tag in scalars:
            value = _finite(scalars, tag) if self.pattern.fullmatch(tag) else None
            if value is None:
                continue
            if self.above is not None and value > self.above:
                message = f"{tag} = {value:.4g} is above {self.above:.4g}."
            elif self.below is not None and value < self.below:
                message = f"{tag} = {value:.4g} is below {self.below:.4g}."
            else:
                continue
            alerts.append(self._alert(history, message, tag, value))
        return alerts


class CallableRule(AlertRule):
    """A rule from a function, for custom rules without subclassing.

    ``fn(history)`` gets the history (oldest first, ``history[-1]`` the new pass) and returns an iterable
    (or ``None``) of alerts for the new pass, each ``(tag, value, message)`` (``tag`` / ``value`` may be
    ``None``; cooldowns are per ``tag``) or just a message string.

    Args:
        name: the rule's name.
        fn: the function.
        severity, cooldown, enabled: see :class:`AlertRule`.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[Sequence[PassRecord]], Iterable[Any] | None],
        severity: str = "warning",
        cooldown: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__(name, severity, cooldown, enabled)
        if not callable(fn):
            raise ValueError(f"fn must be a function fn(history) -> [(tag, value, message), ...], got {fn!r}")
        self.fn = fn

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        alerts = []
        for item in self.fn(history) or ():
            # a malformed item raises here; the manager reports the rule as failed
            tag, value, message = (None, None, item) if isinstance(item, str) else item
            alerts.append(self._alert(history, str(message), tag, None if value is None else float(value)))
        return alerts


class PreconditionedGradientCurvature(AlertRule):
    """The preconditioned gradient curvature crossed ``2 / lr`` (warning): Adam's loss-spike condition.

    Looks at :data:`~lightning_hessian.tags.PRECONDITIONED_GRADIENT_RATIO`, the curvature of
    :math:`P^{-1/2} H P^{-1/2}` along the preconditioned gradient divided by ``2 / lr``
    (:mod:`lightning_hessian.directional`). Bai et al. (arXiv:2506.04805) found that Adam's loss spikes
    happen when this curvature exceeds ``2 / lr``: the step along the preconditioned gradient then overshoots.
    A ratio above ``above`` (default 1) fires.

    Args:
        above: the ratio above which to warn (> 0).
        name, severity, cooldown, enabled: see :class:`AlertRule`.
    """

    name = "preconditioned_gradient_curvature"
    severity = "warning"

    def __init__(self, above: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.above = _arg("above", above, 0, strict=True, what="the ratio to 2/lr above which to warn")

    def check(self, history: Sequence[PassRecord]) -> list[Alert]:
        tag = tags.PRECONDITIONED_GRADIENT_RATIO
        ratio = _finite(history[-1].scalars, tag)
        if ratio is None or ratio <= self.above:
            return []
        curvature = _finite(history[-1].scalars, tags.PRECONDITIONED_GRADIENT_CURVATURE)
        message = (
            f"The preconditioned gradient curvature (P⁻¹g)ᵀH(P⁻¹g)/(gᵀP⁻¹g) = {format_number(curvature)} is "
            f"{ratio:.3g}x 2/lr: Bai et al. (arXiv:2506.04805) found Adam's loss spikes where it crosses "
            "2/lr. Lower the learning rate, raise Adam's eps (it bounds P from below) or lengthen the warmup."
        )
        return [self._alert(history, message, tag, ratio)]


def default_rules() -> list[AlertRule]:
    """Every built-in rule with its defaults (see the module docstring), most severe first."""
    return [
        NonFinite(),
        StabilityThreshold(),
        BoundViolation(),
        PreconditionedGradientCurvature(),
        ProgressiveSharpening(),
        CurvatureSpike(),
        NegativeCurvature(),
        HeterogeneityJump(),
    ]


# ----------------------------------------------------------------------------------------------- manager


def _check_rules(rules: Sequence[Any]) -> None:
    names: set[str] = set()
    for rule in rules:
        if not isinstance(rule, AlertRule):
            raise ValueError(f"rules must be AlertRules (wrap a function in CallableRule), got {rule!r}")
        if rule.name in names:
            raise ValueError(f"two rules are named {rule.name!r}: give each rule a unique name=")
        names.add(rule.name)


def as_record(record: PassRecord) -> PassRecord:
    """``record`` with plain float scalars (non-numbers dropped): what the rules see and what is saved."""
    if not isinstance(record, PassRecord):
        raise TypeError(f"expected a PassRecord(step, scalars), got {type(record).__name__}")
    scalars = {str(tag): x for tag, value in record.scalars.items() if (x := _number(value)) is not None}
    return PassRecord(int(record.step), scalars)


class AlertManager:
    """Runs alert rules on each new pass, with cooldowns, a bounded history and checkpointable state.

    Args:
        rules: the rules (default: :func:`default_rules`). The list is :attr:`rules`; append to it freely.
        history_size: passes kept for the rules (the oldest are dropped); at least the rules' windows + 1.
        max_alerts: fired alerts kept in :attr:`alerts` (the oldest are dropped; :attr:`counts` counts all).
    """

    def __init__(
        self, rules: Iterable[AlertRule] | None = None, *, history_size: int = 200, max_alerts: int = 1000
    ) -> None:
        _arg("history_size", history_size, 1, integer=True, what="passes kept")
        _arg("max_alerts", max_alerts, 1, integer=True, what="fired alerts kept")
        self.rules: list[AlertRule] = default_rules() if rules is None else list(rules)
        _check_rules(self.rules)
        self._history: deque[PassRecord] = deque(maxlen=history_size)
        self._alerts: deque[Alert] = deque(maxlen=max_alerts)
        # (rule, tag) -> (step, severity index) of the last alert that fired: the cooldowns
        self._last: dict[tuple[str, str | None], tuple[int, int]] = {}
        self._counts = dict.fromkeys(SEVERITIES, 0)
        self._failed: set[str] = set()  # rules whose failure was reported

    @property
    def history(self) -> list[PassRecord]:
        """The kept passes, oldest first."""
        return list(self._history)

    @property
    def alerts(self) -> list[Alert]:
        """The kept fired alerts, oldest first."""
        return list(self._alerts)

    @property
    def counts(self) -> dict[str, int]:
        """Alerts fired so far per severity (all of them, also those no longer in :attr:`alerts`)."""
        return dict(self._counts)

    def update(self, record: PassRecord) -> list[Alert]:
        """Add a pass to :attr:`history`, run the enabled rules on it; return the alerts that fired after
        cooldowns."""
        self._history.append(as_record(record))
        return self.evaluate(self._history)

    def evaluate(self, history: Sequence[PassRecord]) -> list[Alert]:
        """Run the enabled rules on a history kept by the caller (its newest pass last, made with
        :func:`as_record`); return the alerts that fired after cooldowns. A monitor that owns its passes
        (:class:`~lightning_hessian.HessianMonitor`) calls this; :meth:`update` keeps the history here."""
        _check_rules(self.rules)  # the list is public: catch appended duplicates before they mix cooldowns
        history = list(history)
        if not history:
            return []
        record = history[-1]
        fired = []
        for rule in self.rules:
            if not rule.enabled:
                continue
            try:
                alerts = list(rule.check(history))
                for alert in alerts:
                    if not isinstance(alert, Alert) or alert.severity not in SEVERITIES:
                        raise TypeError(
                            f"check() must return Alerts with severities in {SEVERITIES}, got {alert!r}"
                        )
            except Exception as error:  # a broken rule must not stop training
                if rule.name not in self._failed:
                    self._failed.add(rule.name)
                    message = (
                        f"Alert rule {rule.name!r} failed ({type(error).__name__}: {error}); it is "
                        "skipped whenever it fails, and this is reported once."
                    )
                    fired.append(Alert("alerts", "warning", record.step, message))
                continue
            fired.extend(alert for alert in alerts if self._cooled_down(rule, alert))
        self._alerts.extend(fired)
        for alert in fired:
            self._counts[alert.severity] += 1
        return fired

    def _cooled_down(self, rule: AlertRule, alert: Alert) -> bool:
        """Whether ``alert`` fires (and if so, restart its cooldown)."""
        key, rank = (rule.name, alert.tag), SEVERITIES.index(alert.severity)
        last = self._last.get(key)
        # a step before the last alert (history rewound) or a more severe alert fires regardless
        if last is not None and 0 <= alert.step - last[0] < rule.cooldown and rank <= last[1]:
            return False
        self._last[key] = (alert.step, rank)
        return True

    def _rule(self, name: str) -> AlertRule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise ValueError(f"no rule named {name!r}; the rules are {[rule.name for rule in self.rules]}")

    def disable(self, name: str) -> None:
        """Stop running the rule ``name``."""
        self._rule(name).enabled = False

    def enable(self, name: str) -> None:
        """Run the rule ``name`` again."""
        self._rule(name).enabled = True

    def state_dict(self) -> dict[str, Any]:
        """History, fired alerts, cooldowns, counts and reported failures, as plain (JSON-ready) values.

        Non-finite scalars stay floats, which ``json`` writes as ``NaN`` / ``Infinity``.
        """
        return {
            "history": [{"step": r.step, "scalars": dict(r.scalars)} for r in self._history],
            "alerts": [alert.to_dict() for alert in self._alerts],
            "cooldowns": [[rule, tag, step, SEVERITIES[i]] for (rule, tag), (step, i) in self._last.items()],
            "counts": dict(self._counts),
            "failed_rules": sorted(self._failed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the current ``history_size`` / ``max_alerts`` apply)."""
        try:
            history = [
                PassRecord(int(r["step"]), {str(t): float(v) for t, v in r["scalars"].items()})
                for r in state["history"]
            ]
            alerts = [Alert(**alert) for alert in state["alerts"]]
            last = {
                (rule, tag): (int(step), SEVERITIES.index(severity))
                for rule, tag, step, severity in state["cooldowns"]
            }
            counts = {severity: int(state["counts"].get(severity, 0)) for severity in SEVERITIES}
            failed = {str(name) for name in state.get("failed_rules", ())}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not an AlertManager.state_dict() ({type(error).__name__}: {error})") from error
        self._history = deque(history, maxlen=self._history.maxlen)
        self._alerts = deque(alerts, maxlen=self._alerts.maxlen)
        self._last, self._counts, self._failed = last, counts, failed
