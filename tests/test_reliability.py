"""Reliability at scale (issue #6): mixed precision, errors and out-of-memory inside a pass, a memory budget
(``chunk_size``), batch containers and devices, activation checkpointing, ``torch.compile``, resuming after
skipped passes, sanity checks, and a soak smoke test."""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import os
import sys
import typing
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from _lightning import SEQ, TinyTransformer, fit, logged_metrics, pass_steps
from _models import loss_fn, make_batch, make_model
from _scripts import importing_from
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from lightning_hessian import (
    Batches,
    CurvatureOperator,
    HessianMonitor,
    analyze,
    find_blocks,
    model_block,
    tags,
)
from lightning_hessian._context import curvature_context
from lightning_hessian.callback import training_step_loss
from lightning_hessian.errors import ReentrantCheckpointError

# Deterministic cuBLAS for the CUDA test (must be set before CUDA starts; harmless elsewhere).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def token_loss(module, batch):
    tokens, labels = batch
    logits = module(tokens)
    return F.cross_entropy(logits, labels), logits


def assert_same_training(plain: L.Trainer, plain_module, watched: L.Trainer, watched_module, keys=()) -> None:
    """Weights, buffers, optimizer state and logged metrics bitwise equal."""
    assert plain.global_step == watched.global_step
    for (name, a), (_, b) in zip(plain_module.state_dict().items(), watched_module.state_dict().items()):
        assert torch.equal(a, b), name
    plain_opt, watched_opt = plain.optimizers[0].state_dict(), watched.optimizers[0].state_dict()
    for index, state in plain_opt["state"].items():
        assert all(torch.equal(v, watched_opt["state"][index][k]) for k, v in state.items())
    if keys:
        assert logged_metrics(plain.logger, keys) == logged_metrics(watched.logger, keys)


def in_curvature_pass() -> bool:
    """Whether loss_fn is being called by the curvature operator (not by another hook of the callback)."""
    return any(f.function == "forward" and f.filename.endswith("loss_calls.py") for f in inspect.stack(0))


def seeded(cls, *args):
    """A module built right after seeding, so two runs start from the same weights."""
    L.seed_everything(0, verbose=False)
    return cls(*args)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --- 1. precision ----------------------------------------------------------------------------------------


