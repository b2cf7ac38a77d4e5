r"""Hessian-vector products by central differences of gradients: no double backward.

For a block :math:`b` with parameters :math:`\theta_b` and a block vector :math:`v`,

.. math::

    H_{bb} v \approx \frac{g_b(\theta + \varepsilon P_b^\top v) - g_b(\theta - \varepsilon P_b^\top v)}
    {2 \varepsilon},

where :math:`g_b` is the block's gradient of the (batch-size weighted mean) loss. Only the block's entries
are perturbed, and the gradient is taken with respect to the block's parameters only, so a product costs
two forward and two first-order backward passes over the curvature data and never differentiates a
backward: it runs through fused attention kernels (FlashAttention, memory-efficient SDPA), compiled graphs
(``torch.compile``) and sharded parameters, none of which has a double backward.

Step size (the rule). With :math:`u` the machine epsilon of the compute dtype,

.. math::

    \varepsilon = u^{1/3} \frac{\max(\mathrm{rms}(\theta_b), \tau)}{\|v\|_\infty}, \quad \tau = 10^{-2},

i.e. no entry moves by more than :math:`u^{1/3}` times the block's RMS weight (or :math:`\tau` for blocks
near zero, such as fresh biases). The largest entry of :math:`v`, not its RMS, sets the step because
Lanczos vectors converge to eigenvectors that can sit on a few entries (an embedding row, a LayerNorm
gain), which an RMS-scaled step would move by far more: on a 2-layer GPT-2 the whole model's
:math:`\lambda_{\max}` came out 23% low with an RMS-scaled step, within 1e-3 with this one.

Error model: central differences have a truncation error :math:`\tfrac{\varepsilon^2}{6} \nabla^3 \mathcal
L[v, v, \cdot]` (second order, the even terms cancel) and a rounding error of about :math:`u \|g\| /
\varepsilon` from the two gradients (plus the rounding of :math:`\theta \pm \varepsilon v` itself, relative
size :math:`u \, \mathrm{rms}(\theta_b) / (\varepsilon\, \mathrm{rms}(v))`); the sum is smallest for
:math:`\varepsilon \propto u^{1/3}` in the length scale of the parameters (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., §8.1, eq. 8.10), giving a relative product error of order :math:`u^{2/3}` times the
ratio of the gradient's to the product's size. Measured per block on the test models
(``tests/test_finite_difference.py``, the README's "Large models" section), for random vectors: at most 5e-8
in float64; in float32 a median of 1e-4 to 4e-3 and at most 4e-2 (the worst, GPT-2's value block, has a
small curvature next to its gradient); with bfloat16 compute the gradients' rounding noise dominates at any
step (20-300% median error), so 16-bit models should be measured with ``dtype=torch.float32`` (their bf16
weights in float32 arithmetic: a median of 2e-3), and a 16-bit compute dtype is warned about. The difference
of the two gradients and the sum over batches are accumulated in float32 at least (float64 stays float64),
so 16-bit gradients lose nothing more in the subtraction.

Piecewise-linear activations (ReLU): a perturbation that moves a pre-activation across the kink changes the
gradient by a jump, not a slope, and the difference quotient then differs from the (almost everywhere)
Hessian by O(1) however small the step: on ``nn.TransformerEncoderLayer``'s default ReLU FFN most float32
block products are within 1%, but a block whose perturbation crosses kinks is off by up to 8x. Smooth
activations (GELU, SiLU, tanh) have no such error.

Randomness: before each of the two forwards the random number state recorded before the batch's first
forward is restored, so dropout draws the same masks for :math:`+\varepsilon` and :math:`-\varepsilon`
(and the same as the gradient the operator started from): the product is that of one fixed training-mode
function. A non-finite product (a perturbed forward that overflows in low precision) raises
:class:`NonFiniteProductError`, a :class:`~lightning_hessian.errors.NonFiniteLossError`, so a monitor
skips the pass with its ``non_finite`` alert.

References: Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994 (finite
differences as the baseline of exact products); Granziol & Juarev, arXiv:2602.00816 (shard-local
finite-difference Hessian-vector products under FSDP).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_hessian._rng import set_device_rng_state
from lightning_hessian.errors import NonFiniteLossError

if TYPE_CHECKING:
    from lightning_hessian.blocks import Block
    from lightning_hessian.operators import CurvatureOperator

__all__ = [
    "STEP_FLOOR",
    "NonFiniteProductError",
    "accumulation_dtype",
    "check_dtype",
    "check_finite",
    "matmat",
    "step_sizes",
    "steps_for_scale",
]

STEP_FLOOR = 1e-2  # tau: the weight scale assumed for blocks whose weights are (near) zero


class NonFiniteProductError(NonFiniteLossError):
    """A finite-difference product is NaN or infinite (e.g. a perturbed forward overflowed)."""


def check_dtype(dtype: torch.dtype) -> None:
    """Warn when finite differences would run in a 16-bit dtype (their error is then 20-300%)."""
    if torch.finfo(dtype).bits < 32:
        warnings.warn(
            f"Finite-difference products in {dtype} have 20-300% error (the gradients' rounding noise "
            "dominates at any step): pass dtype=torch.float32 to measure the 16-bit weights in float32 "
            "arithmetic (error ~1e-3).",
            UserWarning,
            stacklevel=4,
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are differenced and summed in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def step_sizes(theta: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    r"""The steps :math:`\varepsilon_j = u^{1/3} \max(\mathrm{rms}(\theta_b), \tau) / \|v_j\|_\infty`.

    Args:
        theta: the block's current entries, as a flat vector.
        columns: ``(numel, m)`` block vectors.
        dtype: the compute dtype; :math:`u` is its machine epsilon.

    Returns:
        ``(m,)`` steps in the accumulation dtype (0 for a zero column: its product is zero).
    """
    acc = accumulation_dtype(dtype)
    return steps_for_scale(theta.to(acc).pow(2).mean().sqrt(), columns, dtype)


def steps_for_scale(theta_rms: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`step_sizes` from the block's RMS weight (for callers that reduce it over shards)."""
    acc = accumulation_dtype(dtype)
    scale = theta_rms.to(acc).clamp_min(STEP_FLOOR)
    largest = columns.to(acc).abs().amax(0)
    steps = torch.finfo(dtype).eps ** (1 / 3) * scale / largest
    return torch.where(largest > 0, steps, torch.zeros_like(steps))


