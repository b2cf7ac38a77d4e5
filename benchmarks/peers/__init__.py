"""The side-by-side comparison with PyHessian, hessian-eigenthings and curvlinops (issue #5), as a package.

``benchmarks/compare_peers.py`` is the entry point (its docstring says what every task measures and how
each peer is called); this package holds the work, split by concept:

* ``common``: the run's device, timers and the gradient unit; ``adapters``: the peers' imports, their
  product meters and the compatibility shims; ``references``: the float64 references (Lanczos, scipy,
  the dense Hessian);
* one measurement module per task: ``top_eigenvalue`` (1), ``blocks`` (2), ``trace`` (3), ``density`` (4),
  ``hvp`` (5), ``memory`` (6), ``callback`` (7). Each ``measure_*`` function returns a dataclass of
  numbers;
* ``render``: Markdown only. ``render.<task>`` turns a task's dataclass into lines and targets,
  ``render.page`` assembles the results file; ``run``: the command line and the order of the tasks.

The modules import ``_models`` as a top-level module: put ``benchmarks/`` on ``sys.path`` first (the entry
point and ``tests/test_benchmarks_smoke.py`` do).
"""