class RecordingTransformer(TinyTransformer):
    """Records the dtype of the logits and whether autocast was on in every training step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.training_dtypes: set[tuple[bool, torch.dtype]] = set()

    def forward(self, tokens):
        logits = super().forward(tokens)
        self.training_dtypes.add((torch.is_autocast_enabled("cpu"), logits.dtype))
        return logits


def test_bf16_mixed_training_is_unchanged_and_curvature_is_float32_or_float64(tmp_path):
    """bf16-mixed on CPU: training bitwise as without the callback; passes in float32 (autocast off) by
    default, in float64 on request, and equal to an fp32 analyze of the same weights and batches."""
    seen: dict[str, set] = {"32": set(), "64": set()}

    def recording(key):
        def loss(module, batch):
            value, logits = token_loss(module, batch)
            if in_curvature_pass():
                seen[key].add((torch.is_autocast_enabled("cpu"), logits.dtype, value.dtype))
            return value, logits

        return loss

    common = dict(every_n_steps=3, warm_start=False, figures=False, trace=True, trace_matvecs=8)
    m32 = HessianMonitor(loss_fn=recording("32"), name="f32", **common)
    m64 = HessianMonitor(loss_fn=recording("64"), dtype=torch.float64, name="f64", **common)
    plain, plain_module = fit(tmp_path / "plain", module=seeded(RecordingTransformer), precision="bf16-mixed")
    watched, module = fit(
        tmp_path / "watched", [m32, m64], module=seeded(RecordingTransformer), precision="bf16-mixed"
    )

    assert (True, torch.bfloat16) in module.training_dtypes  # training really ran under bf16 autocast
    assert_same_training(plain, plain_module, watched, module, ("train_loss", "train_acc"))
    assert pass_steps(m32) == pass_steps(m64) == [3, 6, 8]
    assert seen["32"] == {(False, torch.float32, torch.float32)}
    assert seen["64"] == {(False, torch.float64, torch.float64)}

    # The end-of-training pass equals analyze() on the final weights, outside any Trainer, in float32.
    for monitor in (m32, m64):
        kwargs = monitor.settings.kwargs()
        expected = analyze(module, monitor.loss_fn, Batches(monitor._batches), **kwargs).scalars()
        measured = monitor.history[-1].scalars
        block_tags = [t for t in expected if tags.parse_block_tag(t)]
        assert block_tags and all(math.isfinite(measured[t]) for t in block_tags)
        for tag in block_tags:
            assert measured[tag] == pytest.approx(expected[tag], rel=1e-6, abs=1e-9), tag
    # float64 agrees with float32 to float32 accuracy.
    top = tags.block_tag("model", "top_eigenvalue")
    assert m32.history[-1].scalars[top] == pytest.approx(m64.history[-1].scalars[top], rel=1e-3)


@needs_cuda
def test_cuda_16_mixed_leaves_the_grad_scaler_and_weights_alone(tmp_path):
    """fp16 mixed precision on CUDA: the GradScaler's scale and growth tracker, the weights and the
    optimizer state are bitwise those of a run without the callback; the pass runs in float32."""
    seen = set()

    def loss(module, batch):
        value, logits = token_loss(module, batch)
        if in_curvature_pass():
            seen.add((torch.is_autocast_enabled("cuda"), logits.dtype, logits.device.type))
        return value

    def run(callbacks):
        L.seed_everything(0, verbose=False)
        module = TinyTransformer()
        trainer = L.Trainer(
            max_steps=8,
            accelerator="gpu",
            devices=1,
            precision="16-mixed",
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module)
        scaler = trainer.precision_plugin.scaler
        return trainer, module, (scaler.get_scale(), int(scaler._get_growth_tracker()))

    torch.use_deterministic_algorithms(True)
    try:
        plain, plain_module, plain_scaler = run([])
        again, again_module, again_scaler = run([])
        assert again_scaler == plain_scaler
        monitor = HessianMonitor(every_n_steps=2, loss_fn=loss, figures=False)
        watched, module, watched_scaler = run([monitor])
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same_training(plain, plain_module, again, again_module)  # the GPU run itself is reproducible
    assert pass_steps(monitor) == [2, 4, 6, 8] and monitor.passes == 4
    assert seen == {(False, torch.float32, "cuda")}
    assert watched_scaler == plain_scaler
    assert_same_training(plain, plain_module, watched, module)
    print(f"CUDA 16-mixed: scaler (scale, growth tracker) {plain_scaler} with and without the callback")


# --- 2. errors, out-of-memory and the memory budget ------------------------------------------------------


def test_out_of_memory_inside_a_pass_is_reported_once_and_training_goes_on(tmp_path):
    """An OOM in the middle of a pass (during the products: chunk_size rebuilds a graph per call) is caught,
    reported once with its cause and a hint, and training is bitwise unchanged; on_error='raise' re-raises."""
    calls = []

    def exploding(module, batch):
        calls.append(1)
        if len(calls) % 5 == 0:  # inside the products of the pass, not at its start
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(calls)}.00 MiB")
        return token_loss(module, batch)[0]

    plain, plain_module = fit(tmp_path / "plain")
    monitor = HessianMonitor(every_n_steps=2, loss_fn=exploding, chunk_size=3, figures=False)
    with pytest.warns(UserWarning, match="OutOfMemoryError") as record:
        watched, module = fit(tmp_path / "watched", [monitor])
    messages = [str(w.message) for w in record if "OutOfMemoryError" in str(w.message)]
    assert len(messages) == 1 and "chunk_size=" in messages[0] and "Tried to allocate" in messages[0]
    assert len(calls) > 5 and monitor.passes == 0
    assert_same_training(plain, plain_module, watched, module, ("train_loss",))

    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):
        fit(tmp_path / "raise", [HessianMonitor(every_n_steps=2, loss_fn=exploding, on_error="raise")])


def chunk_model_and_data():
    model = make_model("encoder", torch.float64)
    batches = Batches(
        [make_batch("encoder", 7, torch.float64, seed=1), make_batch("encoder", 3, torch.float64, seed=2)]
    )
    return model, batches


def loss_and_logits(model, batch):
    (tokens,), targets = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), logits


@pytest.mark.slow
def test_chunked_pass_equals_the_unchunked_pass_in_float64(chunk_size=3):
    """Two batches (7 and 3 samples) in chunks of 3 (3+3+1, 3): the same loss,
    eigenvalues, traces and Gauss-Newton / functional split to 1e-10 of the block's spectral scale."""
    model, data = chunk_model_and_data()
    blocks = [b for b in find_blocks(model) if b.layer == 1 or b.kind in ("embedding", "norm")]
    kwargs = dict(blocks=blocks, full=True, top_k=2, split=True, tol=1e-10, max_iter=200, trace_matvecs=12)
    whole = analyze(model, loss_and_logits, data, **kwargs)
    chunked = analyze(model, loss_and_logits, data, chunk_size=chunk_size, **kwargs)
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-12)
    assert chunked.settings["chunk_size"] == chunk_size
    for a, b in zip([*whole.blocks.values(), whole.full], [*chunked.blocks.values(), chunked.full]):
        assert a.name == b.name and a.converged and b.converged
        scale = abs(a.top_eigenvalue)
        pairs = [
            *zip(a.top_eigenvalues, b.top_eigenvalues),
            (a.min_eigenvalue, b.min_eigenvalue),
            (a.trace, b.trace),
            (a.gauss_newton_top, b.gauss_newton_top),
            (a.functional_top, b.functional_top),
            (a.functional_min, b.functional_min),
        ]
        for x, y in pairs:
            assert abs(x - y) < 1e-10 * scale, (a.name, x, y)


