"""Worker of ``compare_peers.py``: the peak memory of ONE measurement, in a fresh process.

    python benchmarks/_peak_memory.py MEASUREMENT MODEL THREADS

prints one JSON line ``{"measurement", "model", "rss_before_mb", "peak_delta_mb", "slack_mb"}``:

* ``rss_before_mb``: the resident set size just before the measurement, after the imports, the model,
  the batch and a warm-up that runs the same measurement on a one-sequence, two-token batch (so that lazy
  imports and one-time initialisation of torch, the optimizer or the tool are not charged to it);
* ``peak_delta_mb``: the process's peak resident set size during the measurement minus
  ``rss_before_mb``: the extra memory the measurement needed at its peak;
* ``slack_mb``: how far the recorded peak already exceeded ``rss_before_mb`` when the measurement started
  (0 when the peak could be reset; a smaller delta would not show).

The peak is the kernel's high-water mark ``VmHWM`` (``/proc/self/status``), reset just before the
measurement by writing ``5`` to ``/proc/self/clear_refs``. ``ru_maxrss`` is no substitute: Linux keeps it
across ``execve``, so a worker started by a large parent process inherits the parent's peak. If the reset
is not allowed, the slack says by how much the numbers may be hidden. ``tracemalloc`` does not see torch's
allocations, hence whole-process memory, one process per measurement. Linux only.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from _models import SPECS, loss_fn

MEASUREMENTS = (
    "gradient",
    "train step (AdamW)",
    "ours: whole-model λmax (tol 1e-4)",
    "ours: every block's λmax (tol 1e-4)",
    "PyHessian: λmax (tol 1e-5)",
    "hessian-eigenthings: power iteration (tol 1e-3)",
    "hessian-eigenthings: lanczos default",
    "curvlinops: eigsh (tol 1e-3)",
)


def status_mb(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: peak), in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); silently keep it if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main() -> None:
    measurement, model_name, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if measurement not in MEASUREMENTS:
        raise SystemExit(f"unknown measurement {measurement!r}; one of {MEASUREMENTS}")
    torch.set_num_threads(threads)
    # Import what the measurement needs before the baseline (only that: imports take seconds).
    if measurement.startswith("ours"):
        from lightning_hessian import analyze
    elif measurement.startswith("PyHessian"):
        import pyhessian
    elif measurement.startswith("hessian-eigenthings"):
        import hessian_eigenthings as he
    elif measurement.startswith("curvlinops"):
        import curvlinops
        import numpy as np
        from scipy.sparse.linalg import eigsh

    spec = SPECS[model_name]
    model, batch = spec.build()
    params = list(model.parameters())

    def run(data: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The measurement on ``data``."""
        if measurement == "gradient":
            torch.autograd.grad(loss_fn(model, data), params)
        elif measurement == "train step (AdamW)":
            optimizer = torch.optim.AdamW(params, lr=1e-3)
            loss_fn(model, data).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elif measurement.startswith("ours: whole"):
            analyze(model, loss_fn, data, blocks=None, full=True, smallest=False, trace=False)
        elif measurement.startswith("ours: every"):
            analyze(model, loss_fn, data, smallest=False, trace=False)
        elif measurement.startswith("PyHessian"):
            hessian = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=data, cuda=False)
            hessian.eigenvalues(maxIter=1000, tol=1e-5)
            model.zero_grad(set_to_none=True)
        elif "power" in measurement:
            operator = he.HessianOperator(model, [data], loss_fn)
            he.power_iteration_one(operator, tol=1e-3, max_iter=1000, seed=0)
        elif "lanczos" in measurement:
            he.lanczos(he.HessianOperator(model, [data], loss_fn), seed=0)
        else:
            operator = curvlinops.HessianLinearOperator(
                model, nn.CrossEntropyLoss(), params, [data], check_deterministic=False, num_data=len(data[1])
            ).to_scipy()
            v0 = np.random.default_rng(0).standard_normal(operator.shape[0])
            eigsh(operator, k=1, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)

    with sdpa_kernel(SDPBackend.MATH):
        # Warm-up: the same code on a one-sequence, two-token batch, so that lazy imports and one-time
        # initialisation (autograd engine, kernels, optimizer, the tool itself) are not charged.
        run((batch[0][:1, :2], batch[1][:1]))
        gc.collect()
        reset_peak()
        before, peak_before = status_mb("VmRSS"), status_mb("VmHWM")
        run(batch)
        peak = status_mb("VmHWM")
    print(
        json.dumps(
            dict(
                measurement=measurement,
                model=model_name,
                rss_before_mb=round(before, 2),
                peak_delta_mb=round(peak - before, 2),
                slack_mb=round(max(peak_before - before, 0.0), 2),
            )
        )
    )


if __name__ == "__main__":
    main()
