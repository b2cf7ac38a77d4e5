"""HessianMonitor / CurvatureTracker ``products=``: validation, strategies at setup, the backend recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _lightning import TinyTransformer, fit
from _models import loss_fn, make_batch, make_model

from lightning_hessian import CurvatureTracker, HessianMonitor, find_blocks, tags
from lightning_hessian import products as backends
from lightning_hessian.settings import AnalysisSettings
from lightning_hessian.tracker import TIERS

QUIET = dict(figures=False, theory=False, html_report=False)


def test_products_is_validated_once_at_construction():
    assert AnalysisSettings(products="auto").kwargs()["products"] == "auto"
    with pytest.raises(ValueError, match="products must be one of"):
        HessianMonitor(products="fd")
    with pytest.raises(ValueError, match="Hessian products only"):
        HessianMonitor(products="finite_difference", split=True, loss_fn=lambda m, b: None)
    with pytest.raises(ValueError, match="products must be one of"):
        CurvatureTracker(analysis={"products": "exact_products"})


def _setup(monitor: HessianMonitor, strategy) -> None:
    # stage "validate": setup checks the strategy, then stops (the fit checks need a real Trainer)
    monitor.setup(SimpleNamespace(strategy=strategy), TinyTransformer(), "validate")


class _Mesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tensor_parallel: int) -> None:
        self.tensor_parallel = tensor_parallel

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.tensor_parallel if name == "tensor_parallel" else 2)


def _named(name: str, **attributes):
    return type(name, (), attributes)()


def test_setup_lets_fsdp2_through_with_finite_differences_and_refuses_what_cannot_be_measured(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    monkeypatch.setattr(backends, "_SAID", set())
    with pytest.raises(RuntimeError, match=r'ModelParallelStrategy shards.*products="finite_difference"'):
        _setup(HessianMonitor(), ModelParallelStrategy())  # "exact" is the default
    monitor = HessianMonitor(products="auto")
    with pytest.warns(UserWarning, match=r'products="auto".*ModelParallelStrategy shards the parameters'):
        _setup(monitor, ModelParallelStrategy())
    assert "ModelParallelStrategy" in monitor._exact_unavailable
    _setup(HessianMonitor(products="finite_difference"), ModelParallelStrategy())
    with pytest.raises(RuntimeError, match="dtype=None and chunk_size=None"):
        _setup(HessianMonitor(products="auto", dtype=torch.float64), ModelParallelStrategy())
    with pytest.raises(RuntimeError, match="Hessian products only"):
        _setup(HessianMonitor(products="auto", split=True, loss_fn=loss_fn), ModelParallelStrategy())
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2"):
        _setup(HessianMonitor(products="auto"), _named("ModelParallelStrategy", _device_mesh=_Mesh(2)))
    _setup(HessianMonitor(products="auto"), _named("ModelParallelStrategy", _device_mesh=_Mesh(1)))

    with pytest.raises(RuntimeError, match=r"FSDPStrategy strategy.*FSDP1.*ModelParallelStrategy"):
        _setup(HessianMonitor(products="auto"), FSDPStrategy())
    for name in ("DeepSpeedStrategy", "XLAStrategy"):
        with pytest.raises(RuntimeError, match=f"does not support the {name} strategy: .+ DDP"):
            _setup(HessianMonitor(products="auto"), _named(name))
    monitor = HessianMonitor(products="auto")
    _setup(monitor, DDPStrategy())
    assert monitor._exact_unavailable is None


def _blocks():
    """Two of TinyTransformer's blocks as Block objects: no layout probe (a one-off forward, not a pass)."""
    return find_blocks(TinyTransformer(), warn=False)[2:4]


def _kernel_spy(seen: list[bool]):
    """TinyTransformer's loss that records whether the fused attention kernels were allowed."""

    def spy(module, batch):
        seen.append(torch.backends.cuda.flash_sdp_enabled())  # False under the math-kernel switch
        return F.cross_entropy(module(batch[0]), batch[1])

    return spy


@pytest.mark.parametrize("products", ["finite_difference", "exact"])
def test_full_passes_record_their_backend_and_finite_differences_keep_the_models_kernels(tmp_path, products):
    seen: list[bool] = []
    spy = _kernel_spy(seen)
    monitor = HessianMonitor(every_n_steps=2, products=products, loss_fn=spy, blocks=_blocks(), **QUIET)
    fit(tmp_path, [monitor], max_steps=2)
    report = monitor._last_report
    assert [r.step for r in monitor.history] == [2]
    assert report.settings["products"] == products
    assert {b.products for b in report} == {products}
    assert seen and set(seen) == {products == "finite_difference"}
    assert f"({products} products)" in report.markdown() and f"({products} products)" in report.table()


def _plan_at(steps: set[int]):
    def plan(self, training_seconds, step):
        self.planner.observe(training_seconds, step)
        return list(TIERS) if step + 1 in steps else []

    return plan


def test_budget_mode_tiers_take_the_backend_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(CurvatureTracker, "plan", _plan_at({2, 3}))
    seen: list[bool] = []
    monitor = HessianMonitor(
        budget=0.5, products="finite_difference", loss_fn=_kernel_spy(seen), blocks=_blocks(), **QUIET
    )
    fit(tmp_path, [monitor], max_steps=3)
    latest = monitor.tracker.latest
    assert [r.step for r in monitor.history] == [2, 3]
    assert latest.full.products == latest.settings["products"] == "finite_difference"
    measured = [b for b in latest.blocks.values() if b.top_eigenvalues]
    assert len(measured) == 2 and {b.products for b in measured} == {"finite_difference"}
    assert seen and all(seen)  # no pass switched to the math kernel


def test_tracker_with_finite_differences_leaves_weights_grads_buffers_flags_and_rng_alone():
    model = make_model("nanogpt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tracker = CurvatureTracker(
        analysis={"products": "finite_difference", "blocks": ["transformer.h.0.attn.k"]}
    )
    loss_fn(model, make_batch("nanogpt", seed=1)).backward()
    tracker.snapshot(model)
    optimizer.step()
    loss_fn(model, make_batch("nanogpt", seed=2)).backward()  # .grad of an accumulation window in progress
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer_state = {k: v.clone() for k, v in optimizer.state[model.transformer.wte.weight].items()}
    rng = torch.get_rng_state()
    found = tracker.measure(TIERS, model, loss_fn, make_batch("nanogpt", seed=3), 1, optimizer)
    assert set(found.kinds) == set(TIERS) and tracker.latest.full.products == "finite_difference"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert all(
        torch.equal(v, optimizer.state[model.transformer.wte.weight][k]) for k, v in optimizer_state.items()
    )
    assert torch.equal(rng, torch.get_rng_state()) and all(m.training for m in model.modules())


@pytest.mark.parametrize("products", ["finite_difference", "exact"])
def test_the_stabilization_criterion_is_left_out_with_finite_differences_and_said(products):
    model = make_model("nanogpt")
    notes: list[str] = []
    tracker = CurvatureTracker(
        analysis={"products": products, "blocks": None}, stabilization=2, note=notes.append
    )
    tracker.count_samples(8)
    found = tracker.measure(["model"], model, loss_fn, make_batch("nanogpt", seed=3), 1)
    measured = tags.STABILIZATION_CRITERION in found.scalars
    said = any("stabilisation criterion takes exact" in n for n in notes)
    assert (measured, said) == (products == "exact", products == "finite_difference")
