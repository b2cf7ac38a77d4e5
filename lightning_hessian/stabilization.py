r"""Live loss-landscape stabilisation: [KG]'s curvature-aligned criterion against samples seen.

Kiselev & Grabovoy's criterion :math:`\Delta_2^{(D)}(k) = E_z[(L_{k+1} - L_k)(w + U z)^2]` probes the loss
increment field in the top-:math:`D` eigenspace :math:`U` of the Hessian, with
:math:`z \sim N(0, \sigma^2 I_D)` (:mod:`lightning_hessian.formulas.stabilization`, docs/formulas.md §6a).
During training the first :math:`k` samples are the ones seen so far and are gone; what the curvature batch
gives is the criterion's expectation for i.i.d. samples,

.. math:: E\,\Delta_2^{(D)}(k) = S_D / (k (k+1)), \qquad S_D = E_z \operatorname{Var}_i[l_i(w + Uz)],

with :math:`S_D` estimated without bias (under the local quadratic model) from the batch's per-sample
losses :math:`l_i`, projected gradients :math:`U^\top g_i` and projected Hessians :math:`U^\top H_i U`:
:func:`~lightning_hessian.formulas.stabilization.probe_variance`. No weight is perturbed: the probes are
integrated out in closed form.

What is logged (tags of :mod:`lightning_hessian.tags`): the criterion :math:`S_D / (k(k+1))` against
:math:`k` = samples seen, :math:`S_D` itself (the landscape's part: the :math:`1/(k(k+1))` is the running
mean's, true of any bounded losses) and :math:`S_0` = the plain variance of the per-sample losses (the
probe-free value term), so that :math:`S_D - S_0` shows what the curvature-aligned probes add. A curve of
the criterion that falls like :math:`k^{-2}` says :math:`S_D` stayed bounded, the assumption of [KG]'s
rate; one that falls slower says the per-sample landscapes spread apart as training goes on.

Cost (per measurement, on :math:`n` curvature samples): :math:`n` per-sample forwards and ``create_graph``
backwards and :math:`n D` per-sample Hessian-vector products: about :math:`D + 1` whole-batch products in
arithmetic, but each sample is its own small graph, so on small models the wall time is that of more:
measured on the tests' nanoGPT (6.9k parameters, batch 8, one thread) 16 / 24 / 45 whole-batch product
times for ``D = 2 / 4 / 8`` (0.2-0.6 s). Hence opt-in. The subspace comes free from the whole-model
Lanczos run of :func:`~lightning_hessian.tracking.track_model` (its top :math:`D` Ritz vectors; at least
:math:`D` Lanczos steps).

References:
    [KG] N. Kiselev, A. Grabovoy, "Curvature-Aligned Probing for Local Loss-Landscape Stabilization",
        arXiv:2604.14870.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian import tags
from lightning_hessian._context import curvature_context
from lightning_hessian.batches import as_batches, find_tensors, map_tensors, split_batch
from lightning_hessian.blocks import model_block
from lightning_hessian.errors import NonFiniteLossError
from lightning_hessian.formulas.stabilization import expected_criterion, probe_variance
from lightning_hessian.loss_calls import LossFn

__all__ = ["Stabilization", "measure_stabilization", "subspace_terms"]


@dataclass
class Stabilization:
    """One live measurement of the curvature-aligned criterion.

    Attributes:
        samples_seen: ``k``, the training samples seen so far.
        dim: ``D``, the subspace's dimension. sigma: the probes' standard deviation per coordinate.
        variance: ``S_D = E_z Var_i[l_i(w + Uz)]``. value_variance: ``S_0``, the per-sample losses' variance.
        criterion: ``S_D / (k (k+1))``, the expected ``Δ_2^(D)(k)``.
        samples: curvature samples it was measured on. products: per-sample Hessian-vector products taken.
        seconds: wall time.
    """

    samples_seen: int
    dim: int
    sigma: float
    variance: float
    value_variance: float
    criterion: float
    samples: int
    products: int
    seconds: float

    def scalars(self, reference: float | None = None) -> dict[str, float]:
        """Tag -> value; ``reference`` (an ``S_D`` to compare with, e.g. the first one) adds the
        ``O(k^-2)`` reference line ``reference / (k (k+1))``."""
        out = {
            tags.STABILIZATION_CRITERION: self.criterion,
            tags.STABILIZATION_VARIANCE: self.variance,
            tags.STABILIZATION_VALUE_VARIANCE: self.value_variance,
            tags.STABILIZATION_SAMPLES: float(self.samples_seen),
        }
        if reference is not None:
            out[tags.STABILIZATION_REFERENCE] = float(expected_criterion(self.samples_seen, reference))
        return {tag: float(v) for tag, v in out.items() if math.isfinite(v)}


def _check_vectors(vectors: Tensor, numel: int) -> Tensor:
    if (
        not isinstance(vectors, Tensor)
        or vectors.ndim != 2
        or vectors.shape[0] != numel
        or vectors.shape[1] < 1
    ):
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(
            f"vectors must be a (P, D) tensor of D >= 1 whole-model directions, P = {numel} trainable "
            f"entries in the order of model.named_parameters() (e.g. ModelCurvature.subspace); got {shape}."
        )
    return vectors.detach().to(device="cpu", dtype=torch.float64)


def _samples(batch: Any) -> list[tuple[Any, int]]:
    """The batch's samples one by one (the criterion is a variance over samples)."""
    try:
        return split_batch(batch, 1)
    except ValueError:
        shapes = [tuple(t.shape) for t in find_tensors(batch)]
        raise ValueError(
            "The stabilisation criterion is a variance over the curvature batch's samples, so it splits the "
            f"batch along the first dimension of its tensors, but they do not share one ({shapes}): give "
            "every tensor the batch size first, or leave stabilization= off."
        ) from None


