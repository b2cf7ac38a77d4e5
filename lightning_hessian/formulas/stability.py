r"""Stability thresholds of optimisers and block heterogeneity of Hessian spectra.

* Gradient descent with step ``η`` on a quadratic is stable only while ``λ_max(H) < 2/η`` (Cohen, Kaur, Li,
  Kolter, Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability", ICLR
  2021, arXiv:2103.00065).
* Adam ("Adaptive Gradient Methods at the Edge of Stability", Cohen et al., arXiv:2207.14484): with
  ``m_t = β_1 m_{t-1} + (1 - β_1) g_t``, ``v_t = β_2 v_{t-1} + (1 - β_2) g_t^2``,
  ``v̂_t = v_t / (1 - β_2^t)``, Adam's step ``w_{t+1} = w_t - η (m_t / (1 - β_1^t)) / (sqrt(v̂_t) + ε)``
  is exactly ``w_{t+1} = w_t - η P_t^{-1} m_t`` with the diagonal preconditioner
  ``P_t = (1 - β_1^t) [diag(sqrt(v̂_t)) + ε I]``. With ``P`` frozen this is gradient descent with
  exponential-moving-average momentum on ``P^{-1} H``, stable only while
  ``λ_max(P^{-1} H) < (2 + 2 β_1) / ((1 - β_1) η)`` (``38/η`` for ``β_1 = 0.9``); full-batch Adam
  equilibrates there. ``P^{-1} H`` is similar to the symmetric ``P^{-1/2} H P^{-1/2}``
  (:func:`preconditioned_matvec`), whose top eigenvalue Lanczos can find.
* Block heterogeneity (Zhang, Chen, Ding, Li, Sun, Luo, "Why Transformers Need Adam: A Hessian
  Perspective", NeurIPS 2024, arXiv:2402.16788): the average pairwise Jensen-Shannon distance between the
  normalised spectral densities of the Hessian blocks (their ``JS_0`` at initialisation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "adam_preconditioner",
    "adam_threshold",
    "block_heterogeneity",
    "jensen_shannon_distance",
    "preconditioned_matvec",
    "sgd_threshold",
]


def sgd_threshold(lr: float) -> float:
    """``2/η``: the largest Hessian eigenvalue for which gradient descent with step ``η`` is stable."""
    if lr <= 0:
        raise ValueError("lr must be positive")
    return 2.0 / lr


def adam_threshold(lr: float, beta1: float = 0.9) -> float:
    """``(2 + 2 β_1) / ((1 - β_1) η)``: stability threshold of the preconditioned sharpness for Adam.

    Cohen et al., arXiv:2207.14484: ``38/η`` for ``β_1 = 0.9``; ``2/η`` for ``β_1 = 0`` (RMSProp-like).
    """
    if lr <= 0:
        raise ValueError("lr must be positive")
    if not 0 <= beta1 < 1:
        raise ValueError("beta1 must lie in [0, 1)")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def adam_preconditioner(
    exp_avg_sq: Tensor, step: int | Tensor, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
) -> Tensor:
    """Diagonal of Adam's preconditioner ``P_t = (1 - β_1^t) [diag(sqrt(v_t / (1 - β_2^t))) + ε I]``.

    Exactly what is implemented: with ``v_t = exp_avg_sq`` and ``t = step`` as stored by
    ``torch.optim.Adam`` after its ``t``-th update (``state["exp_avg_sq"]``, ``state["step"]``), the value
    returned is ``(1 - beta1**t) * (sqrt(v_t / (1 - beta2**t)) + eps)``, elementwise and shaped like the
    parameter; the update that step took was ``-lr * exp_avg / P`` (``exp_avg = m_t``). This is the ``P_t`` of
    Cohen et al. (arXiv:2207.14484, their Adam as "preconditioned momentum" form) for the step just taken;
    the next step will use ``v_{t+1}``, which needs the next gradient, so curvature measured between steps
    uses this frozen ``P_t``. (The paper counts steps from 0 and writes ``1 - β_1^{t+1}``; the numbers agree
    with torch's 1-based ``step``.) ``eps`` is added outside the square root, as in torch's Adam.
    """
    t = float(step)
    if t < 1:
        raise ValueError("step must be >= 1 (the number of Adam updates taken)")
    return (1 - beta1**t) * (torch.sqrt(exp_avg_sq / (1 - beta2**t)) + eps)


def preconditioned_matvec(
    hvp: Callable[[Tensor], Tensor], preconditioner: Tensor
) -> Callable[[Tensor], Tensor]:
    """``v -> P^{-1/2} H P^{-1/2} v``: a symmetric operator with the eigenvalues of ``P^{-1} H``.

    Args:
        hvp: ``v -> H v`` (any shape, as long as ``preconditioner`` broadcasts against ``v``).
        preconditioner: The diagonal of ``P`` (positive), e.g. from :func:`adam_preconditioner`.
    """
    inv_sqrt = preconditioner.rsqrt()

    def matvec(v: Tensor) -> Tensor:
        return inv_sqrt * hvp(inv_sqrt * v)

    return matvec


def _to_numpy(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _normalise(values: np.ndarray, grid: np.ndarray | None) -> np.ndarray:
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError("densities must be finite and non-negative")
    mass = values
    if grid is not None:
        # Trapezoid cell weights: a density sampled on a non-uniform grid becomes a probability vector.
        widths = np.zeros_like(grid)
        if grid.size > 1:
            gaps = np.diff(grid)
            widths[:-1] += gaps / 2
            widths[1:] += gaps / 2
        else:
            widths[:] = 1.0
        mass = values * widths
    total = mass.sum()
    if total <= 0:
        raise ValueError("a density has zero total mass")
    return mass / total


def jensen_shannon_distance(
    p: Tensor | np.ndarray, q: Tensor | np.ndarray, base: float | None = None
) -> float:
    """``sqrt(JSD(p, q))`` between two probability vectors (normalised here), like
    ``scipy.spatial.distance.jensenshannon``.

    ``JSD = (KL(p||m) + KL(q||m)) / 2`` with ``m = (p + q)/2``. Natural logarithm by default, so the maximum
    (disjoint supports) is ``sqrt(ln 2) ≈ 0.8326``; with ``base=2`` the maximum is ``1``.
    """
    p_ = _normalise(_to_numpy(p), None)
    q_ = _normalise(_to_numpy(q), None)
    return _js(p_, q_, base)


def _js(p: np.ndarray, q: np.ndarray, base: float | None) -> float:
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / m[mask])))

    jsd = (kl(p) + kl(q)) / 2
    if base is not None:
        jsd /= math.log(base)
    return math.sqrt(max(jsd, 0.0))


def block_heterogeneity(
    densities: Sequence[Tensor | np.ndarray | tuple[Tensor | np.ndarray, Tensor | np.ndarray]] | Tensor,
    grid: Tensor | np.ndarray | None = None,
    base: float | None = None,
) -> float:
    """Average pairwise Jensen-Shannon distance between blocks' spectral densities (Zhang et al., ``JS_0``).

    Args:
        densities: Either non-negative density values of every block on one common grid (a 2-D tensor
            ``(n_blocks, n_grid)`` or a sequence of 1-D arrays), or a sequence of ``(grid, values)`` pairs,
            e.g. the ``density`` of estimator reports; pairs on different grids are interpolated linearly onto
            the sorted union of their grids (zero outside each one's range).
        grid: The common grid for the first form; used for trapezoid weights when normalising (without it
            each density is normalised by its plain sum).
        base: Logarithm base: ``None`` (natural, maximum ``sqrt(ln 2) ≈ 0.8326`` for disjoint densities) or
            ``2`` (maximum ``1``). Identical densities give ``0``.

    Returns:
        ``(2 / (n (n - 1))) Σ_{i<j} JS(p_i, p_j)``.
    """
    items = list(densities)
    if len(items) < 2:
        raise ValueError("need at least two densities")
    if all(isinstance(it, tuple) for it in items):
        grids = [_to_numpy(g) for g, _ in items]  # type: ignore[misc]
        values = [_to_numpy(v) for _, v in items]  # type: ignore[misc]
        common = np.unique(np.concatenate(grids))
        probs = [
            _normalise(np.interp(common, g, v, left=0.0, right=0.0), common)
            for g, v in zip(grids, values, strict=True)
        ]
    else:
        common_grid = None if grid is None else _to_numpy(grid)
        probs = [_normalise(_to_numpy(it), common_grid) for it in items]  # type: ignore[arg-type]
        if len({p.shape for p in probs}) != 1:
            raise ValueError("densities on a common grid must have equal lengths")
    dists = [_js(p, q, base) for p, q in itertools.combinations(probs, 2)]
    return float(np.mean(dists))
