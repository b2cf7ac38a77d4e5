"""Theory versus measured (lightning_hessian.theory): recognition, exactness in the papers' setting, the
normaliser elsewhere, and the live comparison in a real Trainer run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _dense import block_vector, dense_hessian
from _models import MODELS, loss_fn, make_batch, make_model
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import lightning_hessian.theory as theory_module
from lightning_hessian import Batches, HessianMonitor, analyze, compare_attention, find_blocks, tags
from lightning_hessian.dashboard import TEXT_THEORY
from lightning_hessian.theory import find_attention_layers

DT = torch.float64
# torch's forward-mode AD (dense references) registers decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


@pytest.fixture(autouse=True)
def math_attention():
    """The dense references differentiate twice through attention: the math kernel, as a pass uses."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


class PaperAttention(nn.Module):
    """The papers' layer: multi-head softmax attention, no output projection (optionally biases, causal)."""

    def __init__(self, d: int = 6, heads: int = 2, bias: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.num_heads, self.causal = heads, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = (t.view(b, n, h, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).reshape(b, n, d)


class Regressor(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = PaperAttention(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target)


def regression(seed=0, n=3, tokens=5, d=6, scale=1.0, dtype=DT, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Regressor(d=d, **kwargs).to(dtype)
        x = scale * torch.randn(n, tokens, d, dtype=dtype)
        target = torch.randn(n, tokens, d, dtype=dtype)
    return model, (x, target)


# --- the papers' setting: proven bounds -----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_proven_setting_bounds_hold_against_dense_hessians(causal, bias, scale):
    model, batch = regression(seed=int(10 * scale) + causal, bias=bias, causal=causal, scale=scale)
    report = analyze(model, mse_loss, batch, tol=1e-9, max_iter=200)
    result = compare_attention(model, mse_loss, batch, report, target=lambda b: b[1])
    assert result.proven_reason is None and result.skipped == {}
    (layer,) = result.layers.values()
    assert layer.proven and layer.mask == ("causal" if causal else "none") and layer.heads == 2
    blocks = {b.name: b for b in find_blocks(model)}
    scalars = result.scalars()
    for n, name in layer.blocks.items():
        hess = dense_hessian(model, mse_loss, batch, blocks[name])
        eig = torch.linalg.eigvalsh(hess)
        norm = float(eig.abs().max())
        # The measured block norm is the dense one, and it never exceeds the proven bound.
        assert layer.measured[n] == pytest.approx(norm, rel=1e-7)
        assert norm <= layer.bound[n] * (1 + 1e-9)
        assert scalars[tags.theory_tag(name, "bound_ratio")] == pytest.approx(norm / layer.bound[n], rel=1e-7)
        # The outer (Gauss-Newton) part is bounded by the outer bound.
        theta = block_vector(model, blocks[name])
        jac = torch.func.jacrev(lambda t, blk=blocks[name]: _output(model, batch, blk, t))(theta)
        jac = jac.reshape(-1, theta.numel())
        gn = 2.0 / batch[1].numel() * jac.T @ jac
        assert float(torch.linalg.matrix_norm(gn, 2)) <= layer.outer_bound[n] * (1 + 1e-9)
        assert layer.outer_bound[n] <= layer.bound[n] * (1 + 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_value_bound_is_exact_for_one_sequence(causal):
    """For one sequence H(V,V) has no functional part and its outer part c ||A X||^2 (x) I is exact: the
    bound equals the measured norm, which pins the per-head scaling, the bias augmentation and the mask."""
    model, batch = regression(seed=7, n=1, heads=3, causal=causal)
    report = analyze(model, mse_loss, batch, tol=1e-10, max_iter=200)
    (layer,) = compare_attention(model, mse_loss, batch, report, target=lambda b: b[1]).layers.values()
    value = find_blocks(model)[2]
    assert value.name == layer.blocks["V"]
    norm = float(torch.linalg.eigvalsh(dense_hessian(model, mse_loss, batch, value)).abs().max())
    assert layer.bound["V"] == pytest.approx(norm, rel=1e-9)
    assert layer.outer_bound["V"] == pytest.approx(norm, rel=1e-9)
    assert layer.measured["V"] == pytest.approx(norm, rel=1e-8)


def _output(model, batch, block, theta):
    from _dense import _substitute

    params = _substitute(model, block, theta)
    return torch.func.functional_call(model, params, (batch[0],))


def test_jacobian_norms_per_head_match_autograd():
    model, batch = regression(seed=3, n=2, heads=3, causal=True)
    result = compare_attention(model, mse_loss, batch, jacobian_samples=1, iters=60)
    (layer,) = result.layers.values()
    x = batch[0][0]
    d, heads = 6, 3
    dh = d // heads
    for n, proj in (("Q", model.attn.q), ("K", model.attn.k), ("V", model.attn.v)):
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            w0, b0 = proj.weight[rows].detach().clone(), proj.bias[rows].detach().clone()

            def head_output(w, b, proj=proj, rows=rows, h=h, n=n):
                weight = proj.weight.detach().clone()
                bias = proj.bias.detach().clone()
                weight = torch.cat([weight[: rows.start], w, weight[rows.stop :]])
                bias = torch.cat([bias[: rows.start], b, bias[rows.stop :]])
                name = {"Q": "q", "K": "k", "V": "v"}[n]
                params = {f"attn.{name}.weight": weight, f"attn.{name}.bias": bias}
                out = torch.func.functional_call(model, params, (x[None],))[0]
                return out[:, h * dh : (h + 1) * dh].reshape(-1)

            jw, jb = torch.func.jacrev(head_output, argnums=(0, 1))(w0, b0)
            jac = torch.cat([jw.reshape(jw.shape[0], -1), jb], 1)
            assert layer.jacobian[n][h] == pytest.approx(float(torch.linalg.matrix_norm(jac, 2)), rel=1e-8)


@pytest.mark.parametrize("causal", [False, True])
def test_gauss_newton_normaliser_is_the_dense_gauss_newton_norm_over_every_sequence(causal):
    """In the papers' setting the model's Gauss-Newton block is c (1/S) sum_s J_s^T J_s (two batches, five
    sequences, three heads): the layer's normaliser is its exact λ_max (dense eigvalsh), and the value
    block, whose Hessian has no functional part, measures a ratio of exactly 1."""
    model, (x, t) = regression(seed=5, n=5, heads=3, causal=causal)
    batches = Batches([(x[:2], t[:2]), (x[2:4], t[2:4])])  # equal sizes: the mean of the two losses
    data = [(x[:4], t[:4])]
    report = analyze(model, mse_loss, batches, tol=1e-10, max_iter=200)
    result = compare_attention(model, mse_loss, batches, report, iters=60)
    (layer,) = result.layers.values()
    scalars = result.scalars()
    blocks = {b.name: b for b in find_blocks(model)}
    for n, name in layer.blocks.items():
        theta = block_vector(model, blocks[name])
        jac = torch.func.jacrev(lambda th, blk=blocks[name]: _output(model, data[0], blk, th))(theta)
        jac = jac.reshape(-1, theta.numel())
        gn = 2.0 / t[:4].numel() * jac.T @ jac  # the Gauss-Newton block of the mean-squared error
        top = float(torch.linalg.eigvalsh(gn)[-1])
        assert max(layer.gauss_newton[n]) == pytest.approx(top, rel=1e-9)
        assert scalars[tags.theory_tag(name, "gauss_newton")] == pytest.approx(top, rel=1e-9)
        ratio = scalars[tags.theory_tag(name, "gauss_newton_ratio")]
        assert ratio == pytest.approx(report.blocks[name].top_eigenvalue / top, rel=1e-12)
    assert scalars[tags.theory_tag(layer.blocks["V"], "gauss_newton_ratio")] == pytest.approx(1, rel=1e-8)
    assert f"| {max(layer.gauss_newton['V']):.4g} |" in result.table()


def test_gauss_newton_per_head_matches_autograd():
    """Per head, c λ_max of the head's averaged Gram (rows of the projection's weight and bias)."""
    model, batch = regression(seed=6, n=3, heads=3)
    result = compare_attention(model, mse_loss, batch, iters=60)
    (layer,) = result.layers.values()
    x, d, heads = batch[0], 6, 3
    dh = d // heads
    scalars = result.scalars()
    for n, proj in (("Q", model.attn.q), ("K", model.attn.k), ("V", model.attn.v)):
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            w0, b0 = proj.weight[rows].detach().clone(), proj.bias[rows].detach().clone()

            def output(w, b, proj=proj, rows=rows, n=n):
                weight, bias = proj.weight.detach(), proj.bias.detach()
                weight = torch.cat([weight[: rows.start], w, weight[rows.stop :]])
                bias = torch.cat([bias[: rows.start], b, bias[rows.stop :]])
                name = {"Q": "q", "K": "k", "V": "v"}[n]
                params = {f"attn.{name}.weight": weight, f"attn.{name}.bias": bias}
                return torch.func.functional_call(model, params, (x,)).reshape(-1)

            jw, jb = torch.func.jacrev(output, argnums=(0, 1))(w0, b0)
            jac = torch.cat([jw.reshape(jw.shape[0], -1), jb], 1)
            want = float(torch.linalg.eigvalsh(2.0 / x.numel() * jac.T @ jac)[-1])
            assert layer.gauss_newton[n][h] == pytest.approx(want, rel=1e-9)
            tag = tags.theory_tag(f"{layer.layer}/head_{h}", f"gauss_newton_{n.lower()}")
            assert scalars[tag] == layer.gauss_newton[n][h]


def test_not_proven_when_the_loss_is_not_the_layer_mse():
    model, batch = regression(seed=1)

    def doubled(m, b):
        return 2 * mse_loss(m, b)

    result = compare_attention(model, doubled, batch, analyze(model, doubled, batch), target=lambda b: b[1])
    assert "mean-squared error" in result.proven_reason
    (layer,) = result.layers.values()
    assert not layer.proven and layer.bound is None
    assert not any(t.endswith("/bound_ratio") for t in result.scalars())


def test_not_proven_with_an_output_projection():
    model = make_model("vit", DT)
    batch = make_batch("vit", dtype=DT)
    result = compare_attention(model, loss_fn, batch, target=lambda b: b[1])
    assert "attention layers" in result.proven_reason  # two layers


# --- recognition and the normaliser on the common families ---------------------------------------------

EXPECTED = {  # family -> {compared layer: mask}, skipped layers (substring of the reason)
    "encoder": ({"encoder.layers.0.self_attn": "none", "encoder.layers.1.self_attn": "none"}, {}),
    "decoder": (
        {"decoder.layers.0.self_attn": "causal", "decoder.layers.1.self_attn": "causal"},
        {"decoder.layers.0.multihead_attn": "cross-attention", "decoder.layers.1.multihead_attn": "cross"},
    ),
    "mha": ({}, {"attn": "cross-attention"}),
    "vit": ({"blocks.0.attn": "none", "blocks.1.attn": "none"}, {}),
    "nanogpt": ({"transformer.h.0.attn": "causal", "transformer.h.1.attn": "causal"}, {}),
    "gpt2": ({"transformer.h.0.attn": "causal", "transformer.h.1.attn": "causal"}, {}),
    "bert": (
        {"bert.encoder.layer.0.attention.self": "none", "bert.encoder.layer.1.attention.self": "none"},
        {},
    ),
    "llama": ({}, {"model.layers.0.self_attn": "equal heads", "model.layers.1.self_attn": "equal heads"}),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_families_are_recognised_or_skipped_with_a_reason(family):
    model = make_model(family, DT)
    batch = make_batch(family, dtype=DT)
    report = analyze(model, loss_fn, batch, tol=1e-6)
    result = compare_attention(model, loss_fn, batch, report)
    compared, skipped = EXPECTED[family]
    assert {name: lt.mask for name, lt in result.layers.items()} == compared
    assert set(result.skipped) == set(skipped)
    for name, reason in skipped.items():
        assert reason in result.skipped[name]
    scalars = result.scalars()
    for lt in result.layers.values():
        assert not lt.proven and lt.bound is None
        for n, block in lt.blocks.items():
            top = report.blocks[block].top_eigenvalue
            assert scalars[tags.theory_tag(block, "outer_ratio")] == pytest.approx(top / lt.outer_bound[n])
            assert scalars[tags.theory_tag(block, "jacobian_norm")] == max(lt.jacobian[n]) > 0
            gn = scalars[tags.theory_tag(block, "gauss_newton")]
            assert gn == max(lt.gauss_newton[n]) > 0
            assert scalars[tags.theory_tag(block, "gauss_newton_ratio")] == pytest.approx(top / gn)
        assert scalars[tags.theory_tag(lt.layer, "input_norm")] > 0
    assert not any(t.endswith("/bound_ratio") for t in scalars)
    table = result.table()
    assert all(f"`{lt.blocks['Q']}`" in table for lt in result.layers.values())
    assert all(f"`{name}`: not compared" in table for name in result.skipped)


def test_comparison_leaves_the_model_untouched():
    model = make_model("nanogpt")
    model.train()
    batch = make_batch("nanogpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    compare_attention(model, loss_fn, batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_module_without_a_head_count_is_skipped():
    model, _ = regression()
    del model.attn.num_heads
    layers, skipped = find_attention_layers(model)
    assert layers == [] and "head count" in skipped["attn"]


def test_wrong_scaling_is_not_described_and_skipped():
    """A layer the papers' formula does not compute (here: no 1/sqrt(d) temperature) is left out."""
    model, batch = regression()
    original = model.attn.forward

    def unscaled(x):
        b, n, d = x.shape
        attn = model.attn
        q, k, v = (t.view(b, n, 2, -1).transpose(1, 2) for t in (attn.q(x), attn.k(x), attn.v(x)))
        return (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(b, n, d)

    model.attn.forward = unscaled
    result = compare_attention(model, mse_loss, batch, target=lambda b: b[1])
    assert result.layers == {} and "does not reproduce" in result.skipped["attn"]
    assert "not compared" in result.proven_reason
    model.attn.forward = original


def test_bad_arguments():
    model, batch = regression()
    with pytest.raises(ValueError, match="jacobian_samples"):
        compare_attention(model, mse_loss, batch, jacobian_samples=0)
    with pytest.raises(TypeError, match="target"):
        compare_attention(model, mse_loss, batch, target=batch[1])
    with pytest.raises(TypeError, match="theory_target"):
        HessianMonitor(theory_target=batch[1])
    with pytest.raises(ValueError, match="theory=True"):
        HessianMonitor(theory=False, theory_target=lambda b: b[1])
    with pytest.raises(ValueError, match="theory_samples"):
        HessianMonitor(theory_samples=0)


# --- live, in the callback -------------------------------------------------------------------------------


class AttentionRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Regressor(d=8, heads=2, causal=True)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 6, 8, generator=g)
        return DataLoader(TensorDataset(x, torch.tanh(x.flip(1))), batch_size=8)


def _fit(tmp_path, monitor, module=None, max_steps=6):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module or AttentionRegression())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _layout_charts(acc) -> dict[tuple[str, str], list[str]]:
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}


def test_live_theory_in_the_proven_setting(tmp_path):
    fired = []
    monitor = HessianMonitor(
        every_n_steps=2, theory_target=lambda b: b[1], figures=False, on_alert=fired.append
    )
    acc = _fit(tmp_path, monitor)
    scalar_tags = acc.Tags()["scalars"]
    for block in ("model.attn.q", "model.attn.k", "model.attn.v"):
        ratios = [e.value for e in acc.Scalars(tags.theory_tag(block, "bound_ratio"))]
        assert [e.step for e in acc.Scalars(tags.theory_tag(block, "bound_ratio"))] == [2, 4, 6]
        assert all(0 < r <= 1 for r in ratios)
        assert tags.theory_tag(block, "outer_ratio") in scalar_tags
        assert tags.theory_tag(block, "gauss_newton_ratio") in scalar_tags
    assert tags.theory_tag("model.attn/head_1", "jacobian_q") in scalar_tags
    assert tags.theory_tag("model.attn/head_1", "gauss_newton_k") in scalar_tags
    assert not [a for a in fired if a.rule == "bound_violation"]
    charts = _layout_charts(acc)
    theory_charts = {t: regexes for (cat, t), regexes in charts.items() if cat.endswith("Theory vs measured")}
    assert len(theory_charts) == 7
    logged = set(scalar_tags)
    for regexes in theory_charts.values():
        assert regexes and all(any(re_match(r, t) for t in logged) for r in regexes)
    text = acc.Tensors(TEXT_THEORY + "/text_summary")
    assert [e.step for e in text] == [2, 4, 6]
    assert "(proven)" in text[-1].tensor_proto.string_val[0].decode()
    assert "*measured / GN*" in text[-1].tensor_proto.string_val[0].decode()


def re_match(regex: str, tag: str) -> bool:
    import re

    return re.match(regex, tag) is not None


def test_a_violated_bound_in_the_proven_setting_is_a_critical_alert(tmp_path, monkeypatch):
    """The wiring from a bound below the measured curvature to the alert (the bound made 1000x too small)."""
    evaluate = theory_module._evaluate

    def shrunk(*args, **kwargs):
        lt = evaluate(*args, **kwargs)
        lt.bound = {n: v * 1e-3 for n, v in lt.bound.items()}
        return lt

    monkeypatch.setattr(theory_module, "_evaluate", shrunk)
    fired = []
    monitor = HessianMonitor(
        every_n_steps=2, theory_target=lambda b: b[1], figures=False, on_alert=fired.append
    )
    with pytest.warns(UserWarning, match="Bound violated"):
        _fit(tmp_path, monitor, max_steps=2)
    violations = [a for a in fired if a.rule == "bound_violation"]
    assert violations and all(a.severity == "critical" and a.tag.endswith("/bound_ratio") for a in violations)


def test_live_theory_as_a_normaliser_with_an_unproven_target(tmp_path):
    """With cross-entropy through a deeper model the bounds are not proven: ratios are logged, no bound_ratio,
    and the user is told once why."""
    from _lightning import TinyTransformer

    monitor = HessianMonitor(every_n_steps=3, theory_target=lambda b: b[0], figures=False)
    with pytest.warns(UserWarning, match="not proven") as record:
        acc = _fit(tmp_path, monitor, module=TinyTransformer(), max_steps=6)
    assert sum("not proven" in str(w.message) for w in record) == 1
    scalar_tags = acc.Tags()["scalars"]
    assert tags.theory_tag("layer.self_attn.q", "outer_ratio") in scalar_tags
    assert tags.theory_tag("layer.self_attn", "qk_over_v") in scalar_tags
    assert not any(t.endswith("bound_ratio") for t in scalar_tags)


def test_theory_off(tmp_path):
    acc = _fit(tmp_path, HessianMonitor(every_n_steps=3, theory=False, figures=False), max_steps=3)
    assert not any(t.startswith("theory/") for t in acc.Tags()["scalars"])
    assert math.isfinite(acc.Scalars(tags.block_tag("model.attn.q", "top_eigenvalue"))[-1].value)


def test_bounds_do_not_depend_on_the_chunking(monkeypatch):
    model, batch = regression(seed=5, n=19)
    monkeypatch.setattr(theory_module, "_CHUNK", 1000)
    (whole,) = compare_attention(model, mse_loss, batch, target=lambda b: b[1]).layers.values()
    monkeypatch.setattr(theory_module, "_CHUNK", 3)
    (chunked,) = compare_attention(model, mse_loss, batch, target=lambda b: b[1]).layers.values()
    for n in "QKV":
        assert chunked.outer_bound[n] == pytest.approx(whole.outer_bound[n], rel=1e-12)
        assert chunked.bound[n] == pytest.approx(whole.bound[n], rel=1e-12)


def test_frozen_biases_and_output_projection_are_part_of_the_layer():
    """LoRA-style freezing: only the in-projection weight trains. The frozen biases and output projection
    have no block, but the layer still computes with them, so the rebuild must use them."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.self_attn.in_proj_weight.requires_grad_(True)
    with torch.no_grad():
        layer.self_attn.in_proj_bias.normal_()
    x = torch.randn(3, 5, 8)
    result = compare_attention(layer, lambda m, b: m(b).pow(2).mean(), x)
    assert list(result.layers) == ["self_attn"] and result.skipped == {}
    assert result.layers["self_attn"].blocks == {"Q": "self_attn.q", "K": "self_attn.k", "V": "self_attn.v"}


def test_compiled_models_are_compared_under_their_own_names():
    model = make_model("nanogpt")
    batch = make_batch("nanogpt")
    plain = compare_attention(model, loss_fn, batch)
    compiled = compare_attention(torch.compile(model, backend="eager"), loss_fn, batch)
    assert list(compiled.layers) == list(plain.layers) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for name, lt in compiled.layers.items():
        assert lt.blocks == plain.layers[name].blocks
        assert lt.outer_bound == pytest.approx(plain.layers[name].outer_bound, rel=1e-6)


def test_training_mode_forward_leaves_normalisation_statistics_alone():
    from _lightning import TinyTransformer

    module = TinyTransformer()
    tokens = torch.randint(13, (8, 6))
    batch = (tokens, tokens[:, 0] % 3)
    before = {k: v.clone() for k, v in module.named_buffers()}

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    # With attention dropout active the formula does not describe the layer: it is skipped, with a reason.
    result = compare_attention(module, ce, batch, mode="train")
    assert result.layers == {} and "does not reproduce" in result.skipped["layer.self_attn"]
    module.layer.self_attn.dropout = 0.0
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    result = compare_attention(module, ce, batch, mode="train")
    assert list(result.layers) == ["layer.self_attn"]
    assert all(torch.equal(before[k], v) for k, v in module.named_buffers())
    assert module.bn.num_batches_tracked.item() == 0


def test_theory_warnings_are_given_once_per_kind(tmp_path):
    """A proven-setting check that fails with different numbers at every pass warns once."""

    def doubled(module, batch):
        return 2 * F.mse_loss(module(batch[0]), batch[1])

    monitor = HessianMonitor(every_n_steps=1, loss_fn=doubled, theory_target=lambda b: b[1], figures=False)
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, monitor, max_steps=4)
    notes = [str(w.message) for w in record if "not proven" in str(w.message)]
    assert monitor.passes == 4 and len(notes) == 1 and "mean-squared error" in notes[0]


def test_batches_in_the_containers_analyze_accepts():
    """The capture forward moves batches with the same mechanism as the curvature pass (UserDict here)."""
    from collections import UserDict

    model, (x, target) = regression(seed=2)
    batch = UserDict(x=x, target=target)

    def loss(m, b):
        return F.mse_loss(m(b["x"]), b["target"])

    result = compare_attention(model, loss, batch, target=lambda b: b["target"])
    assert result.proven_reason is None and list(result.layers) == ["attn"]
