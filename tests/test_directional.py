"""The cheap tier (:mod:`lightning_hessian.directional`) against exact curvatures, and its non-interference.

References: the dense Hessian (``tests/_dense.py``) on the attention probe, exact double-backward
Hessian-vector products on the nanoGPT (its whole-model dense Hessian trips torch.func's LayerNorm
forward-AD asymmetry, see ``_dense.py``), and closed forms on a quadratic.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dense import dense_hessian
from _models import loss_fn, make_batch, make_model
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import tags
from lightning_hessian.blocks import model_block
from lightning_hessian.directional import DirectionalCurvature, directional_curvature
from lightning_hessian.errors import NonFiniteLossError, PassFailedElsewhere


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _flat(tensors: dict[str, Tensor], model: nn.Module) -> Tensor:
    return torch.cat([tensors[n].reshape(-1).double() for n in _trainable(model)])


def _split(vector: Tensor, model: nn.Module) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, p in _trainable(model).items():
        out[name] = vector[offset : offset + p.numel()].view(p.shape).to(p.dtype).clone()
        offset += p.numel()
    return out


def _gradient_and_hvp(model: nn.Module, batch, vector: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Exact gradient and Hessian-vector product (double backward, math attention kernel) at the weights."""
    params = list(_trainable(model).values())
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=vector is not None)
        g = torch.cat([x.reshape(-1) for x in grads])
        if vector is None:
            return g.detach(), None
        hv = torch.autograd.grad(g @ vector.to(g.dtype), params)
    return g.detach(), torch.cat([x.reshape(-1) for x in hv]).double()


