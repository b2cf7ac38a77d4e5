"""``basis_device``: the Lanczos basis kept on another device than the operator (host memory for a full GPU).

On a CPU-only machine both devices are the CPU, so results must be bitwise those without the option; the
moves between devices are checked with a device that compares unequal to the tensors' (``cpu:0``), and the
per-step hand-over by recording every move (the CUDA test runs where a GPU is present).
"""

from __future__ import annotations

import pytest
import torch
from _dense import dense_hessian
from _models import loss_fn, make_batch, make_model
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import AnalysisSettings, CurvatureTracker, HessianMonitor, analyze, find_blocks
from lightning_hessian.estimators import DenseBlockOperator, lanczos, slq
from lightning_hessian.estimators._lanczos_core import LanczosChains
from lightning_hessian.tracking import track_model


def _symmetric(eigenvalues: list[float], seed: int) -> Tensor:
    values = torch.tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(
        torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(seed))
    )
    q = q.double()
    return (q * values) @ q.T


def _operator() -> tuple[DenseBlockOperator, list[Tensor]]:
    gen = torch.Generator().manual_seed(0)
    bulk = (0.05 * torch.randn(60, generator=gen, dtype=torch.float64)).tolist()
    matrices = [_symmetric([9.0, 4.0, -2.0, *bulk], 1), _symmetric([-3.0, 1.0, 0.5, *bulk[:20]], 2)]
    return DenseBlockOperator(matrices), matrices


def _record_moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every ``LanczosChains._move`` as ``(direction, vectors)``, whether or not the devices differ."""
    moves: list[tuple[str, int]] = []
    original = LanczosChains._move

    def move(self: LanczosChains, tensor: Tensor, device: torch.device) -> Tensor:
        rows = 1 if tensor.ndim == 1 else tensor.shape[0]
        moves.append(("to operator" if device == self.device else "to basis", rows))
        return original(self, tensor, device)

    monkeypatch.setattr(LanczosChains, "_move", move)
    return moves


def test_lanczos_with_the_basis_on_the_cpu_is_bitwise_the_same_and_matches_dense():
    op, matrices = _operator()
    plain = lanczos(op, 2, tol=1e-10, max_iter=80)
    kept = lanczos(op, 2, tol=1e-10, max_iter=80, basis_device="cpu")
    for a, b, matrix in zip(plain, kept, matrices):
        assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
        assert a.min_eigenvalue == b.min_eigenvalue and a.steps == b.steps
        exact = torch.linalg.eigvalsh(matrix)
        assert torch.allclose(b.eigenvalues, exact.flip(0)[:2], rtol=1e-9)
        assert abs(b.min_eigenvalue - exact[0].item()) < 1e-9 * exact.abs().max()
    assert all(torch.equal(a.nodes, b.nodes) for a, b in zip(slq(op), slq(op, basis_device="cpu")))


def test_every_step_moves_one_vector_to_the_operator_and_its_product_back(monkeypatch):
    op = DenseBlockOperator([_operator()[1][0]])
    chain = LanczosChains(torch.ones(1, op.sizes[0], dtype=torch.float64), basis_device="cpu")
    # Two "devices" that compare unequal to each other and to the tensors' plain "cpu": every hand-over
    # crosses, as between a GPU operator and a basis in host memory.
    chain.device, chain.basis_device = torch.device("cpu", 0), torch.device("cpu", 1)
    moves = _record_moves(monkeypatch)
    for _ in range(5):
        chain.advance(op.matmat([chain.current()])[0])
    assert moves == [("to operator", 1), ("to basis", 1)] * 5
    assert chain.moves == 10 and chain.lengths == [5]


def test_moves_count_the_vectors_that_cross_devices_and_none_on_one_device():
    chains = LanczosChains(torch.randn(3, 10, dtype=torch.float64))
    chains.current()
    assert chains.moves == 0 and chains.basis.device == chains.device
    elsewhere = LanczosChains(torch.randn(3, 10, dtype=torch.float64), basis_device="cpu:0")
    assert elsewhere.basis_device == torch.device("cpu", 0) and elsewhere.moves == 3  # the start vectors


def test_analyze_and_track_model_with_the_basis_on_the_cpu_give_the_same_report():
    model = make_model("nanogpt", torch.float64)
    batch = make_batch("nanogpt", dtype=torch.float64)
    blocks = find_blocks(model)[:2]
    kwargs = dict(blocks=blocks, full=True, tol=1e-6, max_iter=60, trace=False)
    plain = analyze(model, loss_fn, batch, **kwargs)
    kept = analyze(model, loss_fn, batch, **kwargs, basis_device="cpu")
    assert kept.settings["basis_device"] == "cpu" and plain.settings["basis_device"] is None
    for a, b in zip(plain, kept):
        assert (a.top_eigenvalues, a.min_eigenvalue, a.matvecs) == (
            b.top_eigenvalues,
            b.min_eigenvalue,
            b.matvecs,
        )
        assert torch.equal(a.ritz_vectors, b.ritz_vectors)
    block = blocks[0]
    with sdpa_kernel(SDPBackend.MATH):
        exact = torch.linalg.eigvalsh(dense_hessian(model.eval(), loss_fn, batch, block))
    assert abs(kept.blocks[block.name].top_eigenvalue / exact[-1].item() - 1) < 1e-6
    a = track_model(model, loss_fn, batch, blocks, tol=1e-4, max_iter=20)
    b = track_model(model, loss_fn, batch, blocks, tol=1e-4, max_iter=20, basis_device="cpu")
    assert (a.top_eigenvalue, a.matvecs) == (b.top_eigenvalue, b.matvecs) and torch.equal(
        a.top_vector, b.top_vector
    )


def test_the_monitor_and_the_tracker_keep_every_basis_where_asked(monkeypatch):
    seen: list[torch.device] = []
    original = LanczosChains.__init__

    def init(self: LanczosChains, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        seen.append(self.basis_device)

    monkeypatch.setattr(LanczosChains, "__init__", init)
    model = make_model("nanogpt")
    settings = HessianMonitor(basis_device="cpu:0").settings.kwargs()
    tracker = CurvatureTracker(analysis=settings)
    found = tracker.measure(["model", "blocks"], model, loss_fn, make_batch("nanogpt"), step=1)
    assert found.report is not None and found.scalars
    assert len(seen) >= 2 and set(seen) == {torch.device("cpu", 0)}  # the whole model's and a block's


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", 0, torch.float64])
def test_a_bad_basis_device_is_refused_with_what_to_pass(bad):
    with pytest.raises(ValueError, match=r"basis_device must be None .* 'cpu' or 'cuda:0'"):
        AnalysisSettings(basis_device=bad)
    with pytest.raises(ValueError, match="basis_device must be"):
        HessianMonitor(basis_device=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_operator_with_the_basis_in_host_memory():
    op, _ = _operator()
    gpu = DenseBlockOperator([m.cuda() for m in op.matrices])
    (on_gpu, _), (on_host, _) = lanczos(gpu, 2, tol=1e-10), lanczos(gpu, 2, tol=1e-10, basis_device="cpu")
    assert torch.allclose(on_gpu.eigenvalues, on_host.eigenvalues, rtol=1e-12)
    assert on_gpu.eigenvectors.is_cuda and not on_host.eigenvectors.is_cuda
