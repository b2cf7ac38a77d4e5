"""The plain-PyTorch API works without Lightning or TensorBoard installed (simulated in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Import attempts of these packages fail in the subprocess, as if they were not installed.
_BLOCKED = (
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "lightning_utilities",
    "tensorboard",
    "torchmetrics",
)

_SCRIPT = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {_BLOCKED!r}:
                raise ImportError(f"{{name}} is blocked by the test")
            return None

    sys.meta_path.insert(0, Blocked())
    import torch
    from torch import nn
    from lightning_hessian import analyze, find_blocks, CurvatureTracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
    report = analyze(model, loss_fn, batch, blocks=None, full=True)
    assert report.full.top_eigenvalues[0] > 0, report.full
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {_BLOCKED!r})
    assert not loaded, loaded
    try:
        from lightning_hessian import HessianMonitor
    except ImportError as error:
        print("monitor:", error)
    print("ok", report.full.top_eigenvalues[0])
    """
)


def test_analyze_needs_neither_lightning_nor_tensorboard():
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
    # The callback is what needs Lightning: asking for it says so with Lightning's import error.
    assert "monitor:" in result.stdout and "blocked by the test" in result.stdout