def test_chunks_replay_their_dropout_draws():
    """mode='train' with dropout: every rebuild of a chunk's graph uses the same dropout masks, so the
    operator is one fixed (symmetric) matrix across products."""
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    block = model_block(model)
    with curvature_context(model, "train"):
        op = CurvatureOperator(
            model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, y), [block], chunk_size=4
        )
        vectors = torch.randn(block.numel, 2, dtype=torch.float64)
        first, second = op.matmat([vectors])[0], op.matmat([vectors])[0]
        basis = op.matmat([torch.eye(block.numel, dtype=torch.float64)])[0]
    assert torch.equal(first, second)
    assert torch.allclose(basis, basis.T, atol=1e-12)  # one fixed symmetric matrix


def test_chunk_size_errors():
    model = make_model("encoder")
    (tokens,), targets = make_batch("encoder", 6)
    flat = ((tokens,), targets.reshape(-1))  # targets flattened: their first dim is not the batch size
    with pytest.raises(ValueError, match=r"chunk_size=2 splits each batch along its first dimension"):
        analyze(model, loss_fn, flat, chunk_size=2)
    analyze(model, loss_fn, flat, chunk_size=6, blocks=None, full=True, trace=False)  # one chunk: fine
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            analyze(model, loss_fn, make_batch("encoder"), chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            HessianMonitor(chunk_size=bad)


def test_monitor_with_chunk_size_measures_the_same_curvature(tmp_path):
    common = dict(every_n_steps=4, dtype=torch.float64, warm_start=False, figures=False, tol=1e-8)
    whole = HessianMonitor(name="whole", **common)
    chunked = HessianMonitor(chunk_size=3, name="chunked", **common)
    fit(tmp_path, [whole, chunked], max_steps=4)
    assert pass_steps(whole) == pass_steps(chunked) == [4]
    a, b = whole.history[-1].scalars, chunked.history[-1].scalars
    blocks = {tags.parse_block_tag(t)[0] for t in a if tags.parse_block_tag(t)}
    assert len(blocks) > 5
    for block in blocks:
        top, low = tags.block_tag(block, "top_eigenvalue"), tags.block_tag(block, "min_eigenvalue")
        assert abs(b[top] - a[top]) < 1e-8 * abs(a[top]), block
        assert abs(b[low] - a[low]) < 1e-8 * abs(a[top]), block


# --- 3. batch containers and devices ---------------------------------------------------------------------


@dataclasses.dataclass
class ImageBatch:
    images: torch.Tensor
    labels: torch.Tensor


@dataclasses.dataclass(frozen=True)
class FrozenImageBatch:
    images: torch.Tensor
    labels: torch.Tensor


class Encoding(collections.UserDict):
    """Like transformers' BatchEncoding: a UserDict with extra attributes and a .to()."""

    def __init__(self, data=None, note: str = "") -> None:
        super().__init__(data)
        self.note = note

    def to(self, device):
        return Encoding({k: v.to(device) for k, v in self.items()}, self.note)


class ReadOnlyMapping(typing.Mapping):
    """A Mapping that is not a dict and cannot be rebuilt from one."""

    def __init__(self, images, labels) -> None:
        self._items = {"images": images, "labels": labels}

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return 2


class Opaque:
    """An object holding tensors that analyze cannot see into."""

    def __init__(self, images, labels) -> None:
        self.images, self.labels = images, labels


ImagePair = collections.namedtuple("ImagePair", ["images", "labels"])


def image_parts(batch):
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return batch[0][0], batch[1]
    if isinstance(batch, typing.Mapping):
        return batch["images"], batch["labels"]
    return batch.images, batch.labels


def image_loss(model, batch):
    images, labels = image_parts(batch)
    return F.cross_entropy(model(images), labels)


def containers(images, labels):
    return {
        "tuple": ((images,), labels),
        "dict": {"images": images, "labels": labels},
        "namedtuple": ImagePair(images, labels),
        "dataclass": ImageBatch(images, labels),
        "frozen dataclass": FrozenImageBatch(images, labels),
        "UserDict (BatchEncoding-like)": Encoding({"images": images, "labels": labels}, note="kept"),
        "defaultdict": collections.defaultdict(list, images=images, labels=labels),
    }


def test_analyze_accepts_every_batch_container():
    """The float32 images are cast to float64 (so every container is rebuilt); the user's batch is untouched
    and every container gives the same curvature."""
    model = make_model("vit")
    (images,), labels = make_batch("vit", 4)
    kwargs = dict(blocks=None, full=True, trace=False, dtype=torch.float64, tol=1e-10)
    reference = analyze(model, image_loss, ((images,), labels), **kwargs).full.top_eigenvalue
    for name, batch in containers(images, labels).items():
        report = analyze(model, image_loss, batch, **kwargs)
        assert relative(report.full.top_eigenvalue, reference) < 1e-12, name
        assert image_parts(batch)[0].dtype == torch.float32, name  # not modified in place
    # Already on the right device and dtype: any object is passed through as it is.
    for batch in (ReadOnlyMapping(images, labels), Opaque(images, labels)):
        report = analyze(model, image_loss, batch, blocks=None, full=True, trace=False)
        assert math.isfinite(report.full.top_eigenvalue)
    # A Mapping that cannot be rebuilt, when its tensors must be cast: a clear error.
    with pytest.raises(TypeError, match=r"Cannot rebuild the batch's ReadOnlyMapping.*pass a dict instead"):
        analyze(model, image_loss, ReadOnlyMapping(images, labels), **kwargs)


def test_tensors_the_pass_cannot_move_give_a_clear_error():
    model = make_model("vit")
    (images,), labels = make_batch("vit", 4)
    # Tensors hidden in an object are not cast: the dtype mismatch inside the model is explained.
    with pytest.raises(RuntimeError, match=r"dtype mismatch.*tensors held by other objects.*inside loss_fn"):
        analyze(model, image_loss, Opaque(images, labels), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"device or dtype mismatch.*Input type"):  # a convolution's words
        analyze(model, lambda m, b: m.patch_embed(b[0][0].double()).sum(), ((images,), labels))

    # A real device mismatch inside loss_fn (meta vs cpu), raised at the first forward.
    def wrong_device(model, batch):
        return F.cross_entropy(model(batch[0][0].to("meta")), batch[1].to("meta"))

    with pytest.raises(RuntimeError, match=r"device mismatch.*curvature is computed on cpu.*x\.to\("):
        analyze(model, wrong_device, ((images,), labels))
    # Other errors are not rewritten.
    with pytest.raises(RuntimeError, match=r"^boom$"):
        analyze(model, lambda m, b: (_ for _ in ()).throw(RuntimeError("boom")), ((images,), labels))


@needs_cuda
def test_cuda_model_with_cpu_batches_in_every_container():
    """CPU batches are moved to a CUDA model in every container; an object hiding its tensors gets the
    device-mismatch error naming the fix."""
    model = make_model("vit").cuda()
    (images,), labels = make_batch("vit", 4)
    kwargs = dict(blocks=None, full=True, trace=False, tol=1e-6)
    reference = analyze(model, image_loss, ((images.cuda(),), labels.cuda()), **kwargs).full.top_eigenvalue
    for name, batch in containers(images, labels).items():
        report = analyze(model, image_loss, batch, **kwargs)
        assert relative(report.full.top_eigenvalue, reference) < 1e-5, name
        assert image_parts(batch)[0].device.type == "cpu", name  # the user's batch is not moved in place
    # A convolution reports "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)".
    with pytest.raises(RuntimeError, match=r"device or dtype mismatch.*tensors held by other objects"):
        analyze(model, image_loss, Opaque(images, labels), **kwargs)


class DictTransformer(TinyTransformer):
    """TinyTransformer fed with batches of another container type."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def training_step(self, batch, batch_idx):
        tokens, labels = image_parts(batch)
        return super().training_step((tokens, labels), batch_idx)

    def train_dataloader(self):
        loader = super().train_dataloader()

        def collate(samples):
            tokens, labels = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
            return {
                "dict": {"images": tokens, "labels": labels},
                "dataclass": ImageBatch(tokens, labels),
                "UserDict": Encoding({"images": tokens, "labels": labels}, note="kept"),
                "namedtuple": ImagePair(tokens, labels),
            }[self.kind]

        return DataLoader(loader.dataset, batch_size=8, shuffle=True, collate_fn=collate)


@pytest.mark.parametrize("kind", ["dict", "dataclass", "UserDict", "namedtuple"])
def test_monitor_accepts_every_batch_container(tmp_path, kind):
    monitor = HessianMonitor(every_n_steps=2, figures=False, trace=False)
    fit(tmp_path, [monitor], max_steps=2, module=DictTransformer(kind))
    assert pass_steps(monitor) == [2] and monitor.passes == 1
    sample = (torch.zeros(SEQ, dtype=torch.long), torch.tensor(0))
    expected = DictTransformer(kind).train_dataloader().collate_fn([sample])
    assert type(monitor._batches[0]) is type(expected)  # captured and checkpointable as it came


def test_a_device_mismatch_in_the_monitor_is_reported_with_the_fix(tmp_path):
    def wrong_device(module, batch):
        return F.cross_entropy(module(batch[0].to("meta")), batch[1].to("meta"))

    monitor = HessianMonitor(every_n_steps=2, loss_fn=wrong_device, figures=False)
    with pytest.warns(UserWarning, match=r"step 2 failed.*device mismatch.*inside loss_fn"):
        trainer, _ = fit(tmp_path, [monitor], max_steps=4)
    assert trainer.global_step == 4 and monitor.passes == 0


def test_training_step_losses_that_cannot_be_measured_get_clear_errors():
    class Stub(nn.Module):
        def __init__(self, out) -> None:
            super().__init__()
            self.out = out

        def training_step(self, batch, batch_idx):
            self.log("x", 1.0)  # silenced
            return self.out

    with pytest.raises(ValueError, match="without a 'loss' key; pass loss_fn="):
        training_step_loss(Stub({"logits": torch.zeros(1)}), None)
    with pytest.raises(TypeError, match="returned NoneType, not a loss tensor"):
        training_step_loss(Stub(None), None)
    assert training_step_loss(Stub({"loss": torch.ones(())}), None) == 1


# --- 4. activation checkpointing -------------------------------------------------------------------------


class CheckpointedEncoder(nn.Module):
    """EncoderLM from tests/_models.py with every layer run through torch.utils.checkpoint."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        base = make_model("encoder", torch.float64)
        self.embed, self.layers, self.norm, self.head = (
            base.embed,
            base.encoder.layers,
            base.encoder.norm,
            base.head,
        )
        self.use_reentrant = use_reentrant

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            if self.use_reentrant is None:
                x = layer(x)
            else:
                x = checkpoint(layer, x, use_reentrant=self.use_reentrant)
        return self.head(self.norm(x))


def test_non_reentrant_activation_checkpointing_gives_the_same_curvature():
    batch = make_batch("encoder", 4, torch.float64)
    kwargs = dict(full=True, tol=1e-10, trace=False)
    plain = analyze(CheckpointedEncoder(None), loss_fn, batch, **kwargs)
    checkpointed = analyze(CheckpointedEncoder(False), loss_fn, batch, **kwargs)
    assert list(plain.blocks) == list(checkpointed.blocks)
    for a, b in zip([*plain.blocks.values(), plain.full], [*checkpointed.blocks.values(), checkpointed.full]):
        assert relative(b.top_eigenvalue, a.top_eigenvalue) < 1e-10, a.name
        assert relative(b.min_eigenvalue, a.min_eigenvalue) < 1e-10, a.name


def test_reentrant_activation_checkpointing_is_refused_with_the_fix():
    original = torch.utils.checkpoint.CheckpointFunction
    batch = make_batch("encoder", 4, torch.float64)
    with pytest.raises(ReentrantCheckpointError, match="use_reentrant=False"):
        analyze(CheckpointedEncoder(True), loss_fn, batch, trace=False)

    # Inputs that do not require grad: reentrant checkpointing would silently drop the parameters inside.
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.fc2(checkpoint(lambda t: torch.tanh(self.fc1(t)), x, use_reentrant=True))

    with pytest.raises(ReentrantCheckpointError, match="use_reentrant=False"):
        analyze(Inner(), lambda m, b: m(b).pow(2).mean(), torch.randn(5, 3), trace=False)
    assert torch.utils.checkpoint.CheckpointFunction is original  # restored: training still works
    CheckpointedEncoder(True)(batch[0][0]).sum().backward()


# --- 5. torch.compile --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_analyze_a_compiled_model(backend):
    torch._dynamo.reset()
    model = make_model("vit", torch.float64)
    batch = make_batch("vit", 4, torch.float64)
    compiled = torch.compile(model, backend=backend)
    compiled(*batch[0])  # compiled before the pass, as in training
    kwargs = dict(full=True, tol=1e-10, trace=False)
    eager = analyze(model, loss_fn, batch, **kwargs)
    report = analyze(compiled, loss_fn, batch, **kwargs)
    assert list(report.blocks) == list(eager.blocks) and not any("_orig_mod" in n for n in report.blocks)
    assert [b.kind for b in find_blocks(compiled)] == [b.kind for b in find_blocks(model)]
    for a, b in zip([*eager.blocks.values(), eager.full], [*report.blocks.values(), report.full]):
        assert relative(b.top_eigenvalue, a.top_eigenvalue) < 1e-10, a.name


class CompiledSubmodule(TinyTransformer):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.compile(self.layer, backend="aot_eager")


def test_monitor_on_a_module_with_a_compiled_submodule(tmp_path):
    torch._dynamo.reset()
    monitor = HessianMonitor(every_n_steps=2, figures=False, trace=False, at_end=False)
    fit(tmp_path, [monitor], max_steps=2, module=CompiledSubmodule())
    assert pass_steps(monitor) == [2] and monitor.passes == 1
    scalars = monitor.history[-1].scalars
    assert tags.block_tag("layer.self_attn.q", "top_eigenvalue") in scalars
    assert not any("_orig_mod" in t for t in scalars if tags.parse_block_tag(t))


# --- 6. resume after skipped passes; sanity checks --------------------------------------------------------


def resume_run(tmp_path, monitor, max_steps, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[monitor, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyTransformer(), ckpt_path=ckpt_path)
    return trainer


def test_resume_after_a_skipped_pass_continues_curves_and_alerts(tmp_path):
    """A NaN pass at step 4 and an over-budget skip, then a checkpoint and a resume: the TensorBoard curves
    continue at the same steps, the alert history and counts carry over, and so does the time budget."""

    def nan_at_4(module, batch):
        value = token_loss(module, batch)[0]
        return value * float("nan") if module.trainer.global_step == 4 else value

    common = dict(every_n_steps=2, figures=False, at_end=False, trace=False)
    first = HessianMonitor(loss_fn=nan_at_4, **common)
    with pytest.warns(UserWarning, match="non_finite"):
        resume_run(tmp_path, first, 4)
    assert pass_steps(first) == [2, 4] and first.passes == 1
    state = first.state_dict()
    assert state["train_seconds"] > 0

    second = HessianMonitor(loss_fn=nan_at_4, max_overhead=1e-9, **common)
    trainer = resume_run(tmp_path, second, 8, tmp_path / "ckpt" / "last.ckpt")
    # Restored: history, the non_finite alert, the counts; the budget skips steps 6 and 8 (one pass was made).
    assert pass_steps(second) == [2, 4] and second.passes == 1 and second.skipped == 2
    fired = [(a.rule, a.step) for a in first.alerts.alerts]
    assert ("non_finite", 4) in fired and [(a.rule, a.step) for a in second.alerts.alerts] == fired
    assert second.alerts.counts == first.alerts.counts
    assert second.state_dict()["train_seconds"] >= state["train_seconds"]

    third = HessianMonitor(loss_fn=nan_at_4, **common)
    resume_run(tmp_path, third, 10, trainer.checkpoint_callback.last_model_path)
    assert pass_steps(third) == [2, 4, 10] and third.passes == 2 and third.skipped == 2

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    top = tags.block_tag("model", "top_eigenvalue")
    # One event file per run; their reading order is not the run order.
    assert sorted(e.step for e in events.Scalars(top)) == [2, 10]  # no duplicate, no restart at 0
    losses = {e.step: e.value for e in events.Scalars(tags.PASS_LOSS)}
    assert sorted(losses) == [2, 4, 10] and len(events.Scalars(tags.PASS_LOSS)) == 3
    assert math.isnan(losses[4]) and math.isfinite(losses[10])


def test_sanity_checks_and_validation_make_no_pass(tmp_path):
    sanity_calls = []

    def loss(module, batch):
        sanity_calls.append(module.trainer.sanity_checking or module.trainer.validating)
        return token_loss(module, batch)[0]

    class WithValidation(TinyTransformer):
        def val_dataloader(self):
            return self.train_dataloader()

    monitor = HessianMonitor(every_n_steps=2, loss_fn=loss, figures=False, trace=False, at_end=False)
    fit(
        tmp_path,
        [monitor],
        max_steps=4,
        module=WithValidation(),
        num_sanity_val_steps=2,
        val_check_interval=2,
    )
    assert pass_steps(monitor) == [2, 4]
    assert sanity_calls and not any(sanity_calls)


# --- 7. soak ----------------------------------------------------------------------------------------------


def remembered_monitor_warnings() -> int:
    """Entries for HessianMonitor messages in every module's warnings registry."""
    registries = [vars(m).get("__warningregistry__", {}) for m in list(sys.modules.values()) if m is not None]
    return sum(
        1
        for registry in registries
        for key in list(registry)
        if isinstance(key, tuple) and str(key[0]).startswith("HessianMonitor")
    )


def test_alert_warnings_do_not_grow_the_warnings_registry(tmp_path):
    """The soak found it: under Python's default filter every distinct warning message is remembered in the
    warning module's __warningregistry__, and alert messages carry steps and values."""
    import lightning_hessian.callback as module

    before = remembered_monitor_warnings()
    monitor = HessianMonitor(every_n_steps=1, figures=False, trace=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        fit(tmp_path, [monitor], max_steps=6, logger=False)
    delivered = [w for w in caught if str(w.message).startswith("HessianMonitor [")]
    assert len(delivered) >= 6 and all(w.filename == module.__file__ for w in delivered)
    assert remembered_monitor_warnings() == before


@pytest.mark.slow  # runs benchmarks/soak.py: about 20 s
def test_soak_smoke(tmp_path):
    """benchmarks/soak.py on a few steps: the table, the fit and the file are produced."""
    with importing_from("benchmarks"):
        import soak

    result = soak.run(steps=12, every=3, out=tmp_path / "soak.md", warmup_passes=1)
    text = (tmp_path / "soak.md").read_text()
    assert "| pass |" in text and "growth per pass" in text
    assert len(result["passes"]) == 4
    assert all(p["rss_mb"] > 0 and p["traced_kb"] >= 0 for p in result["passes"])
    assert math.isfinite(result["rss_slope_kb"]) and math.isfinite(result["traced_slope_kb"])
    assert result["overhead"] > 0
