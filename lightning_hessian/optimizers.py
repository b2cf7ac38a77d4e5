r"""What the live optimiser says about curvature: its learning rate, thresholds and Adam's preconditioner.

Stability (Cohen et al., ICLR 2021; arXiv:2207.14484): gradient descent with step :math:`\eta` is stable
along a direction of curvature :math:`\lambda` only while :math:`\lambda < 2/\eta`; Adam, with its diagonal
preconditioner :math:`P` frozen, while :math:`\lambda_{\max}(P^{-1} H) < (2 + 2\beta_1)/((1 - \beta_1)\eta)`
(:mod:`lightning_hessian.formulas.stability`). The learning rate and betas are those of the optimiser's
first parameter group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_hessian import tags
from lightning_hessian.formulas.stability import adam_preconditioner, adam_threshold, sgd_threshold

__all__ = ["adam_preconditioners", "learning_rate", "stability_scalars"]


def learning_rate(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The first parameter group's learning rate, ``None`` without an optimiser or for a non-positive one."""
    if optimizer is None or not optimizer.param_groups:
        return None
    lr = float(optimizer.param_groups[0].get("lr", math.nan))
    return lr if lr > 0 and math.isfinite(lr) else None


def adam_preconditioners(
    optimizer: torch.optim.Optimizer | None, model: nn.Module
) -> tuple[dict[str, Tensor] | None, list[str]]:
    """Adam's diagonal preconditioner :math:`P` per trainable parameter name, and the names without state.

    ``None`` for optimisers without ``betas`` (not Adam-family) or before Adam's first step. A parameter
    Adam holds no state for (it never got a gradient) never moves: its :math:`P` is infinite, so it adds no
    preconditioned curvature (:math:`P^{-1/2} H P^{-1/2}` has zero rows there); those names are returned
    so the caller can say so.
    """
    if optimizer is None:
        return None, []
    diagonals = {}
    for group in optimizer.param_groups:
        if "betas" not in group:
            return None, []
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state or float(state["step"]) < 1:
                continue
            diagonals[id(p)] = adam_preconditioner(
                state["exp_avg_sq"], state["step"], beta1, beta2, group["eps"]
            )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    named = {n: diagonals.get(id(p)) for n, p in params.items()}
    if all(d is None for d in named.values()):
        return None, []
    missing = [n for n, d in named.items() if d is None]
    for n in missing:
        named[n] = torch.full_like(params[n], math.inf)
    return named, missing  # type: ignore[return-value]


def stability_scalars(
    optimizer: torch.optim.Optimizer | None,
    sharpness: float | None,
    preconditioned: float | None = None,
) -> dict[str, float]:
    r"""The thresholds of the live optimiser and the sharpness ratios against them (tags of :mod:`tags`).

    Args:
        optimizer: the optimiser (its first parameter group's ``lr`` and ``betas``).
        sharpness: the whole model's :math:`\lambda_{\max}`.
        preconditioned: :math:`\lambda_{\max}(P^{-1} H)` with Adam's preconditioner, if measured.
    """
    lr = learning_rate(optimizer)
    if lr is None or sharpness is None:
        return {}
    out = {
        tags.LEARNING_RATE: lr,
        tags.SHARPNESS: sharpness,
        tags.THRESHOLD: sgd_threshold(lr),
        tags.SHARPNESS_RATIO: sharpness / sgd_threshold(lr),
    }
    group: Mapping = optimizer.param_groups[0]  # type: ignore[union-attr]
    if preconditioned is not None and "betas" in group:
        threshold = adam_threshold(lr, group["betas"][0])
        out[tags.PRECONDITIONED_SHARPNESS] = preconditioned
        out[tags.PRECONDITIONED_THRESHOLD] = threshold
        out[tags.PRECONDITIONED_RATIO] = preconditioned / threshold
    return out
