"""compare_block_bound: [P] Thm 6 on a model's own post-norm layer, against the dense Hessian (float64)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from _dense import dense_hessian
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import Batches, HessianMonitor, analyze, model_block, tags
from lightning_hessian.block_theory import compare_block_bound

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int = 1) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = (p(x).reshape(b, n, h, d // h).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(
            q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1
        )  # forward AD for the dense reference
        return (a @ v).transpose(1, 2).reshape(b, n, d)


class _Layer(nn.Module):
    """[P]'s block (post-norm) or, with ``pre_norm``, the pre-norm variant the theorem does not cover."""

    def __init__(self, d=4, d_ff=6, heads=1, affine=False, pre_norm=False, act=F.relu) -> None:
        super().__init__()
        self.attn = _Attention(d, heads)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=affine)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=affine)
        self.linear1 = nn.Linear(d, d_ff, bias=False)
        self.linear2 = nn.Linear(d_ff, d, bias=False)
        self.pre_norm, self.act = pre_norm, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.linear2(self.act(self.linear1(self.norm2(x))))
        y = self.norm1(x + self.attn(x))
        return self.norm2(self.linear2(self.act(self.linear1(y))) + y)


class _Net(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.layer = _Layer(**kwargs)
        self.register_buffer("calls", torch.zeros(()))  # a running statistic, as BatchNorm keeps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.layer(x)


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _setup(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = _Net(**kwargs).double()
    g = torch.Generator().manual_seed(seed)
    batch = (
        torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
    )
    return model, batch


@pytest.mark.parametrize("act", [F.relu, F.gelu])
def test_the_bound_holds_for_the_dense_hessian_of_the_layer(act):
    model, batch = _setup(act=act)
    dense = dense_hessian(model, _mse, batch, model_block(model))
    exact = float(torch.linalg.matrix_norm(dense, ord=2))
    report = analyze(model, _mse, batch, full=True, tol=1e-10, max_iter=400, trace=False)
    result = compare_block_bound(model, _mse, batch, report, target=lambda b: b[1])
    (lb,) = result.layers.values()
    assert (
        lb.proven and lb.measured_kind == "layer" and lb.activation == ("relu" if act is F.relu else "gelu")
    )
    assert abs(lb.measured - exact) <= 1e-6 * exact  # the whole model is the layer: its norm, measured
    assert exact <= lb.bound
    scalars = result.scalars()
    assert scalars["theory/layer/block_bound"] == lb.bound
    assert 0 < scalars["theory/layer/block/bound_ratio"] <= 1
    assert "theory/layer/block_ratio" not in scalars


def test_a_loss_that_is_not_the_layers_mse_is_a_normaliser():
    model, batch = _setup()
    report = analyze(model, _mse, batch, tol=1e-8, trace=False)
    result = compare_block_bound(model, lambda m, b: 2 * _mse(m, b), batch, report, target=lambda b: b[1])
    (lb,) = result.layers.values()
    assert not lb.proven and lb.measured_kind == "max block"
    assert "not the mean-squared error" in result.proven_reason
    scalars = result.scalars()
    assert "theory/layer/block_ratio" in scalars and not any(t.endswith("/bound_ratio") for t in scalars)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"heads": 2}, "one head"),
        ({"affine": True}, "'norm'"),  # LayerNorm weights: blocks the theorem does not have
        ({"pre_norm": True}, "does not reproduce"),
    ],
)
def test_layers_outside_the_theorem_are_skipped_with_the_reason(kwargs, reason):
    model, batch = _setup(**kwargs)
    result = compare_block_bound(model, _mse, batch, target=lambda b: b[1])
    assert not result.layers
    assert reason in result.skipped["layer"]


def test_several_curvature_batches_average_the_per_sequence_bounds():
    model, batch = _setup()
    both = compare_block_bound(
        model,
        _mse,
        Batches([(batch[0][:1], batch[1][:1]), (batch[0][1:], batch[1][1:])]),
        target=lambda b: b[1],
    )
    one = [
        compare_block_bound(model, _mse, (batch[0][i : i + 1], batch[1][i : i + 1]), target=lambda b: b[1])
        for i in (0, 1)
    ]
    assert both.layers["layer"].proven
    mean = (one[0].layers["layer"].bound + one[1].layers["layer"].bound) / 2
    assert abs(both.layers["layer"].bound - mean) <= 1e-9 * mean


def test_a_model_that_is_the_layer_itself_is_named_model():
    model, batch = _setup()
    result = compare_block_bound(model.layer, _mse, batch, target=lambda b: b[1])
    assert list(result.layers) == ["model"] and result.layers["model"].proven


def test_without_a_target_the_layer_is_skipped():
    model, batch = _setup()
    result = compare_block_bound(model, _mse, batch)
    assert "target" in result.skipped["layer"] and not result.layers
    with pytest.raises(TypeError, match="callable"):
        compare_block_bound(model, _mse, batch, target=batch[1])


def test_the_comparison_leaves_the_model_untouched():
    model, batch = _setup()
    model.train()
    model.layer.linear1.weight.grad = torch.ones_like(model.layer.linear1.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    compare_block_bound(model, _mse, batch, target=lambda b: b[1], mode="train")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(m.training for m in model.modules())
    assert torch.equal(model.layer.linear1.weight.grad, torch.ones_like(model.layer.linear1.weight))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- live, in the callback -------------------------------------------------------------------------------


class _LitLayer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = _Net(d=4, d_ff=6)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 4, generator=g)
        return DataLoader(TensorDataset(x, torch.tanh(x.flip(1))), batch_size=4)


def test_live_full_block_bound_in_the_proven_setting(tmp_path):
    fired = []
    monitor = HessianMonitor(
        every_n_steps=2, full=True, theory_target=lambda b: b[1], figures=False, on_alert=fired.append
    )
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=4,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(_LitLayer())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    ratios = acc.Scalars(tags.theory_tag("model.layer/block", "bound_ratio"))
    assert [e.step for e in ratios] == [2, 4] and all(0 < e.value <= 1 for e in ratios)
    bounds = acc.Scalars(tags.theory_tag("model.layer", "block_bound"))
    measured = acc.Scalars(tags.theory_tag("model.layer", "block_measured"))
    assert all(abs(m.value / b.value - r.value) < 1e-6 for m, b, r in zip(measured, bounds, ratios))
    assert not [a for a in fired if a.rule == "bound_violation"]
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {ch.title: list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    bound_chart = charts["model.layer: measured ‖H‖ of the layer against the full-block bound [P] Thm 6"]
    assert len(bound_chart) == 2 and any("block_bound" in r for r in bound_chart)
    assert any(
        "block/bound_ratio" in r
        for r in charts["model.layer: measured / full-block bound (≤ 1 where proven)"]
    )
