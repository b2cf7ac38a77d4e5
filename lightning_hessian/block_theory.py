r"""[P] Thm 6 on a model's own post-norm Transformer layers: the full-block bound next to the measured one.

A layer qualifies when it computes exactly [P]'s block (eq. (4), :mod:`.formulas.block_bound`)

.. math::

    Y = \mathrm{LN}(X + A X W_V),\ A = \mathrm{softmax}(X W_Q W_K^\top X^\top / \sqrt{d_K}),\qquad
    Z = \mathrm{LN}(\sigma(Y W_1) W_2 + Y),

with one head, no output projection, no biases, LayerNorms without affine weights and ``σ`` ReLU or GELU:
its trainable blocks are exactly ``query, key, value, ffn_in, ffn_out`` (:func:`~.find_blocks`),
and on the curvature data the rebuilt ``Z`` matches the layer's captured output (relative ``1e-4``). Pre-norm
layers, several heads, output projections, biases or affine LayerNorms are skipped with the reason: the
theorem is stated for this post-norm block only.

For each qualifying layer the bound ``M_tr`` is averaged over the sequences of the curvature data (the loss
is their mean, so the Hessian is the mean of theirs). The *measured* number is the largest diagonal-block
norm ``max_b max(|λ_max|, |λ_min|)`` over the layer's five blocks from the report, a lower bound on the norm
of the layer's parameters as one block (``||H|| >= ||H_bb||``); when the report has the whole model and the
model's trainable parameters are exactly the layer's, the whole-model norm (the layer as one block) is used.
Either way measured / bound <= 1 whenever the bound is *proven*: the model's loss is the mean-squared error
of this one layer's output against ``target(batch)`` (checked numerically, relative ``1e-5``). Tags:
``theory/<layer>/block_bound``, ``theory/<layer>/block_measured``, and ``theory/<layer>/block/bound_ratio``
when proven (watched by the ``bound_violation`` alert) or ``theory/<layer>/block_ratio`` (a normaliser).

Cost: about 7 s per sequence at ``L = 128, d = 64, d_ff = 256`` on one CPU thread (float64).

Reference:
    E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians and
    Their Implications for Scaling Laws", arXiv:2510.16927, Thm 5-6.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import tags
from ._context import curvature_context
from .batches import as_batches, map_tensors
from .blocks import Block, find_blocks
from .formatting import format_number
from .formulas import block_bound as bb
from .formulas import ffn
from .report import CurvatureReport
from .theory import find_attention_layers, loss_mismatch

__all__ = ["BlockBoundComparison", "LayerBlockBound", "compare_block_bound"]

_KINDS = {"query": "Q", "key": "K", "value": "V", "ffn_in": "W1", "ffn_out": "W2"}
_REBUILD_TOL = 1e-4


@dataclass
class LayerBlockBound:
    """[P] Thm 6 for one layer on one pass.

    Attributes:
        layer: the layer's module path.
        blocks: block names by ``"Q", "K", "V", "W1", "W2"``.
        activation: ``"relu"`` or ``"gelu"``, the one that rebuilt the output.
        bound: mean over sequences of ``M_tr``.
        factors: mean over sequences of each factor of :class:`.formulas.block_bound.BlockBound`.
        measured: the measured norm (module docstring), ``None`` without a report.
        measured_kind: ``"layer"`` (whole model = this layer) or ``"max block"``.
        proven: whether ``measured <= bound`` is a theorem here.
    """

    layer: str
    blocks: dict[str, str]
    activation: str
    bound: float
    factors: dict[str, float]
    measured: float | None = None
    measured_kind: str | None = None
    proven: bool = False


@dataclass
class BlockBoundComparison:
    """Every qualifying layer, and the layers left out with the reason."""

    layers: dict[str, LayerBlockBound] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    proven_reason: str | None = None

    def scalars(self) -> dict[str, float]:
        """``theory/<layer>/block_bound``, ``block_measured`` and the ratio (module docstring)."""
        out: dict[str, float] = {}
        for lb in self.layers.values():
            out[tags.theory_tag(lb.layer, "block_bound")] = lb.bound
            if lb.measured is None or not lb.bound > 0:
                continue
            out[tags.theory_tag(lb.layer, "block_measured")] = lb.measured
            ratio = lb.measured / lb.bound
            key = tags.theory_tag(f"{lb.layer}/block", "bound_ratio") if lb.proven else None
            out[key or tags.theory_tag(lb.layer, "block_ratio")] = ratio
        return out

    def table(self) -> str:
        """A Markdown table, one row per layer, then the skipped layers."""
        rows = ["| layer | σ | measured | bound M_tr | measured / bound |", "|---|---|---:|---:|---:|"]
        for lb in self.layers.values():
            m = format_number(lb.measured) + ("" if lb.measured is None else f" ({lb.measured_kind})")
            r = format_number(None if lb.measured is None else lb.measured / lb.bound)
            r += " (proven)" if lb.measured is not None and lb.proven else ""
            rows.append(f"| `{lb.layer}` | {lb.activation} | {m} | {format_number(lb.bound)} | {r} |")
        rows += [f"\n`{name}`: no full-block bound ({why})" for name, why in self.skipped.items()]
        return "\n".join(rows)


@dataclass
class _Candidate:
    path: str
    module: nn.Module
    blocks: dict[str, Block]
    weights: dict[str, Tensor]  # the papers' orientation, d_in x d_out
    eps: float
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _weight(params: Mapping[str, Tensor], block: Block) -> Tensor:
    """The block's matrix as ``d_in x d_out`` (an ``nn.Linear`` weight, transposed)."""
    if len(block.parts) != 1 or params[block.parts[0].param].dim() != 2:
        raise ValueError(f"{block.name} is not one weight matrix (biases or fused slices of several)")
    part = block.parts[0]
    return part.select(params[part.param].detach()).T