def _gradient(op: CurvatureOperator, block: Block, shifts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The block's gradient of the weighted mean loss at :math:`\theta` + ``shifts`` (block parameters only).

    Every stored batch (or chunk) is run with its recorded random state. Every trainable parameter requires
    grad, as in training, so that a compiled model meets the guards of the graph it trained with (a
    requires-grad pattern per block would recompile per block, and past dynamo's cache limit run
    eagerly); the backward is still asked for the block's parameters only.
    """
    acc = accumulation_dtype(op.dtype)
    tensors = {key: t.detach().requires_grad_(t.requires_grad) for key, t in op._tensors.items()}
    inputs = []
    for name, shift in shifts.items():
        leaf = op._leaves[name].detach()
        inputs.append((leaf.to(acc) + shift).to(leaf.dtype).requires_grad_())
        tensors[f"model.{name}"] = inputs[-1]
    total = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in inputs]
    for chunk, size, state in op._chunks:
        set_device_rng_state(state, op.device)
        loss, _ = op._forward(chunk, 0, False, tensors=tensors)
        grads = torch.autograd.grad(
            loss * (size / op._size), inputs, allow_unused=True, materialize_grads=True
        )
        total = [t + g.to(acc) for t, g in zip(total, grads)]
    return dict(zip(shifts, total))


def _product(op: CurvatureOperator, block: Block, columns: Tensor) -> Tensor:
    """``(numel, m)`` finite-difference products of one block, in the accumulation dtype."""
    acc = accumulation_dtype(op.dtype)
    columns = columns.to(acc)
    theta = block.vector({name: op._leaves[name].detach() for name in block.params})
    steps = step_sizes(theta, columns, op.dtype)
    shifts = block.scatter(columns * steps, op._shapes)
    products = []
    for j, step in enumerate(steps.tolist()):
        if step == 0.0:
            products.append(columns.new_zeros((columns.shape[0], 1)))
            continue
        plus = _gradient(op, block, {name: shifts[name][j] for name in block.params})
        minus = _gradient(op, block, {name: -shifts[name][j] for name in block.params})
        diff = {name: ((plus[name] - minus[name]) / (2 * step)).unsqueeze(0) for name in block.params}
        products.append(block.columns(diff))
    return torch.cat(products, dim=1)


def matmat(op: CurvatureOperator, jobs: Sequence[tuple[int, Block, Tensor]]) -> list[Tensor | None]:
    """Finite-difference products for ``(index, block, columns)`` jobs of a :class:`CurvatureOperator`.

    Returns the per-block list :meth:`CurvatureOperator.matmat` returns (before its cross-process sum), in
    the operator's dtype; times go to ``op.block_seconds``.
    """
    results: list[Tensor | None] = [None] * len(op.blocks)
    for index, block, columns in jobs:
        start = time.perf_counter()
        results[index] = _product(op, block, columns).to(op.dtype)
        op.block_seconds[index] += time.perf_counter() - start
    return results


def check_finite(results: Sequence[Tensor | None]) -> None:
    """Raise :class:`NonFiniteProductError` when a product is not finite (after the cross-process sum, so
    that every process raises together)."""
    if any(r is not None and not bool(torch.isfinite(r).all()) for r in results):
        raise NonFiniteProductError(
            "A finite-difference Hessian-vector product is not finite: a perturbed forward overflowed (in "
            "low precision the step u^(1/3) * rms(weights) can push activations past the dtype's range) "
            "or the model diverged. The pass is skipped; measure in float32 (dtype=torch.float32) or use "
            'products="exact" where the model allows double backward.'
        )
