"""The float64 references every error is measured against: our Lanczos, scipy ``eigsh``, the dense Hessian."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from _models import loss_fn
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_hessian import Block, analyze

from . import common


def reference_tops(model: nn.Module, batch: Any, blocks: Sequence[Block] | None) -> dict[str, float]:
    """Top eigenvalues in float64 by our Lanczos: the whole model (``None``) at tol 1e-10, blocks at 1e-8.

    The tolerance bounds the Ritz residual relative to the eigenvalue, so the reference is within 1e-10
    (1e-8) of an eigenvalue, and in practice within residual^2 / gap: far below the 1e-4 being tested.
    """
    model64 = common.float64_copy(model)
    if blocks is None:
        report = analyze(
            model64,
            loss_fn,
            batch,
            blocks=None,
            full=True,
            smallest=False,
            trace=False,
            tol=1e-10,
            max_iter=400,
        )
        return {"model": report.full.top_eigenvalue}
    report = analyze(
        model64, loss_fn, batch, blocks=list(blocks), smallest=False, trace=False, tol=1e-8, max_iter=400
    )
    return {name: b.top_eigenvalue for name, b in report.blocks.items()}


def autograd_top(model: nn.Module, batch: Any) -> float:
    """Cross-check: scipy ``eigsh`` (tol 1e-12) on plain float64 double-backward products."""
    model64 = common.float64_copy(model)
    params = list(model64.parameters())
    grads = torch.autograd.grad(loss_fn(model64, batch), params, create_graph=True)
    n = sum(p.numel() for p in params)

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), device=common.DEVICE).split(
            [p.numel() for p in params]
        )
        hv = torch.autograd.grad(grads, params, [a.view_as(p) for a, p in zip(v, params)], retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).cpu().numpy()

    v0 = np.random.default_rng(0).standard_normal(n)
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    return float(eigsh(op, k=1, which="LA", tol=1e-12, v0=v0, return_eigenvectors=False)[0])


def dense_hessian(model: nn.Module, batch: Any, chunk: int = 256) -> Tensor:
    """The exact Hessian of the whole (float64) model, column chunks of ``vmap(jvp(grad(loss)))``.

    Not ``torch.func.hessian`` (``jacfwd(jacrev)``): on torch 2.13 that is wrong (and asymmetric) in the
    rows of LayerNorm weights whose input depends on other parameters; see the results' caveats.
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat: Tensor) -> Tensor:
        tensors = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return loss_fn(lambda x: functional_call(model, tensors, (x,)), batch)

    gradient = grad(loss)
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    columns = [
        vmap(lambda u: jvp(gradient, (theta,), (u,))[1])(eye[i : i + chunk])
        for i in range(0, len(eye), chunk)
    ]
    hessian = torch.cat(columns).T
    asymmetry = float((hessian - hessian.T).norm() / hessian.norm())
    if asymmetry > 1e-10:
        raise RuntimeError(f"dense Hessian not symmetric ({asymmetry:.1e}): the reference is broken")
    return (hessian + hessian.T) / 2


def tiny_references(model: nn.Module, batch: Any) -> Tensor:
    """The dense Hessian of the tiny model, after checking our float64 Lanczos against its top eigenvalue."""
    hessian = dense_hessian(model, batch)
    check = reference_tops(model, batch, None)["model"]
    dense_top = float(torch.linalg.eigvalsh(hessian)[-1])
    if common.relative(check, dense_top) > 1e-8:
        raise RuntimeError(f"our float64 Lanczos {check} disagrees with the dense top eigenvalue {dense_top}")
    return hessian
