r"""The monitor's cheap tier: curvature along the directions the optimiser takes, from a few forwards.

Three numbers, each from forward passes on the curvature data at the current weights :math:`\theta` (plus
one gradient for the third), never a Hessian-vector product:

* **Update curvature** :math:`d^\top H d`, :math:`d = u / \|u\|` for the update :math:`u = \theta -
  \theta_{\text{before}}` just taken, by a central second difference of the loss

  .. math::

      d^\top H d \approx \frac{L(\theta + \varepsilon d) - 2 L(\theta) + L(\theta - \varepsilon d)}
      {\varepsilon^2}.

* **Critical sharpness** :math:`\lambda_c = 2 / \eta_c` (Kalra et al., "critical sharpness",
  arXiv:2601.16979): with :math:`p = u / \eta` (:math:`\eta` the learning rate), :math:`\eta_c` is the
  largest :math:`\eta' > 0` with :math:`L(\theta + \eta' p) \le L(\theta)`, found by a forward-only line
  search. On a quadratic :math:`\eta_c = -2 g^\top p / p^\top H p`, so :math:`\lambda_c = p^\top H p /
  (-g^\top p)`, and ``lr / η_c > 1`` says that the step just taken, taken again, would raise the loss.
* **Preconditioned gradient curvature** (Bai et al., arXiv:2506.04805): with :math:`g = \nabla L(\theta)`
  and an adaptive optimiser's diagonal preconditioner :math:`P` (Adam's :math:`\sqrt{\hat v} + \epsilon`),
  :math:`\kappa = (P^{-1} g)^\top H (P^{-1} g) / (g^\top P^{-1} g)`, the curvature of
  :math:`P^{-1/2} H P^{-1/2}` along the preconditioned gradient; Bai et al. found loss spikes of Adam where
  :math:`\kappa` crosses :math:`2 / \eta`. Its second difference runs along :math:`P^{-1} g` normalised.

Step size of the second differences (the rule). With :math:`u_m` the machine epsilon of the parameters'
dtype and :math:`\tau = 10^{-2}` (the floor of :mod:`lightning_hessian.finite_difference`),

.. math::

    \varepsilon = c\, u_m^{1/4} \frac{\max(\mathrm{rms}(\theta), \tau)}{\|d\|_\infty},

the RMS over the parameters :math:`d` touches (:math:`c = 0.3`, the best of 0.01-1 on the test models):
no entry moves by more than :math:`c\, u_m^{1/4}` times the weights' RMS. Error model: truncation
:math:`\tfrac{\varepsilon^2}{12} L''''` (the odd terms cancel) and rounding :math:`\approx 4 \delta_L /
\varepsilon^2`, :math:`\delta_L \gtrsim u_m |L|` the rounding error of one loss (and of :math:`\theta \pm
\varepsilon d` in the dtype, :math:`\approx u_m |g| \mathrm{rms}(\theta)`); their sum is smallest at
:math:`\varepsilon \propto u_m^{1/4}` in the length scale of the parameters, for a relative error of order
:math:`u_m^{1/2}` (Nocedal & Wright, *Numerical Optimization*, 2nd ed., §8.1). The perturbed weights are
computed in at least float32 and the losses summed in float64. Measured against exact curvatures (the
dense Hessian of the LLaMA of ``tests/_models.py`` and of the attention probe, double-backward products on
its nanoGPT; ``tests/test_directional.py``) along Adam-like updates (curvature 0.1-0.4): relative error
1e-9 to 2e-7 in float64 (5e-8 to 1e-5 along a preconditioned gradient), 3e-4 to 3e-3 in float32 (1e-4
along LLaMA's preconditioned gradient; 7e-4 on the 4-layer GPT below, after 40 AdamW steps). Along
directions of near-zero curvature (random ones, ~1e-3) the rounding term dominates: an absolute error of
1e-4 to 6e-4 in float32 and ~5e-8 in float64, i.e. about 1e-3 of the curvature along an update in float32.

Critical sharpness line search: :math:`f(\eta') = L(\theta + \eta' p) - L(\theta)`, first at
:math:`\eta' = \eta`, then doubled while :math:`f \le 0` or halved while :math:`f > 0` until the root is
bracketed, then bisected down to a relative width of 1/16; the reported :math:`\eta_c` is the root of the
quadratic through :math:`(0, 0)` and the bracket's ends (exact on a quadratic loss), kept inside the
bracket. A non-finite loss along the line counts as a rise. When no bracket is found within
``max_forwards`` forwards the value is ``None`` (never infinite): ``"ascent"`` (the loss rose at every step
tried, down to :math:`\eta / 2^{k}`: on these data :math:`u` is not a descent direction, as often happens
for a minibatch update on other data, which says nothing about stability) or ``"flat"`` (it fell at every
step tried, up to :math:`2^k \eta`).

Cost of one call: one forward for :math:`L(\theta)`, two for the update curvature, at most
``max_forwards`` for the line search (it stops once the bracket is narrow: 4 to 8 on the models tried), one
forward and one backward for :math:`g` plus two forwards for the preconditioned curvature (``forwards`` /
``backwards`` count them). On the 4-layer GPT of ``examples/train_char_gpt.py`` after 40 AdamW steps
(d=128, sequences of 64, batch 8, CPU, one thread, on a shared machine; medians of 5) a full call took 12
forwards and 1 backward, about 5 training steps (forward, backward, AdamW; one forward without a graph is
about 0.2 of a step there, plus copying the weights in and out); 4 with ``max_forwards=4`` (whose critical
sharpness agreed to 3e-5); the update curvature alone about 1, with the critical sharpness about 3.

Non-interference: the weights are set in place to the perturbed values and copied back bitwise from a
saved copy (never by subtracting) after every forward, buffers likewise; ``.grad`` is never written
(:func:`torch.autograd.grad`); the model's train/eval flags and every random number stream are restored
(:func:`~lightning_hessian._context.curvature_context`). With ``mode="train"`` the random state is reset
before every evaluation, so dropout draws the same masks at every point of a second difference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian import tags
from lightning_hessian._context import curvature_context
from lightning_hessian._rng import device_rng_state, set_device_rng_state
from lightning_hessian.batches import as_batches, batch_size
from lightning_hessian.errors import NonFiniteLossError, PassFailedElsewhere
from lightning_hessian.finite_difference import STEP_FLOOR, accumulation_dtype
from lightning_hessian.loss_calls import LossFn
from lightning_hessian.sharded import is_sharded, reshard

__all__ = ["DirectionalCurvature", "directional_curvature"]
# c of the step rule: the best of 0.01-1 on the test models along Adam-like updates (module docstring)
_STEP_FACTOR = 0.3
# the line search stops bisecting at this relative width (4 bisections after a doubling bracket); on the
# 4-layer GPT of the module docstring the result moved by 3e-5 with 8 more bisections
_BRACKET_WIDTH = 1 / 16


@dataclass
class DirectionalCurvature:
    """The cheap tier's measurements at the current weights (see the module docstring).

    Attributes:
        update_curvature: :math:`d^\\top H d` with :math:`d = u / \\|u\\|`; ``None`` without an update.
        critical_lr: :math:`\\eta_c`; ``None`` when not measured or not bracketed (``critical_status``).
        critical_sharpness: :math:`2 / \\eta_c`.
        preconditioned_gradient_curvature: :math:`(P^{-1} g)^\\top H (P^{-1} g) / (g^\\top P^{-1} g)`;
            ``None`` without a preconditioner or for a zero gradient.
        loss: the (batch-size weighted mean) loss at the current weights.
        forwards, backwards: passes over the curvature data this call ran. seconds: its wall time.
        critical_status: ``"bracketed"``, ``"ascent"`` (the loss rose at every step tried), ``"flat"`` (it
            fell at every step tried) or ``"skipped"`` (no update, a zero update, or ``critical=False``).
    """

    update_curvature: float | None
    critical_lr: float | None
    critical_sharpness: float | None
    preconditioned_gradient_curvature: float | None
    loss: float
    forwards: int
    backwards: int
    seconds: float
    critical_status: str = "skipped"

    def scalars(self, lr: float) -> dict[str, float]:
        """The measurements under their :mod:`~lightning_hessian.tags` names, with the ratios to ``2 / lr``.

        ``CRITICAL_RATIO`` is ``critical_sharpness / (2 / lr)`` (= ``lr / η_c``) and
        ``PRECONDITIONED_GRADIENT_RATIO`` is ``preconditioned_gradient_curvature / (2 / lr)``; values that
        are ``None`` are left out.
        """
        _check_lr(lr)
        values = {
            tags.UPDATE_CURVATURE: self.update_curvature,
            tags.CRITICAL_SHARPNESS: self.critical_sharpness,
            tags.CRITICAL_RATIO: None
            if self.critical_sharpness is None
            else self.critical_sharpness * lr / 2,
            tags.PRECONDITIONED_GRADIENT_CURVATURE: self.preconditioned_gradient_curvature,
            tags.PRECONDITIONED_GRADIENT_RATIO: None
            if self.preconditioned_gradient_curvature is None
            else self.preconditioned_gradient_curvature * lr / 2,
        }
        return {tag: value for tag, value in values.items() if value is not None}


def _check_lr(lr: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite learning rate (the step just taken), got {lr!r}")


class _Line:
    """Evaluates the weighted mean loss at :math:`\\theta + s\\, v` and puts the weights back, bitwise."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: list[Any],
        params: dict[str, nn.Parameter],
        reduce: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.params, self.reduce = params, reduce
        self.saved = {name: p.detach().clone() for name, p in params.items()}
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.device = next(iter(params.values())).device
        self.state = device_rng_state(self.device)
        self.forwards = self.backwards = 0

    @contextmanager
    def _at(self, direction: Mapping[str, Tensor] | None, scale: float) -> Iterator[None]:
        try:
            reshard(self.model)  # FSDP2: the forward must gather the shards written here
            if direction is not None:
                with torch.no_grad():
                    for name, v in direction.items():
                        # in at least float32 (16-bit weights are rounded once); never in place on the
                        # saved copy
                        acc = accumulation_dtype(self.saved[name].dtype)
                        moved = torch.add(self.saved[name].to(acc), v.to(acc), alpha=scale)
                        self.params[name].copy_(moved)
            set_device_rng_state(self.state, self.device)  # the same dropout masks at every point
            yield
        finally:
            reshard(self.model)  # FSDP2: no unsharded copy of perturbed weights is left behind
            with torch.no_grad():
                for name in direction or ():
                    self.params[name].copy_(self.saved[name])
                for buffer, saved in self.buffers:
                    buffer.copy_(saved)

    def _sum(self, local: Tensor, error: BaseException | None) -> Tensor:
        """``local`` with a last entry 1 if this process failed, summed over processes; raise if any failed.

        Every process takes part in the sum before an error is raised, so none waits forever.
        """
        if self.reduce is None:
            if error is not None:
                raise error
            return local
        local[-1] = float(error is not None)
        total = self.reduce(local)
        if error is not None:
            raise error
        if total[-1].item() > 0:
            raise PassFailedElsewhere(
                "The cheap tier failed on another process (see its error); skipped here too."
            )
        return total

    def loss(self, direction: Mapping[str, Tensor] | None = None, scale: float = 0.0) -> float:
        """The loss at ``θ + scale · direction`` in float64 (NaN or inf when the forward overflowed)."""
        local = torch.zeros(3, dtype=torch.float64, device=self.device)  # sum n_i L_i, N, failed
        error = None
        try:
            with self._at(direction, scale), torch.no_grad():
                for index, batch in enumerate(self.batches):
                    n = batch_size(batch)
                    local[0] += n * _loss_value(self.loss_fn(self.model, batch), index).to(torch.float64)
                    local[1] += n
        except Exception as exc:  # raised after the collective sum
            error = exc
        self.forwards += 1
        total = self._sum(local, error)
        return (total[0] / total[1]).item()

    def gradient(self) -> dict[str, Tensor]:
        """:math:`\\nabla L(\\theta)` per parameter, by :func:`torch.autograd.grad` (``.grad`` untouched)."""
        names = list(self.params)
        leaves = [self.params[name] for name in names]
        total = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in leaves]
        size, error = 0, None
        try:
            with self._at(None, 0.0):
                for index, batch in enumerate(self.batches):
                    n = batch_size(batch)
                    loss = _loss_value(self.loss_fn(self.model, batch), index)
                    if not loss.requires_grad:
                        raise ValueError(
                            "The loss does not depend on the trainable parameters (no grad_fn): compute it "
                            "from model(...) without .detach(), torch.no_grad() or .item()."
                        )
                    grads = torch.autograd.grad(n * loss, leaves, allow_unused=True, materialize_grads=True)
                    total = [t + g.to(t.dtype) for t, g in zip(total, grads)]
                    size += n
        except Exception as exc:  # raised after the collective sum
            error = exc
        self.forwards += 1
        self.backwards += 1
        flat = self._sum(torch.cat([t.reshape(-1) for t in total] + [total[0].new_tensor([size, 0])]), error)
        flat = flat[:-2] / flat[-2]
        pieces = flat.split([p.numel() for p in leaves])
        return {name: piece.view(p.shape) for name, piece, p in zip(names, pieces, leaves)}


