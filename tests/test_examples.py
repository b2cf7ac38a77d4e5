"""The example scripts run end to end (their ``--fast`` smoke modes) and leave TensorBoard curvature logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # each runs a script in a subprocess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ("train_vit_digits.py", "train_char_gpt.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Both examples' ``--fast`` runs, started together (each uses one thread) to halve the wall time."""
    started = {}
    for script in SCRIPTS:
        logdir = tmp_path_factory.mktemp(script.removesuffix(".py")) / "runs"
        command = [sys.executable, str(EXAMPLES / script), "--fast", "--logdir", str(logdir)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[script] = (process, command, logdir)
    done = {}
    for script, (process, command, logdir) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[script] = (subprocess.CompletedProcess(command, process.returncode, stdout, stderr), logdir)
    return done


def scalar_tags(logdir: Path) -> set[str]:
    """Every scalar tag in the event files under ``logdir``."""
    found: set[str] = set()
    for events in logdir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        found |= set(accumulator.Tags()["scalars"])
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_fast_mode(runs, script: str) -> None:
    result, logdir = runs[script]
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tensorboard --logdir {logdir}" in result.stdout
    found = scalar_tags(logdir)
    assert any(tag.startswith("curvature/") and tag.endswith("/top_eigenvalue") for tag in found), found
    assert {"stability/sharpness", "stability/threshold", "curvature/model/gauss_newton_top"} <= found
    assert ("val/acc" if "vit" in script else "val/loss") in found
    # Both models' attention layers are recognised: theory vs measured is logged next to the curvature.
    assert any(tag.startswith("theory/") and tag.endswith("attn.q/outer_ratio") for tag in found), found


def test_describe_blocks_example() -> None:
    pytest.importorskip("transformers")
    command = [sys.executable, str(EXAMPLES / "describe_blocks.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qkv_proj.weight[rows 32:40]" in result.stdout  # Phi-3's single key head, read off the attention
    assert "query_key_value.weight[rows 0:8, 24:32, 48:56, 72:80]" in result.stdout  # GPT-NeoX per head
    assert result.stdout.count("warning: find_blocks") == 2  # names only: both fused weights refused


@pytest.mark.parametrize("loop", ["plain", "fabric"])
def test_plain_loop_example(tmp_path, loop: str) -> None:
    command = [sys.executable, str(EXAMPLES / "plain_loop.py"), "--fast", "--logdir", str(tmp_path / "runs")]
    result = subprocess.run(
        command + (["--fabric"] if loop == "fabric" else []), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "curvature took" in result.stdout
    found = scalar_tags(tmp_path / "runs")
    assert {"stability/update_curvature", "stability/sharpness", "monitor/overhead", "train/loss"} <= found


def test_hf_trainer_example(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path / "hf"
    command = [sys.executable, str(EXAMPLES / "hf_trainer.py"), "--fast", "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "curvature measurement(s) took" in result.stdout
    curvature = next((out / "runs").glob("*_curvature"))  # next to the Trainer's own run
    assert {"stability/update_curvature", "stability/sharpness", "monitor/overhead"} <= scalar_tags(curvature)
    assert "train/loss" in scalar_tags(out / "runs")