def subspace_terms(
    model: nn.Module, loss_fn: LossFn, data: Any, vectors: Tensor, *, mode: str = "eval"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample losses, gradients and Hessians of ``model`` projected on the columns of ``vectors``.

    Every batch of ``data`` is split into its samples (first dimension, as ``chunk_size=1`` does), and
    ``loss_fn(model, sample)`` is each sample's loss. The model is left as found (weights, ``.grad``,
    buffers, train/eval flags, RNG streams: :func:`~lightning_hessian._context.curvature_context`).

    Args:
        model: the model. loss_fn: ``loss_fn(model, batch)``, the scalar loss (as for ``analyze``).
        data: one batch or several (``Batches``, a list of batches).
        vectors: ``(P, D)`` orthonormal whole-model directions ``U`` (trainable parameters in the order of
            ``model.named_parameters()``, each flattened row-major).
        mode: ``"eval"``, ``"train"`` or ``"keep"``, as for ``analyze``.

    Returns:
        ``(values (n,), gradients (n, D), hessians (n, D, D))`` in float64 on the CPU: ``l_i``,
        ``U^T ∇l_i`` and ``U^T ∇²l_i U`` for the ``n`` samples.
    """
    whole = model_block(model, "model")
    u = _check_vectors(vectors, whole.numel)
    named = dict(model.named_parameters())
    params = [named[name] for name in whole.params]
    device, dtype = params[0].device, params[0].dtype
    columns = [_split(u[:, j].to(device=device, dtype=dtype), params) for j in range(u.shape[1])]
    values, gradients, hessians = [], [], []
    with curvature_context(model, mode):
        for batch in as_batches(data):
            for sample, _ in _samples(batch):
                sample = map_tensors(sample, lambda t: t.to(device))
                loss = loss_fn(model, sample)
                if not (isinstance(loss, Tensor) and loss.numel() == 1):
                    raise TypeError("loss_fn must return the scalar loss of the batch it is given.")
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"A curvature sample's loss is {float(loss)}: the model has diverged (or the sample "
                        "is bad); the stabilisation criterion needs finite losses."
                    )
                grads = torch.autograd.grad(loss, params, create_graph=True)
                flat = torch.cat([g.reshape(-1) for g in grads])
                rows = []
                for column in columns:  # one per-sample Hessian-vector product per direction
                    direction = torch.cat([c.reshape(-1) for c in column])
                    hv = torch.autograd.grad(flat @ direction, params, retain_graph=True)
                    rows.append(torch.cat([h.reshape(-1) for h in hv]).detach().to("cpu", torch.float64))
                values.append(float(loss.detach()))
                gradients.append(u.T @ flat.detach().to("cpu", torch.float64))
                hessians.append(u.T @ torch.stack(rows, 1))
                del grads, flat
    return torch.tensor(values, dtype=torch.float64), torch.stack(gradients), torch.stack(hessians)


def _split(vector: Tensor, params: list[Tensor]) -> list[Tensor]:
    pieces, offset = [], 0
    for p in params:
        pieces.append(vector[offset : offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    return pieces


def measure_stabilization(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    vectors: Tensor,
    samples_seen: int,
    *,
    sigma: float = 0.01,
    mode: str = "eval",
) -> Stabilization:
    """[KG]'s criterion ``E Δ_2^(D)(k) = S_D / (k (k+1))`` at the current weights, ``k = samples_seen``.

    Args:
        model, loss_fn, data, vectors, mode: as for :func:`subspace_terms` (``data`` needs >= 2 samples).
        samples_seen: ``k >= 1``, the training samples seen so far (count every process's samples).
        sigma: the probes' standard deviation per subspace coordinate, in parameter units
            (``E||Uz||² = D σ²``); the quadratic model must hold within it (default ``0.01``).

    Returns:
        A :class:`Stabilization`; ``.scalars()`` gives the tags to log.
    """
    if isinstance(samples_seen, bool) or not isinstance(samples_seen, int) or samples_seen < 1:
        raise ValueError(f"samples_seen must be an int >= 1 (training samples so far), got {samples_seen!r}.")
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0 (parameter units), got {sigma!r}.")
    began = time.perf_counter()
    values, gradients, hessians = subspace_terms(model, loss_fn, data, vectors, mode=mode)
    if values.shape[0] < 2:
        raise ValueError(
            "The stabilisation criterion needs the spread of per-sample losses: give curvature data with at "
            f"least 2 samples (first dimension of the batch), got {values.shape[0]}."
        )
    variance = float(probe_variance(values, gradients, hessians, float(sigma)))
    return Stabilization(
        samples_seen=samples_seen,
        dim=gradients.shape[1],
        sigma=float(sigma),
        variance=variance,
        value_variance=float(values.var()),
        criterion=float(expected_criterion(samples_seen, variance)),
        samples=values.shape[0],
        products=values.shape[0] * gradients.shape[1],
        seconds=time.perf_counter() - began,
    )