def _candidates(model: nn.Module, blocks: Sequence[Block]) -> tuple[list[_Candidate], dict[str, str]]:
    layers, skipped = find_attention_layers(model, blocks)
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out = []
    for att in layers:
        path = att.name.rpartition(".")[0]
        if att.num_heads != 1 or att.out is not None:
            skipped[path or "model"] = "[P]'s block has one head and no output projection"
            continue
        prefix = path + "." if path else ""  # the model itself may be the layer
        inside = [b for b in blocks if all(p.startswith(prefix) for p in b.params)]
        mine = {b.kind: b for b in inside}
        kinds = sorted(b.kind for b in inside)
        if kinds != sorted(_KINDS):
            skipped[path or "model"] = (
                f"needs exactly query, key, value, ffn_in, ffn_out blocks, found {kinds}"
            )
            continue
        norms = [m for m in modules[path].modules() if isinstance(m, nn.LayerNorm)]
        if (
            len(norms) != 2
            or norms[0].eps != norms[1].eps
            or any(n.weight is not None or n.bias is not None for n in norms)
        ):
            skipped[path or "model"] = (
                "needs two LayerNorms without affine weights (elementwise_affine=False, bias=False)"
            )
            continue
        try:
            weights = {_KINDS[k]: _weight(params, b).double() for k, b in mine.items()}
        except ValueError as why:
            skipped[path or "model"] = str(why)
            continue
        blocks_by = {_KINDS[k]: b for k, b in mine.items()}
        out.append(_Candidate(path or "model", modules[path], blocks_by, weights, float(norms[0].eps)))
    return out, skipped


def _rebuild(c: _Candidate, n_batches: int) -> str:
    """The activation that reproduces the captured outputs of every sequence, or raise ``ValueError``."""
    w = c.weights
    if len(c.inputs) != n_batches or len(c.outputs) != n_batches:
        raise ValueError("the layer did not run exactly once per curvature batch")
    if any(not isinstance(t, Tensor) or t.dim() != 3 for t in (*c.inputs, *c.outputs)):
        raise ValueError("the layer's input or output is not one (batch, tokens, features) tensor")
    x, z = torch.cat(c.inputs).double(), torch.cat(c.outputs).double()
    for act in ("relu", "gelu"):
        rebuilt = ffn.block_forward(x, w["Q"], w["K"], w["V"], w["W1"], w["W2"], act, c.eps)["Z"]
        if rebuilt.shape == z.shape and bool(
            ((rebuilt - z).norm(dim=(-1, -2)) <= _REBUILD_TOL * z.norm(dim=(-1, -2))).all()
        ):
            return act
    raise ValueError(
        "[P]'s post-norm block Z = LN(σ(Y W_1) W_2 + Y), Y = LN(X + A X W_V) does not reproduce it"
    )


