"""Side by side with PyHessian, hessian-eigenthings and curvlinops (issue #5): time AND accuracy.

    pip install torch==2.13.0 && pip install -e ".[bench,test]"
    python benchmarks/compare_peers.py [--quick] [--threads 1] [--tasks 1,2,...] [--device cuda] [--out PATH]

``--quick`` (about 3 minutes): fewer seeds and sweeps, no deep model, the per-tensor peers on layer 0,
the embedding and the head only. The full run takes about 15 minutes on a 2-core machine. The results go
to ``benchmarks/results/peers.md`` (machine, versions, settings, targets met or missed, every table).
``--device cuda`` runs every tool on the GPU (timers synchronise it) and writes
``benchmarks/results/peers_gpu.md``; task 6 (resident memory of a process) is then skipped.

Every tool gets the same model, batch and dtype in one run, the math attention kernel
(``sdpa_kernel(SDPBackend.MATH)``: fused kernels have no double backward) and eval mode with dropout 0,
so all compute the same function. Times are medians over seeds / repeats, interleaved so that drift of a
shared machine hits every tool alike, and are also given as multiples of one gradient measured in the same
run. Models (``_models.py``): ``reference`` (the DESIGN.md encoder, float32), ``deep`` (6 layers, float32;
skipped by ``--quick``) and ``tiny`` (float64, a few thousand parameters, where the dense Hessian gives
exact answers).

Tasks (numbered as in the issue):

1. whole-model top eigenvalue, error against a float64 reference (our Lanczos at tol 1e-10, cross-checked
   with scipy ``eigsh`` on a plain-autograd operator); every tool swept from its default to tighter
   settings, to find its fastest configuration that is accurate to 1e-4 on every seed;
2. the top eigenvalue of every block: ours (cold, and warm from the previous report after one optimizer
   step) and the peers with one operator per parameter tensor, against float64 references per block;
3. trace at equal matvec budgets on ``tiny``: mean relative error against the exact trace over seeds;
4. spectral density at equal probes x steps on ``tiny``: Wasserstein-1 distance of the quadrature measure
   to the exact spectrum (``scipy.stats.wasserstein_distance``, independent of every tool);
5. one Hessian-vector product / one gradient, and each tool's agreement with a float64 product;
6. peak memory, one fresh process per measurement (``_peak_memory.py``);
7. the training-time overhead of ``HessianMonitor(every_n_steps=100)`` at its defaults.

How the peers are called (read their source for the details):

* PyHessian 0.1: ``hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)`` (``True`` on a GPU), then
  ``.eigenvalues(maxIter, tol)`` (power iteration), ``.trace(maxIter=m, tol=-inf)`` (Hutchinson: a
  negative ``tol`` forces exactly ``m`` probes, see below) and ``.density(iter, n_v)``. Its start vectors
  come from the global torch stream, seeded per run. ``density`` calls ``torch.eig``, removed from
  PyTorch: a shim maps it to ``torch.linalg.eigh`` (``T`` is symmetric tridiagonal) while PyHessian runs.
  Float64 runs set the default dtype to float64, since PyHessian draws its vectors in the default dtype.
* hessian-eigenthings 1.0.0a5: ``HessianOperator(model, [batch], loss_fn)`` (``param_filter=match_names``
  per tensor), ``power_iteration_one``, ``lanczos``, ``trace``, ``hutchinson``, ``spectral_density``. Its
  operator recomputes the forward pass and the ``create_graph`` gradient at every product, by design.
* curvlinops 3.0.1: ``HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch],
  check_deterministic=False, num_data=...)`` (the determinism check costs two gradients and two products
  at construction: turned off, in its favour), ``.to_scipy()`` with ``scipy.sparse.linalg.eigsh(k=1,
  which="LA")``, and ``hutchinson_trace`` / ``hutchpp_trace`` / ``xtrace`` on the operator. Its product
  is forward-over-reverse ``jvp(jacrev(...))`` under ``vmap``; see the caveat on LayerNorm in the results.

This file is the entry point; the code is the package ``benchmarks/peers/``: one measurement module per
task, each returning a dataclass of numbers, and ``peers/render/``, which turns those into the Markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package peers/ and _models.py
from peers.run import main

if __name__ == "__main__":
    main(__doc__)
