"""``HessianTrainerCallback`` in a real ``transformers.Trainer`` (a tiny LLaMA from a config, CPU): every tier
measures, its scalars reach TensorBoard, and the run is bitwise the run without the callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_hessian import tags  # noqa: E402
from lightning_hessian.huggingface import HessianTrainerCallback  # noqa: E402

VOCAB = 64
#: One tag per tier that only that tier logs.
TIER_TAGS = {
    "update": tags.UPDATE_CURVATURE,
    "model": tags.SHARPNESS,
    "blocks": "curvature/model.layers.0.self_attn.q_proj/top_eigenvalue",  # the rotation's first block
}


def _dataset(n: int = 64, length: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(VOCAB, (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


class _Spy(transformers.TrainerCallback):
    """Keeps the trainable weights, ``.grad`` and train flag at ``on_optimizer_step`` (placed before and after
    the callback under test, the two copies must agree bitwise)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[torch.Tensor], list[torch.Tensor | None], bool]] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        self.seen.append(([p.detach().clone() for p in params], grads, model.training))


class _SpyAfter(_Spy):
    """A second class: the Trainer warns when a callback class is added twice."""


def _train(out: Path, callbacks: list, steps: int, accumulate: int = 1) -> transformers.Trainer:
    transformers.set_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        attention_dropout=0.1,  # training draws random numbers: a measurement that used them would show
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    args = transformers.TrainingArguments(
        str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model,
        args,
        train_dataset=_dataset(),
        data_collator=transformers.default_data_collator,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def _losses(trainer: transformers.Trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def _assert_same_run(a: transformers.Trainer, b: transformers.Trainer) -> None:
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the weights differ from the run without the callback"
    assert _losses(a) == _losses(b) and _losses(a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run with the callback (between two spies) and the same run without it; 200 tiny steps give the
    planner room for every tier at budget 0.9 (the first whole-model pass after ~60 steps, a block ~100)."""
    torch.set_num_threads(1)
    batch = transformers.default_data_collator(_dataset()[:8])
    callback = HessianTrainerCallback(batch, budget=0.9)
    before, after = _Spy(), _SpyAfter()
    out = tmp_path_factory.mktemp("with")
    with_cb = _train(out, [before, callback, after], steps=200)
    without = _train(tmp_path_factory.mktemp("without"), [], steps=200)
    return {"callback": callback, "with": with_cb, "without": without, "spies": (before, after), "out": out}


def test_every_tier_measures_and_reaches_tensorboard(runs: dict[str, Any]) -> None:
    callback: HessianTrainerCallback = runs["callback"]
    logged = set().union(*(scalars for _, scalars in callback.history))
    for tier, tag in TIER_TAGS.items():
        assert tag in logged, f"the {tier!r} tier never measured in 200 steps at budget 0.9"
    steps = [step for step, _ in callback.history]
    assert steps == sorted(set(steps)) and 1 <= steps[0] and steps[-1] <= 200
    # The Trainer's step axis: the step the Trainer logs its loss at.
    step = callback.history[0][0]
    assert runs["with"].state.log_history[step - 1]["step"] == step
    # TensorBoard: next to the Trainer's own run, every tier's tags at the same steps as in history.
    assert callback.writer_dir is not None
    writer_dir = Path(callback.writer_dir)
    assert writer_dir.parent == runs["out"] / "runs" and writer_dir.name.endswith("_curvature")
    events = EventAccumulator(str(writer_dir), size_guidance={"scalars": 0})
    events.Reload()
    for tag in TIER_TAGS.values():
        want = [(s, v[tag]) for s, v in callback.history if tag in v]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32 in the file


def test_bitwise_same_run_as_without_callback(runs: dict[str, Any]) -> None:
    _assert_same_run(runs["with"], runs["without"])
    # Within each step: weights, .grad and the train flag after the measurement are those before it.
    before, after = runs["spies"]
    assert len(before.seen) == len(after.seen) == 200
    for (w0, g0, t0), (w1, g1, t1) in zip(before.seen, after.seen):
        assert t0 == t1 is True
        assert all(torch.equal(a, b) for a, b in zip(w0, w1))
        assert all(a is not None and torch.equal(a, b) for a, b in zip(g0, g1))  # .grad kept until zeroed


def test_gradient_accumulation(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    batch = transformers.default_data_collator(_dataset()[:8])
    forwarded: list[int] = []
    callback = HessianTrainerCallback(
        batch, budget=0.9, tiers=("update",), on_measurement=lambda m: forwarded.append(m.step)
    )
    accumulated = _train(tmp_path / "with", [callback], steps=40, accumulate=2)
    assert accumulated.state.global_step == 40
    assert callback.tracker._steps == 40  # one planned step per optimizer step, not per micro-batch
    assert callback.history and all(tags.UPDATE_CURVATURE in s for _, s in callback.history)
    assert forwarded == [step for step, _ in callback.history]  # at the Trainer's global steps
    assert tags.SHARPNESS not in set().union(*(s for _, s in callback.history))  # only the tier asked for
    assert all(torch.isfinite(torch.tensor(s[tags.UPDATE_CURVATURE])) for _, s in callback.history)
    _assert_same_run(accumulated, _train(tmp_path / "without", [], steps=40, accumulate=2))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="curvature batch"):
        HessianTrainerCallback(None)
    with pytest.raises(ValueError, match="choose one or more"):
        HessianTrainerCallback({"input_ids": torch.zeros(1, 2)}, tiers=("hessian",))
