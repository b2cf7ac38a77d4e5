"""lightning_hessian: per-block Hessian curvature of Transformers, measured while they train.

Quick start without Lightning::

    from lightning_hessian import analyze
    report = analyze(model, loss_fn, batch)     # loss_fn(model, batch) -> scalar tensor
    print(report.table())
"""

from lightning_hessian import estimators, formulas, tags, theory
from lightning_hessian.analysis import analyze
from lightning_hessian.blocks import (
    KINDS,
    Block,
    BlockPart,
    FusedLayout,
    describe_blocks,
    find_blocks,
    model_block,
)
from lightning_hessian.callback import HessianMonitor
from lightning_hessian.html_report import write_html_report
from lightning_hessian.operators import Batches, CurvatureOperator
from lightning_hessian.report import BlockCurvature, CurvatureReport
from lightning_hessian.settings import AnalysisSettings
from lightning_hessian.theory import TheoryComparison, compare_attention
from lightning_hessian.tracker import CurvatureTracker

__version__ = "0.1.0.dev0"

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
