"""HessianMonitor in real Trainer runs: schedule, non-interference, stability ratios, checkpoints, errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _lightning import SEQ, VOCAB, TinyTransformer, assert_same_training, fit, logged_metrics, pass_steps
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_hessian import HessianMonitor, tags
from lightning_hessian.alerts import ThresholdRule


@pytest.mark.slow  # two runs and four passes with densities: about 20 s
def test_training_is_bitwise_unchanged(tmp_path):
    """Dropout, BatchNorm, gradient accumulation, AdamW, a shuffling DataLoader: same weights and metrics."""
    plain, plain_module = fit(tmp_path / "plain", accumulate=2)
    monitor = HessianMonitor(every_n_steps=3, early_steps=[1], density=True, split=False, figures=False)
    watched, watched_module = fit(tmp_path / "watched", [monitor], accumulate=2)
    assert pass_steps(monitor) == [1, 3, 6, 8]
    assert plain.global_step == watched.global_step == 8
    assert_same_training((plain, plain_module), (watched, watched_module))


def test_a_final_pass_measures_at_the_end(tmp_path):
    monitor = HessianMonitor(every_n_steps=0)
    trainer, _ = fit(tmp_path, [monitor], max_steps=5, module=TinyTransformer(return_dict=True))
    assert pass_steps(monitor) == [5]
    scalars = monitor.history[-1].scalars
    assert math.isfinite(scalars[tags.block_tag("model", "top_eigenvalue")])
    assert any(
        tags.parse_block_tag(t) and tags.parse_block_tag(t)[0].endswith("self_attn.q") for t in scalars
    )
    # Key statistics are available to EarlyStopping / ModelCheckpoint.
    assert trainer.callback_metrics[tags.SHARPNESS].item() == pytest.approx(scalars[tags.SHARPNESS])


def test_schedule_counts_optimizer_steps_not_micro_batches(tmp_path):
    monitor = HessianMonitor(every_n_steps=4, early_steps=[1, 2], trace=False, density=False, figures=False)
    fit(tmp_path, [monitor], max_steps=9, accumulate=3)
    assert pass_steps(monitor) == [1, 2, 4, 8, 9]


def test_stability_ratios_follow_the_live_optimizer(tmp_path):
    sgd = HessianMonitor(every_n_steps=2, trace=False, density=False, figures=False, at_end=False)
    fit(tmp_path / "sgd", [sgd], max_steps=4, module=TinyTransformer("sgd", lr=0.05))
    s = sgd.history[-1].scalars
    assert s[tags.THRESHOLD] == pytest.approx(2 / 0.05)
    assert s[tags.SHARPNESS_RATIO] == pytest.approx(s[tags.SHARPNESS] * 0.05 / 2)
    assert s[tags.SHARPNESS] == s[tags.block_tag("model", "top_eigenvalue")]
    assert tags.PRECONDITIONED_RATIO not in s

    adam = HessianMonitor(every_n_steps=2, trace=False, density=False, figures=False, at_end=False)
    trainer, _ = fit(tmp_path / "adam", [adam], max_steps=4, module=TinyTransformer("adamw", lr=0.01))
    a = adam.history[-1].scalars
    assert a[tags.PRECONDITIONED_THRESHOLD] == pytest.approx((2 + 2 * 0.8) / ((1 - 0.8) * 0.01))
    assert a[tags.PRECONDITIONED_RATIO] == pytest.approx(
        a[tags.PRECONDITIONED_SHARPNESS] / a[tags.PRECONDITIONED_THRESHOLD]
    )
    # Adam's preconditioner divides by sqrt(v) ~ |gradient| << 1: the preconditioned sharpness is larger.
    assert a[tags.PRECONDITIONED_SHARPNESS] > a[tags.SHARPNESS]
    assert tags.PRECONDITIONED_RATIO in trainer.callback_metrics


@pytest.mark.slow  # three passes drawing every figure: about 20 s
def test_tensorboard_event_files(tmp_path):
    monitor = HessianMonitor(every_n_steps=3, trace=True, density=True)
    trainer, _ = fit(tmp_path, [monitor], max_steps=6, logger="tb")
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalar_tags = set(events.Tags()["scalars"])
    top = tags.block_tag("model", "top_eigenvalue")
    assert top in scalar_tags and tags.SHARPNESS_RATIO in scalar_tags and tags.PASS_SECONDS in scalar_tags
    assert [e.step for e in events.Scalars(top)] == [3, 6]
    history = {r.step: r.scalars for r in monitor.history}
    assert events.Scalars(top)[-1].value == pytest.approx(history[6][top], rel=1e-6)
    assert "train_loss" in scalar_tags  # the user's own metrics are still there
    assert events.Tags()["images"], "figures expected"


def test_checkpoint_resume_continues_the_curves(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = HessianMonitor(every_n_steps=2, trace=False, density=False, figures=False, at_end=False)
    fit(tmp_path / "a", [first, checkpoint], max_steps=4, enable_checkpointing=True)
    assert pass_steps(first) == [2, 4]

    second = HessianMonitor(every_n_steps=2, trace=False, density=False, figures=False, at_end=False)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=8,
        callbacks=[second],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyTransformer(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert pass_steps(second) == [2, 4, 6, 8]
    for a, b in zip(first._batches, second._batches):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert second.passes == 4


def test_a_failing_pass_warns_once_and_training_goes_on(tmp_path):
    def broken(module, batch):
        raise RuntimeError("boom")

    monitor = HessianMonitor(every_n_steps=1, loss_fn=broken, figures=False)
    with pytest.warns(UserWarning, match="boom") as record:
        trainer, _ = fit(tmp_path / "warn", [monitor], max_steps=3)
    assert trainer.global_step == 3 and monitor.passes == 0
    assert sum("boom" in str(w.message) for w in record) == 1

    with pytest.raises(RuntimeError, match="boom"):
        fit(
            tmp_path / "raise",
            [HessianMonitor(every_n_steps=1, loss_fn=broken, on_error="raise")],
            max_steps=3,
        )


def test_alerts_reach_the_user_and_can_stop_training(tmp_path):
    seen = []
    rule = ThresholdRule("any sharpness", tag_pattern=r"stability/sharpness", above=0.0, severity="critical")
    monitor = HessianMonitor(
        every_n_steps=2, alerts=[rule], on_alert=seen.append, stop_on="critical", figures=False
    )
    with pytest.warns(UserWarning, match="any sharpness"):
        trainer, _ = fit(tmp_path, [monitor], max_steps=10)
    assert trainer.global_step == 2
    assert seen and seen[0].rule == "any sharpness" and seen[0].step == 2


def test_custom_loss_fn_and_data(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(VOCAB, (4, SEQ), generator=g), torch.randint(3, (4,), generator=g))]

    def loss_fn(module, batch):
        logits = module(batch[0])
        return F.cross_entropy(logits, batch[1]), logits

    monitor = HessianMonitor(
        every_n_steps=2, data=batches, loss_fn=loss_fn, split=True, figures=False, at_end=False
    )
    fit(tmp_path, [monitor], max_steps=2)
    scalars = monitor.history[-1].scalars
    assert tags.block_tag("model", "gauss_newton_top") in scalars
    current = HessianMonitor(every_n_steps=1, data="current", trace=False, figures=False, at_end=False)
    fit(tmp_path / "current", [current], max_steps=2)
    assert pass_steps(current) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_steps": -1}, ValueError, "every_n_steps must be"),
        ({"early_steps": [0]}, ValueError, "early_steps must be"),
        ({"every_n_steps": 0, "at_end": False}, ValueError, "Nothing scheduled"),
        ({"data": "random"}, ValueError, "data must be"),
        ({"num_batches": 0}, ValueError, "num_batches must be"),
        ({"loss_fn": "mse"}, TypeError, "loss_fn must be a callable"),
        ({"on_error": "ignore"}, ValueError, "on_error must be"),
        ({"stop_on": "info"}, ValueError, "stop_on must be"),
        ({"split": True}, ValueError, "split=True needs loss_fn"),
        ({"top_k": 0}, ValueError, "top_k must be"),
        ({"tol": 0}, ValueError, "tol must be"),
        ({"blocks": None, "full": False}, ValueError, "Nothing to measure"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        HessianMonitor(**kwargs)


def test_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 2\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_hessian.HessianMonitor\n"
        "      init_args:\n"
        "        every_n_steps: 1\n"
        "        early_steps: [1]\n"
        "        density: false\n"
        "        figures: false\n"
    )
    cli = LightningCLI(TinyTransformer, args=["fit", "--config", str(config)], save_config_callback=None)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, HessianMonitor))
    assert monitor.every_n_steps == 1 and pass_steps(monitor) == [1, 2]


def test_block_heterogeneity_is_logged_with_densities(tmp_path):
    monitor = HessianMonitor(every_n_steps=2, density=True, density_steps=10, figures=False, at_end=False)
    fit(tmp_path, [monitor], max_steps=2)
    value = monitor.history[-1].scalars[tags.HETEROGENEITY]
    assert 0 < value <= math.sqrt(math.log(2)) + 1e-12  # natural-log Jensen-Shannon distance range


def test_time_budget_skips_passes(tmp_path):
    """A tiny overhead budget: after the first pass, scheduled passes are skipped; the end pass still runs."""
    monitor = HessianMonitor(every_n_steps=1, max_overhead=1e-6, trace=False, figures=False)
    fit(tmp_path, [monitor], max_steps=5)
    assert pass_steps(monitor) == [1, 5]
    assert monitor.skipped == 4  # steps 2-5 skipped when due; the end-of-training pass still measures step 5
    with pytest.raises(ValueError, match="max_overhead"):
        HessianMonitor(max_overhead=0)


def test_a_nan_loss_skips_the_pass_and_raises_an_alert(tmp_path):
    def nan_loss(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1]) * float("nan")

    seen = []
    monitor = HessianMonitor(every_n_steps=2, loss_fn=nan_loss, on_alert=seen.append, at_end=False)
    with pytest.warns(UserWarning, match="non_finite"):
        trainer, _ = fit(tmp_path, [monitor], max_steps=4)
    assert trainer.global_step == 4 and monitor.passes == 0
    assert [a.rule for a in seen] == ["non_finite", "non_finite"] and seen[0].severity == "critical"
    assert math.isnan(monitor.history[-1].scalars[tags.PASS_LOSS])
    assert [r["step"] for r in logged_metrics(trainer.logger, (tags.PASS_LOSS,))] == ["2", "4"]


def test_sharded_strategies_are_refused_at_setup():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(RuntimeError, match="does not support the FSDPStrategy strategy"):
        HessianMonitor().setup(trainer, TinyTransformer(), "fit")


def test_validate_test_fast_dev_run_and_no_logger(tmp_path):
    """Nothing to measure outside fit, nothing to write without a logger: no crash, no pass."""
    monitor = HessianMonitor(every_n_steps=1, figures=False)
    L.seed_everything(0, verbose=False)
    module = TinyTransformer()
    trainer = L.Trainer(
        fast_dev_run=2,
        callbacks=[monitor],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)  # fast_dev_run's dummy logger: passes run, nothing is written
    assert pass_steps(monitor) == [1, 2]
    trainer.validate(module, dataloaders=module.train_dataloader(), verbose=False)
    trainer.test(module, dataloaders=module.train_dataloader(), verbose=False)
    assert pass_steps(monitor) == [1, 2]  # validate / test make no passes
    quiet = HessianMonitor(every_n_steps=1, figures=False)
    fit(tmp_path, [quiet], max_steps=2, logger=False)
    assert pass_steps(quiet) == [1, 2]