def _adam_like(g: Tensor, seed: int) -> Tensor:
    """A descent update like Adam's: the gradient's signs, softened, plus noise."""
    noise = torch.randn(g.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 1e-3 * (-(g.double() / (g.double().abs() + 1e-3)) + 0.3 * noise)


# --- update curvature -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-2)])
def test_update_curvature_matches_exact_along_adam_like_updates(dtype, tolerance):
    reference = make_model("nanogpt", torch.float64)
    batch64 = make_batch("nanogpt", 8, torch.float64)
    model, batch = make_model("nanogpt", dtype), make_batch("nanogpt", 8, dtype)
    g, _ = _gradient_and_hvp(reference, batch64)
    for seed in range(3):
        u = _adam_like(g, seed)
        exact = (u @ _gradient_and_hvp(reference, batch64, u)[1] / (u @ u)).item()
        result = directional_curvature(model, loss_fn, batch, _split(u, model), lr=1e-3, critical=False)
        assert result.update_curvature == pytest.approx(exact, rel=tolerance)
        assert (result.forwards, result.backwards, result.critical_status) == (3, 0, "skipped")


def test_update_curvature_and_preconditioned_curvature_match_the_dense_hessian():
    model, batch = make_model("mha", torch.float64), make_batch("mha", dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        hessian = dense_hessian(model.eval(), loss_fn, batch, model_block(model))
    g, _ = _gradient_and_hvp(model, batch)
    gen = torch.Generator().manual_seed(3)
    u = _adam_like(g, 3)
    diagonal = torch.rand(g.numel(), generator=gen, dtype=torch.float64) + 0.1
    precond = _split(diagonal, model)
    frozen = next(iter(precond))
    precond[frozen] = torch.full_like(precond[frozen], math.inf)  # a parameter the optimiser does not move
    d = g / _flat(precond, model)  # inf -> 0
    result = directional_curvature(model, loss_fn, batch, _split(u, model), lr=1e-3, preconditioner=precond)
    assert result.update_curvature == pytest.approx((u @ hessian @ u / (u @ u)).item(), rel=1e-6)
    expected = (d @ hessian @ d / (g @ d)).item()
    assert result.preconditioned_gradient_curvature == pytest.approx(expected, rel=5e-5)
    assert result.loss == pytest.approx(loss_fn(model, batch).item(), rel=1e-14)
    # L(θ), 2 for the update, the line search, the gradient and 2 for the preconditioned direction
    assert result.backwards == 1 and 1 + 2 + 2 + 1 + 2 <= result.forwards <= 1 + 2 + 12 + 1 + 2


@pytest.mark.slow  # the dense Hessian of 5,040 parameters takes about 20 s
def test_llama_update_and_preconditioned_curvature_match_its_dense_hessian_in_float64_and_float32():
    reference, batch64 = make_model("llama", torch.float64), make_batch("llama", 4, torch.float64)
    with sdpa_kernel(SDPBackend.MATH):  # LLaMA's RMSNorm is free of torch.func's LayerNorm asymmetry
        hessian = dense_hessian(reference.eval(), loss_fn, batch64, model_block(reference))
    g, _ = _gradient_and_hvp(reference, batch64)
    diagonal = 1e-3 + g.abs()  # Adam-like: P ~ |g|
    d = g / diagonal
    expected = (d @ hessian @ d / (g @ d)).item()
    for dtype, tolerance in ((torch.float64, 1e-5), (torch.float32, 1e-2)):
        model, batch = make_model("llama", dtype), make_batch("llama", 4, dtype)
        for seed in range(2):
            u = _adam_like(g, seed)
            result = directional_curvature(
                model, loss_fn, batch, _split(u, model), lr=1e-3, preconditioner=_split(diagonal, model)
            )
            assert result.update_curvature == pytest.approx((u @ hessian @ u / (u @ u)).item(), rel=tolerance)
            assert result.preconditioned_gradient_curvature == pytest.approx(expected, rel=tolerance)


# --- critical sharpness ---------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw - bᵀw (the batch is ignored)."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.zeros(len(b), dtype=torch.float64))

    def forward(self, batch: Tensor) -> Tensor:
        return 0.5 * self.w @ self.a @ self.w - self.b @ self.w + 0 * batch.sum()


def quadratic_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(batch)


def _quadratic(eigenvalues: list[float]) -> Quadratic:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64)
    )
    model = Quadratic(q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, torch.zeros(5))
    model.b = torch.randn(5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        model.w.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
    return model


@pytest.mark.parametrize("lr", [1e-3, 0.1, 3.0])  # η_c far above, near and below the step taken
def test_critical_sharpness_is_exact_on_a_quadratic(lr):
    model = _quadratic([0.5, 1.0, 2.0, 4.0, 8.0])
    g = model.a @ model.w.detach() - model.b
    p = -g + 0.3 * torch.ones(5, dtype=torch.float64)  # a descent direction, not the gradient's
    assert g @ p < 0
    result = directional_curvature(model, quadratic_loss, torch.zeros(1), {"w": lr * p}, lr=lr)
    expected = (p @ model.a @ p / -(g @ p)).item()
    assert result.critical_status == "bracketed"
    assert result.critical_sharpness == pytest.approx(expected, rel=1e-9)
    assert result.critical_lr == pytest.approx(2 / expected, rel=1e-9)
    assert 3 + 2 <= result.forwards <= 3 + 12


@pytest.mark.parametrize("delta", [1e-3, 1e-4])
def test_critical_sharpness_of_a_transformer_matches_the_quadratic_prediction(delta):
    model, batch = make_model("nanogpt", torch.float64), make_batch("nanogpt", 8, torch.float64)
    g, _ = _gradient_and_hvp(model, batch)
    r = _adam_like(g, 4)  # a direction of clearly positive curvature (a random one's is near zero)
    r -= (r @ g) / (g @ g) * g
    # mostly orthogonal to g, so the root -2 gᵀp / pᵀHp lies close to θ where the quadratic model holds:
    # the model's error is linear in delta (measured 4.3e-2, 4.7e-3, 4.8e-4 at delta 1e-2, 1e-3, 1e-4)
    p = r / r.norm() - delta * g / g.norm()
    hp = _gradient_and_hvp(model, batch, p)[1]
    expected = (p @ hp / -(g @ p)).item()
    lr = 1e-3
    result = directional_curvature(model, loss_fn, batch, _split(lr * p, model), lr=lr)
    assert result.critical_status == "bracketed"
    assert result.critical_sharpness == pytest.approx(expected, rel=10 * delta)


def test_no_descent_gives_none_not_infinity():
    model = _quadratic([1.0, 2.0, 3.0, 4.0, 5.0])
    g = model.a @ model.w.detach() - model.b
    result = directional_curvature(
        model, quadratic_loss, torch.zeros(1), {"w": 1e-2 * g}, lr=1e-2, max_forwards=6
    )
    assert (result.critical_lr, result.critical_sharpness, result.critical_status) == (None, None, "ascent")
    assert result.forwards == 3 + 6
    assert tags.CRITICAL_RATIO not in result.scalars(1e-2) and tags.UPDATE_CURVATURE in result.scalars(1e-2)
    flat = _quadratic([-1.0, -2.0, -3.0, -4.0, -5.0])  # descending forever along -g
    g = flat.a @ flat.w.detach() - flat.b
    result = directional_curvature(flat, quadratic_loss, torch.zeros(1), {"w": -1e-2 * g}, lr=1e-2)
    assert (result.critical_lr, result.critical_status) == (None, "flat")


# --- scalars, reduce, errors ----------------------------------------------------------------------------


def test_scalars_give_the_tags_and_ratios_to_two_over_lr():
    result = DirectionalCurvature(10.0, 0.05, 40.0, 300.0, 2.5, 10, 1, 0.1, "bracketed")
    assert result.scalars(0.01) == {
        tags.UPDATE_CURVATURE: 10.0,
        tags.CRITICAL_SHARPNESS: 40.0,
        tags.CRITICAL_RATIO: pytest.approx(0.2),
        tags.PRECONDITIONED_GRADIENT_CURVATURE: 300.0,
        tags.PRECONDITIONED_GRADIENT_RATIO: pytest.approx(1.5),
    }
    assert DirectionalCurvature(None, None, None, None, 2.5, 1, 0, 0.1).scalars(0.01) == {}


def test_reduce_sums_losses_sizes_and_gradients():
    model, batch = make_model("nanogpt", torch.float64), make_batch("nanogpt", 8, torch.float64)
    g, _ = _gradient_and_hvp(model, batch)
    update, precond = _split(_adam_like(g, 0), model), _split(torch.ones_like(g), model)
    alone = directional_curvature(model, loss_fn, batch, update, lr=1e-3, preconditioner=precond)
    # two processes holding the same batch: every sum doubles and the means stay
    twice = directional_curvature(
        model, loss_fn, batch, update, lr=1e-3, preconditioner=precond, reduce=lambda t: 2 * t
    )
    assert twice.loss == alone.loss and twice.critical_lr == alone.critical_lr
    assert twice.update_curvature == alone.update_curvature
    assert twice.preconditioned_gradient_curvature == pytest.approx(alone.preconditioned_gradient_curvature)


def test_a_failure_on_one_process_is_raised_on_every_process_after_the_sum():
    model, batch = make_model("nanogpt", torch.float64), make_batch("nanogpt", 8, torch.float64)
    update = _split(_adam_like(_gradient_and_hvp(model, batch)[0], 0), model)

    def failed_elsewhere(t: Tensor) -> Tensor:  # another process reports a failure in the last entry
        return 2 * t + torch.nn.functional.one_hot(torch.tensor(len(t) - 1), len(t)).to(t)

    with pytest.raises(PassFailedElsewhere):
        directional_curvature(model, loss_fn, batch, update, lr=1e-3, reduce=failed_elsewhere)
    sums = []

    def broken(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # raised here, but only after taking part in the sum
        directional_curvature(model, broken, batch, update, lr=1e-3, reduce=lambda t: sums.append(t) or t)
    assert len(sums) == 1 and sums[0][-1] == 1


def test_bad_input_gets_a_clear_error():
    model, batch = make_model("nanogpt"), make_batch("nanogpt")
    weight = "transformer.wpe.weight"
    shape = dict(model.named_parameters())[weight].shape
    with pytest.raises(ValueError, match="not trainable parameters"):
        directional_curvature(model, loss_fn, batch, {"nope": torch.zeros(1)}, lr=1e-3)
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        directional_curvature(model, loss_fn, batch, {weight: torch.zeros(3)}, lr=1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        directional_curvature(model, loss_fn, batch, None, lr=0.0)
    with pytest.raises(ValueError, match="no entry for"):
        directional_curvature(
            model, loss_fn, batch, None, lr=1e-3, preconditioner={weight: torch.ones(shape)}
        )
    with pytest.raises(ValueError, match="must be positive"):
        ones = {n: torch.ones_like(p) for n, p in model.named_parameters()} | {weight: torch.zeros(shape)}
        directional_curvature(model, loss_fn, batch, None, lr=1e-3, preconditioner=ones)
    with pytest.raises(NonFiniteLossError):
        directional_curvature(model, lambda m, b: loss_fn(m, b) * math.nan, batch, None, lr=1e-3)


# --- non-interference ------------------------------------------------------------------------------------


class Dropped(nn.Module):
    """A tiny model with dropout and batch norm: random masks and running statistics to disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens).mean(1)
        return self.head(self.drop(torch.tanh(self.norm(self.hidden(x)))))


def dropped_loss(model: nn.Module, batch) -> Tensor:
    tokens, labels = batch
    return nn.functional.cross_entropy(model(tokens), labels)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_call_leaves_weights_grads_buffers_rng_and_flags_bitwise_alone(mode):
    torch.manual_seed(0)
    model = Dropped().double()
    model.train()
    model.head.eval()  # a mixed flag that must come back
    batch = (torch.randint(11, (16, 5)), torch.randint(3, (16,)))
    dropped_loss(model, batch).backward()
    model.hidden.bias.grad = None  # one parameter without a .grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    update = {n: 1e-2 * torch.randn_like(p) for n, p in model.named_parameters()}
    precond = {n: torch.rand_like(p) + 0.5 for n, p in model.named_parameters()}
    torch.set_rng_state(rng)
    result = directional_curvature(
        model, dropped_loss, batch, update, lr=1e-2, preconditioner=precond, mode=mode
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
        assert value.dtype == state[key].dtype
    for name, p in model.named_parameters():
        assert (p.grad is None) == (grads[name] is None) and (
            p.grad is None or torch.equal(p.grad, grads[name])
        )
    assert result.backwards == 1 and math.isfinite(result.update_curvature)


def test_train_mode_draws_the_same_dropout_masks_at_every_point():
    torch.manual_seed(1)
    model = Dropped().double().train()
    model.norm = nn.Identity()  # batch statistics aside: only dropout is random
    batch = (torch.randint(11, (16, 5)), torch.randint(3, (16,)))
    params = list(model.parameters())
    u = [1e-2 * torch.randn_like(p) for p in params]
    rng = torch.get_rng_state()
    result = directional_curvature(
        model, dropped_loss, batch, dict(zip(dict(model.named_parameters()), u)), lr=1e-2, mode="train"
    )
    torch.set_rng_state(rng)  # the masks of the call: its forwards start from the caller's state
    grads = torch.autograd.grad(dropped_loss(model, batch), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, u)), params)
    exact = sum((h * v).sum() for h, v in zip(hv, u)).item() / sum(v.pow(2).sum() for v in u).item()
    assert result.update_curvature == pytest.approx(exact, rel=1e-5)


def test_a_preconditioner_on_a_sharded_model_is_refused_with_what_to_do(monkeypatch):
    """An FSDP2 model holds a shard of the gradient per process: P^-1 g would be wrong, so it is refused."""
    import lightning_hessian.directional as directional

    model = make_model("nanogpt", torch.float64)
    batch = make_batch("nanogpt", dtype=torch.float64)
    precond = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    monkeypatch.setattr(directional, "is_sharded", lambda m: m is model)
    with pytest.raises(ValueError, match="FSDP2-sharded"):
        directional_curvature(model, loss_fn, batch, None, preconditioner=precond, lr=1e-3)
    assert directional_curvature(model, loss_fn, batch, None, lr=1e-3).loss > 0  # without it: measured