def _loss_value(value: Any, index: int) -> Tensor:
    """The scalar loss of what ``loss_fn`` returned (a loss or ``(loss, output)``)."""
    if isinstance(value, tuple | list) and len(value) == 2:
        value = value[0]
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(
            f"loss_fn must return a scalar tensor (or a pair (loss, output)); got {value!r:.80} on batch "
            f"{index}: reduce the loss (e.g. .mean()) inside loss_fn."
        )
    return value.reshape(())


def _item(value: Tensor) -> Any:
    """The value of a one-element tensor; of a sharded (FSDP2) ``DTensor`` reduction, over every shard
    (its ``.item()`` and ``bool()`` give this process's part only, so processes would disagree)."""
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).item()


def _norm(tensors: Iterable[Tensor]) -> float:
    """The Euclidean norm of several tensors together, accumulated in float64."""
    return math.sqrt(sum(_item(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors))


def _second_difference(line: _Line, direction: dict[str, Tensor], loss: float) -> float:
    r""":math:`v^\top H v / \|v\|^2` by the central second difference along ``v / ||v||`` (the step rule)."""
    norm = _norm(direction.values())
    unit = {name: v / norm for name, v in direction.items()}
    largest = max(_item(v.abs().max()) for v in unit.values())
    theta = [line.saved[name] for name in unit]
    rms = _norm(theta) / math.sqrt(sum(t.numel() for t in theta))
    eps = (
        _STEP_FACTOR
        * torch.finfo(line.saved[next(iter(unit))].dtype).eps ** 0.25
        * max(rms, STEP_FLOOR)
        / largest
    )
    plus, minus = line.loss(unit, eps), line.loss(unit, -eps)
    if not (math.isfinite(plus) and math.isfinite(minus)):
        raise NonFiniteLossError(
            f"The loss is non-finite ({plus}, {minus}) a step {eps:.3g} away from the weights along a "
            "direction of the cheap tier: the model is on the edge of overflow. The measurement is skipped."
        )
    return (plus - 2 * loss + minus) / eps**2


def _critical_lr(
    line: _Line, update: dict[str, Tensor], loss: float, max_forwards: int
) -> tuple[float | None, str]:
    r""":math:`\eta_c` along ``update`` in units of the learning rate (1 = the step just taken), and how
    the search ended: bracket by doubling or halving from 1, bisect down to a relative width of
    ``_BRACKET_WIDTH``, then solve the quadratic through ``(0, 0)`` and the bracket's ends."""
    lo, f_lo, hi, f_hi = 0.0, 0.0, math.inf, math.inf
    eta = 1.0
    for _ in range(max_forwards):
        f = line.loss(update, eta) - loss
        if math.isfinite(f) and f <= 0:
            lo, f_lo = eta, f
        else:
            hi, f_hi = eta, f
        if lo > 0 and math.isfinite(f_hi) and hi - lo <= _BRACKET_WIDTH * lo:
            break  # the quadratic through the ends is then exact to far below the bracket's width
        if lo == 0.0:
            eta = hi / 2
        elif math.isinf(hi):
            eta = 2 * lo
        else:
            eta = (lo + hi) / 2
    if lo == 0.0:
        return None, "ascent"
    if math.isinf(hi):
        return None, "flat"
    # f(x) = a x + b x^2 through (lo, f_lo) and (hi, f_hi); its root -a/b, kept inside [lo, hi]
    b = (f_hi / hi - f_lo / lo) / (hi - lo) if math.isfinite(f_hi) else 0.0
    root = lo - f_lo / (lo * b) if b > 0 else (lo + hi) / 2
    return min(max(root, lo), hi), "bracketed"


def _vectors(
    given: Mapping[str, Tensor], params: dict[str, nn.Parameter], what: str, complete: bool
) -> dict[str, Tensor]:
    """Check ``given`` (per trainable parameter name) and move it to the parameters' devices."""
    if not isinstance(given, Mapping):
        raise TypeError(f"{what} must be a mapping from parameter name to tensor, got {type(given).__name__}")
    unknown = [name for name in given if name not in params]
    if unknown:
        raise ValueError(f"{what} has entries {unknown[:3]} that are not trainable parameters of the model.")
    missing = [name for name in params if name not in given]
    if complete and missing:
        raise ValueError(f"{what} has no entry for {missing[:3]}; give one per trainable parameter.")
    vectors = {}
    for name, value in given.items():
        if not isinstance(value, Tensor) or value.shape != params[name].shape:
            shape = getattr(value, "shape", type(value).__name__)
            raise ValueError(
                f"{what}[{name!r}] must be a tensor of shape {tuple(params[name].shape)}, got {shape}"
            )
        vectors[name] = value.detach().to(params[name].device)
    return vectors


def directional_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    update: Mapping[str, Tensor] | None,
    *,
    lr: float,
    preconditioner: Mapping[str, Tensor] | None = None,
    critical: bool = True,
    mode: str = "eval",
    max_forwards: int = 12,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> DirectionalCurvature:
    """The cheap tier at the current weights: update curvature, critical sharpness, preconditioned curvature.

    Args:
        model: the model (unwrapped: not a ``DistributedDataParallel``), at the weights after the update.
            Left exactly as it was (weights bitwise, ``.grad``, buffers, flags, random streams).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss, or ``(loss, output)``.
        data: one batch, or several (:class:`~lightning_hessian.Batches`, a ``DataLoader``): the loss is
            their batch-size weighted mean. Batches must already sit on the model's device.
        update: per trainable parameter name, the update :math:`u = \\theta_{now} - \\theta_{before}` the
            optimiser just took (missing names: 0); ``None`` skips the update curvature and the line search.
        lr: the learning rate of that step (:math:`p = u / lr` for the critical sharpness).
        preconditioner: a diagonal :math:`P > 0` per trainable parameter name (e.g. Adam's
            :math:`\\sqrt{\\hat v} + \\epsilon`), ``inf`` for parameters the optimiser does not move;
            ``None`` skips the preconditioned gradient curvature.
        critical: run the line search for the critical sharpness.
        mode: ``"eval"`` (dropout off), ``"train"`` (one fixed dropout draw for every forward) or ``"keep"``.
        max_forwards: the most forwards the line search may take (at least 2).
        reduce: with data split over processes, a function summing a tensor over them: the loss sums, batch
            sizes and the gradient are summed, so every process gets the same numbers (and the same
            line-search path); an error on one process is raised there and as
            :class:`~lightning_hessian.errors.PassFailedElsewhere` on the others, none left waiting.

    Returns:
        A :class:`DirectionalCurvature`; its :meth:`~DirectionalCurvature.scalars` gives the tags.

    Raises:
        NonFiniteLossError: the loss at the weights, or a step of a second difference away, is not finite.
    """
    start = time.perf_counter()
    _check_lr(lr)
    if isinstance(max_forwards, bool) or not isinstance(max_forwards, int) or max_forwards < 2:
        raise ValueError(
            f"max_forwards must be an int >= 2 (forwards of the line search), got {max_forwards!r}"
        )
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to measure.")
    steps = None if update is None else _vectors(update, params, "update", complete=False)
    if preconditioner is not None and is_sharded(model):
        raise ValueError(
            "preconditioner= needs the whole gradient, which an FSDP2-sharded model does not have on one "
            "process: measure the update curvature and critical sharpness without it (CurvatureTracker "
            "does), or the preconditioned sharpness with track_model."
        )
    diagonal = None if preconditioner is None else _vectors(preconditioner, params, "preconditioner", True)
    if diagonal is not None and any(_item((d.isnan() | (d <= 0)).any()) for d in diagonal.values()):
        raise ValueError(
            "preconditioner entries must be positive (inf for parameters the optimiser does not move)."
        )
    if steps is not None and not all(_item(v.isfinite().all()) for v in steps.values()):
        raise ValueError("update has non-finite entries: the step just taken diverged; nothing to measure.")
    with curvature_context(model, mode, exact=False):
        line = _Line(model, loss_fn, as_batches(data), params, reduce)
        loss = line.loss()
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"The loss on the curvature data is {loss}: its curvature is undefined. Check the model "
                "and the data."
            )
        steps = None if steps is None else {n: v for n, v in steps.items() if _item(v.ne(0).any())}
        update_curvature = critical_lr = None
        status = "skipped"
        if steps:
            update_curvature = _second_difference(line, steps, loss)
            if critical:
                critical_lr, status = _critical_lr(line, steps, loss, max_forwards)
        preconditioned = None
        if diagonal is not None:
            gradient = line.gradient()
            direction = {n: g / diagonal[n].to(g.dtype) for n, g in gradient.items()}
            g_p_g = sum(
                torch.dot(gradient[n].reshape(-1).double(), d.reshape(-1).double()).item()
                for n, d in direction.items()
            )
            direction = {n: d for n, d in direction.items() if _item(d.ne(0).any())}
            if g_p_g > 0 and direction:
                norm2 = _norm(direction.values()) ** 2
                preconditioned = _second_difference(line, direction, loss) * norm2 / g_p_g
    critical_lr = None if critical_lr is None else critical_lr * lr
    return DirectionalCurvature(
        update_curvature=update_curvature,
        critical_lr=critical_lr,
        critical_sharpness=None if critical_lr is None else 2 / critical_lr,
        preconditioned_gradient_curvature=preconditioned,
        loss=loss,
        forwards=line.forwards,
        backwards=line.backwards,
        seconds=time.perf_counter() - start,
        critical_status=status,
    )