def compare_block_bound(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Any],
    data: Any,
    report: CurvatureReport | None = None,
    *,
    target: Callable[[Any], Tensor] | None = None,
    blocks: Sequence[Block] | None = None,
    iters: int = 100,
    mode: str = "eval",
) -> BlockBoundComparison:
    """[P] Thm 6 on every qualifying layer of ``model`` (module docstring), next to ``report``.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch)``, as for :func:`~lightning_hessian.analyze`.
        data: the curvature data (one batch or several), the data ``report`` was measured on.
        report: the measured curvature; ``None``: the bound only.
        target: ``target(batch) -> Tensor (batch, tokens, features)``: with it, the proven setting is checked.
        blocks: the model's blocks (default :func:`~lightning_hessian.find_blocks`).
        iters: Lanczos steps per norm.
        mode: train/eval mode during the capturing forward pass.

    Returns:
        A :class:`BlockBoundComparison`. The model is left as it was (weights, gradients, buffers, modes,
        RNG).
    """
    if target is not None and not callable(target):
        raise TypeError("target must be a callable target(batch) -> Tensor (batch, tokens, features).")
    blocks = find_blocks(model, warn=False) if blocks is None else list(blocks)
    cands, skipped = _candidates(model, blocks)
    result = BlockBoundComparison(skipped=dict(skipped))
    if not cands:
        return result
    handles = []
    for c in cands:
        handles.append(c.module.register_forward_pre_hook(lambda m, a, c=c: c.inputs.append(_detached(a))))
        handles.append(c.module.register_forward_hook(lambda m, a, o, c=c: c.outputs.append(_detached(o))))
    device = next(model.parameters()).device
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    losses, targets = [], []
    try:
        with curvature_context(model, mode), torch.no_grad():
            for batch in as_batches(data):
                batch = map_tensors(batch, lambda t: t.to(device))
                loss = loss_fn(model, batch)
                losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
                if target is not None:
                    targets.append(target(batch).detach())
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    proven = _proven(cands, losses, targets) if target is not None else "no target"
    result.proven_reason = proven if isinstance(proven, str) else None
    for c in cands:
        try:
            act = _rebuild(c, len(losses))
            x, t = _sequences(c, targets)
        except ValueError as why:
            result.skipped[c.path] = str(why)
            continue
        w = c.weights
        per = [
            bb.block_bound(x[s], w["Q"], w["K"], w["V"], w["W1"], w["W2"], t[s], act, c.eps, iters=iters)
            for s in range(x.shape[0])
        ]
        factors = {k: sum(p.factors[k] for p in per) / len(per) for k in per[0].factors}
        names = {k: b.name for k, b in c.blocks.items()}
        bound = sum(p.bound for p in per) / len(per)
        lb = LayerBlockBound(c.path, names, act, bound, factors, proven=proven is c)
        if report is not None:
            lb.measured, lb.measured_kind = _measured(model, report, c)
        result.layers[c.path] = lb
    return result


def _detached(value: Any) -> Any:
    """The first positional argument or the output, detached when it is a tensor (checked in ``_rebuild``)."""
    value = value[0] if isinstance(value, tuple) and value else value
    return value.detach() if isinstance(value, Tensor) else value


def _sequences(c: _Candidate, targets: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The layer's input sequences and their targets, float64 (the bound depends on ``||Z - T||``)."""
    if not targets:
        raise ValueError("the bound needs the target of the layer's mean-squared error: pass target=")
    x, t = torch.cat(c.inputs).double(), torch.cat(targets).double()
    if x.dim() != 3 or t.shape != x.shape:
        raise ValueError(f"target shape {tuple(t.shape)} differs from the layer's {tuple(x.shape)}")
    return x, t


def _norm(curv: Any) -> float | None:
    if curv is None or curv.top_eigenvalue is None:
        return None
    low = curv.min_eigenvalue if curv.min_eigenvalue is not None else 0.0
    return max(abs(curv.top_eigenvalue), abs(low))


def _measured(model: nn.Module, report: CurvatureReport, c: _Candidate) -> tuple[float | None, str | None]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layer_params = {p for b in c.blocks.values() for p in b.params}
    whole = _norm(report.full) if report.full is not None else None
    if whole is not None and trainable == layer_params:
        return whole, "layer"
    norms = [_norm(report.blocks.get(b.name)) for b in c.blocks.values()]
    if any(n is None for n in norms):
        return None, None
    return max(norms), "max block"  # type: ignore[type-var]


def _proven(
    cands: Sequence[_Candidate], losses: Sequence[float], targets: Sequence[Tensor]
) -> _Candidate | str:
    """The layer whose loss is the model's loss, or why there is none."""
    if len(cands) != 1:
        return f"{len(cands)} qualifying layers; the bound is proven for a model that is one layer"
    c = cands[0]
    if len(c.outputs) != len(losses) or len(targets) != len(losses):
        return "the layer did not run once per curvature batch"
    return loss_mismatch(losses, list(zip(c.outputs, targets))) or c
