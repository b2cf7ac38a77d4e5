r"""Lanczos start vectors of a pass: the block's gradient plus an equal-norm random vector, or a warm start.

Training gradients lie mostly in the top Hessian eigenspace (Gur-Ari, Roberts & Dyer, arXiv:1812.04754), so
:math:`g_b/\|g_b\| + r_b/\|r_b\|` starts Lanczos close to the top eigenvectors, and the random half keeps
every eigenvector in the Krylov space. Measured over eight benchmark and test models: about 10% fewer
products for the whole model and for all blocks (0-20% per model, none needing more), same accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["STARTS", "StartVectors"]


STARTS = ("gradient", "random")


class StartVectors:
    """Lanczos start vectors per block, made when the block's turn comes .

    A warm start is used as given. Otherwise, with ``start="gradient"``, ``g_b/||g_b|| + r_b/||r_b||``: the
    block's gradient plus a random unit vector from one generator shared by the blocks in index order (the
    blocks are visited in that order, so the draws do not depend on how they are grouped). Every process
    calls ``op.gradient`` for the same blocks in the same order (it sums over processes).
    """

    def __init__(self, op: Any, warm: list[Tensor | None] | None, start: str, seed: int) -> None:
        self.op, self.warm, self.gradient = op, warm, start == "gradient"
        # seed < 2**63 - 2**16 (check_settings): the offset stays in manual_seed's range
        self.gen = torch.Generator().manual_seed(seed + 7919)  # apart from the estimators' own draws

    def __call__(self, index: int) -> Tensor | None:
        warm = None if self.warm is None else self.warm[index]
        if warm is not None or not self.gradient:
            return warm
        g = self.op.gradient(index).to(device="cpu", dtype=torch.float64)
        r = torch.randn(g.shape, generator=self.gen, dtype=torch.float64)
        r = r / r.norm()
        norm = g.norm()
        return r if not torch.isfinite(norm) or norm == 0 else g / norm + r
