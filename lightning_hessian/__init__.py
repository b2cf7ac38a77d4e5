"""lightning_hessian: per-block Hessian curvature of Transformers, measured while they train.

Quick start without Lightning::

    from lightning_hessian import analyze
    report = analyze(model, loss_fn, batch)     # loss_fn(model, batch) -> scalar tensor
    print(report.table())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_hessian import estimators, formulas, tags, theory
from lightning_hessian.analysis import analyze
from lightning_hessian.batches import Batches
from lightning_hessian.blocks import (
    KINDS,
    Block,
    BlockPart,
    FusedLayout,
    describe_blocks,
    find_blocks,
    model_block,
)
from lightning_hessian.html_report import write_html_report
from lightning_hessian.operators import CurvatureOperator
from lightning_hessian.report import BlockCurvature, CurvatureReport
from lightning_hessian.settings import AnalysisSettings
from lightning_hessian.theory import TheoryComparison, compare_attention
from lightning_hessian.tracker import CurvatureTracker

if TYPE_CHECKING:
    from lightning_hessian.callback import HessianMonitor

__version__ = "0.1.0.dev0"

# The Lightning callback is imported on first use: the plain-PyTorch API needs torch and numpy only.
_LAZY = {"HessianMonitor": "lightning_hessian.callback"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_hessian' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "KINDS",
    "AnalysisSettings",
    "Batches",
    "Block",
    "BlockCurvature",
    "BlockPart",
    "CurvatureOperator",
    "CurvatureReport",
    "CurvatureTracker",
    "FusedLayout",
    "HessianMonitor",
    "TheoryComparison",
    "__version__",
    "analyze",
    "compare_attention",
    "describe_blocks",
    "estimators",
    "find_blocks",
    "formulas",
    "model_block",
    "tags",
    "theory",
    "write_html_report",
]
