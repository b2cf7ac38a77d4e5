"""How the tests import the scripts of benchmarks/, docs/, examples/ and experiments/ (not packages).

Each script imports its folder's other modules by plain name (``from _models import ...``, ``import
repro_attention``). ``benchmarks/_models.py`` and ``tests/_models.py`` share a name, so a script folder left
on ``sys.path`` would let one shadow the other, in this process and in the processes it spawns (they inherit
``sys.path``). :func:`importing_from` is the one way the tests import a script::

    with importing_from("benchmarks"):
        import soak
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TESTS = Path(__file__).resolve().parent


@contextmanager
def importing_from(folder: str) -> Iterator[None]:
    """Within the block, plain imports find the modules of ``<repository>/<folder>`` first.

    On entry ``folder`` goes first on ``sys.path``, and the modules of ``tests/`` that share a name with a
    module of ``folder`` (``_models``) leave ``sys.modules``, so the scripts get their own. On exit
    ``sys.path`` is restored (also where a script edited it itself) with ``folder`` appended last, where it
    shadows nothing but a script's later import of a sibling inside a function still finds it; the shared
    names are bound to the tests' modules again, and the scripts keep their references to what they
    imported. Other modules imported in the block stay in ``sys.modules`` (a second import returns the same
    module).

    Args:
        folder: a folder of the repository, e.g. ``"benchmarks"``.
    """
    path = ROOT / folder
    if not path.is_dir():
        raise FileNotFoundError(f"no folder {path}: importing_from takes e.g. 'benchmarks' or 'docs'")
    shared = _module_names(path) & _module_names(_TESTS)

    def _take(name: str) -> bool:
        return name.split(".")[0] in shared

    held = {name: module for name, module in sys.modules.items() if _take(name)}  # the tests' _models
    for name in held:
        del sys.modules[name]
    saved = list(sys.path)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path[:] = [*saved, str(path)] if str(path) not in saved else saved
        for name in [name for name in sys.modules if _take(name)]:  # the folder's own copies
            del sys.modules[name]
        sys.modules.update(held)


def _module_names(folder: Path) -> set[str]:
    """Top-level module names a folder provides: its ``*.py`` files and its packages."""
    packages = {p.parent.name for p in folder.glob("*/__init__.py")}
    return {p.stem for p in folder.glob("*.py")} | packages
