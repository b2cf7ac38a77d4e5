r"""Log-log slopes over seeds, their confidence intervals, and verdicts no stronger than the evidence.

A quantity :math:`y` measured at sizes :math:`x_1 < \dots < x_m` (widths, depths, data-set sizes) for each
of :math:`n` seeds is summarised by one least-squares slope per seed,

.. math:: \hat b_s = \frac{\sum_j (u_j - \bar u)(v_{sj} - \bar v_s)}{\sum_j (u_j - \bar u)^2},
   \qquad u_j = \log x_j,\ v_{sj} = \log y_{sj},

and the seeds' slopes by their mean and the two-sided Student-t interval
:math:`\bar b \pm t_{1-\alpha/2,\,n-1}\, \mathrm{sd}(\hat b)/\sqrt n`. The interval is over seeds (the
initialisation, the data order, the training subset and the estimators' probes all change with the seed),
so it says how reproducible a slope is, not whether :math:`y` follows a power law: with three sizes a
slope is a summary of the trend, nothing more.

Verdicts: an interval inside ``±FLAT`` "flat" (the seeds agree that any trend is negligible: over an 8x
range of sizes, less than a 23% change), otherwise an interval above 0 "grows", below 0 "shrinks",
containing 0 "no trend detected" (which is not evidence of no trend when the interval is wide). A
quantity that can change sign (a trace) gets the slope of its magnitude when every value has the same
sign, and no slope otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

#: Confidence level of the intervals.
LEVEL = 0.95
#: Slopes smaller in magnitude than this are negligible (8**0.1 = 1.23).
FLAT = 0.1


@dataclass(frozen=True)
class SlopeFit:
    """Per-seed log-log slopes of one quantity against one size, and their interval over seeds."""

    per_seed: tuple[float, ...]
    mean: float
    low: float  # the interval; equal to the mean when there is one seed, or every seed agrees exactly
    high: float
    sign: int = 1  # -1: the slope is that of |y| for a y negative at every size and seed

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    @property
    def verdict(self) -> str:
        """``"flat"``, ``"grows"``, ``"shrinks"``, ``"no trend detected"``, or ``"one seed: no interval"``."""
        if self.seeds < 2:
            return "one seed: no interval"
        if -FLAT < self.low and self.high < FLAT:
            return "flat"
        if self.low > 0:
            return "grows"
        if self.high < 0:
            return "shrinks"
        return "no trend detected"

    def text(self, digits: int = 2) -> str:
        """``"1.23 [0.95, 1.51]"``: the mean slope and its interval (``"|−y|: ..."`` for a negative ``y``)."""
        body = f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return body if self.sign > 0 else f"of −y: {body}"


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (both positive, at least two distinct ``x``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of equal length; got shapes {x.shape} and {y.shape}.")
    if len(np.unique(x)) < 2:
        raise ValueError("A slope needs at least two distinct sizes x.")
    if np.any(x <= 0) or np.any(y <= 0) or not np.all(np.isfinite(y)):
        raise ValueError(
            "A log-log slope needs positive, finite x and y; got "
            f"x = {x.tolist()}, y = {y.tolist()}. Fit a positive quantity (e.g. |λ_max|)."
        )
    u, v = np.log(x), np.log(y)
    u0 = u - u.mean()
    return float(u0 @ (v - v.mean()) / (u0 @ u0))


def fit_slopes(x: np.ndarray, values: np.ndarray, level: float = LEVEL) -> SlopeFit:
    """One slope per seed (row of ``values``, shape ``(seeds, len(x))``) and the Student-t interval of their
    mean at ``level``."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    slopes = np.array([loglog_slope(np.asarray(x), row) for row in values])
    mean = float(slopes.mean())
    if len(slopes) < 2:
        return SlopeFit(tuple(slopes.tolist()), mean, mean, mean)
    half = float(stats.t.ppf(0.5 + level / 2, len(slopes) - 1) * slopes.std(ddof=1) / np.sqrt(len(slopes)))
    return SlopeFit(tuple(slopes.tolist()), mean, mean - half, mean + half)


def fit_magnitude(x: np.ndarray, values: np.ndarray, level: float = LEVEL) -> SlopeFit | None:
    """:func:`fit_slopes` of ``values`` if all are positive, of ``-values`` (``sign=-1``) if all are negative;
    ``None`` if they change sign or touch 0 (no log-log slope exists)."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(values > 0):
        return fit_slopes(x, values, level)
    if np.all(values < 0):
        return replace(fit_slopes(x, -values, level), sign=-1)
    return None
