r"""Theory versus measured: the papers' attention formulas evaluated on a model's own attention layers.

For every self-attention layer of a model that :func:`find_attention_layers` recognises, the layer's input
``X`` is captured with forward hooks on the curvature data, each head is cast in the papers' single-layer
form ([O] §3, [P] §3; biases by augmentation, ``X W + 1 b^T = [X, 1] [W; b^T]``)

.. math::

    A_h = \operatorname{softmax}\big(X W_{Q,h} W_{K,h}^\top X^\top / \sqrt{d_h} + \text{mask}\big),\qquad
    F_h = A_h X W_{V,h},

and the layer's output is rebuilt from the heads (``concat_h F_h``, then the output projection if the layer
has one). Only a layer whose rebuilt output matches the captured one (relative ``1e-4``; causal and no mask
are tried) is compared: the formulas then provably describe what the layer computes on this batch. For each
such layer :func:`compare_attention` evaluates, with the functions of
:mod:`lightning_hessian.formulas.attention`:

* the Jacobian norms :math:`\|G_Q\|_2, \|G_K\|_2, \|G_V\|_2` of each head's output with respect to its
  query, key and value weights ([O] Thm 3.1), exact (Lanczos on the Gram operator), averaged over the first
  ``jacobian_samples`` sequences; without an output projection the layer's Jacobian is block diagonal over
  heads, so the layer's norm is the largest head's;
* the exact single-layer Gauss-Newton norm of each head and block,
  :math:`c\,\lambda_{\max}\big(\frac1S\sum_s J_s^\top J_s\big)` with :math:`c = 2/(L d)`, over **every**
  sequence of the curvature data (:mod:`lightning_hessian.formulas.gauss_newton`: dense ``eigvalsh`` for
  the value weights, a batched matrix-free Lanczos on the averaged Gram operator for query and key). It is
  the curvature the block would have if the loss were the mean-squared error of this layer's output (the
  Gauss-Newton part, no residual term), so ``theory/<block>/gauss_newton_ratio`` = measured
  :math:`\lambda_{\max}` / it is the **primary** theory-vs-measured number: comparable across query, key and
  value, it says how much the rest of the network and the loss amplify (> 1) or damp (< 1) the layer's own
  curvature. In the proven setting the value block's ratio is exactly 1 (no functional part);
* the corrected single-layer bounds of [P] Thm 1 (docs/formulas.md §3) on the spectral norm of the
  query-query, key-key and value-value Hessian blocks of the mean-squared error
  :math:`\ell = \|\operatorname{concat}_h F_h - T\|_F^2 / (L d)`, averaged over every sequence of the
  curvature data (the Hessian of a mean is bounded by the mean of the bounds): the outer-product
  (Gauss-Newton) part, which needs no target, always; the total (outer + functional) part when the target
  ``T`` is known.

Where a bound is proven, and where it is a normaliser:

* **Proven** (the papers' setting): the model's loss on the curvature data *is* that mean-squared error of
  this one attention layer's output, with no output projection after it. :func:`compare_attention` checks
  this numerically (one recognised layer, no output projection, and the loss equals the mean-squared error
  of the captured output against ``target(batch)`` to relative ``1e-5``). Then the measured block norm
  :math:`\max(|\lambda_{\max}|, |\lambda_{\min}|)` can never exceed the total bound, and
  ``theory/<block>/bound_ratio`` (measured / bound) above 1 is a bug, raised by
  :class:`~lightning_hessian.alerts.BoundViolation`. (Lanczos Ritz values lie inside the spectrum, so an
  inexact measurement cannot cause a false violation.)
* **Normaliser** (every other model: deeper stacks, an output projection, cross-entropy): the loss sees
  the layer through the rest of the network, so no bound is proven. ``theory/<block>/outer_ratio`` =
  measured :math:`\lambda_{\max}` / outer-part bound is then a dimensionless curvature: how much the rest of
  the network and the loss amplify the corrected *bound* on the single-layer Gauss-Newton curvature. The bound
  carries worst-case factors (:math:`\|X\|^6` for query/key), so this ratio mostly measures how loose the
  bound is (2e-5 to 1.5e-3 for query/key against 0.5-12 for value on examples/analyze_tiny_transformer.py);
  ``gauss_newton_ratio`` is the comparable number.

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, "What Does It Mean to Be a Transformer? Insights from a
        Theoretical Hessian Analysis", ICLR 2025, arXiv:2410.10986.
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians
        and Their Implications for Scaling Laws", arXiv:2510.16927.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import tags
from ._context import curvature_context
from .batches import as_batches, map_tensors
from .block_selection import cached_blocks
from .blocks import Block, BlockPart, FusedLayout, display_name, find_blocks, stores_weight_transposed
from .formatting import format_number
from .formulas import attention as attn
from .formulas.gauss_newton import gauss_newton_norms
from .report import CurvatureReport

__all__ = ["AttentionLayer", "LayerTheory", "TheoryComparison", "compare_attention", "find_attention_layers"]

_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "heads")
_INPUT_KWARGS = ("query", "hidden_states", "x", "input", "inputs")
_OUT_NAMES = ("out_proj", "o_proj", "c_proj", "proj", "wo", "to_out")  # output projections inside the layer
_NAMES = {"query": "Q", "key": "K", "value": "V"}
_REBUILD_TOL = 1e-4  # relative Frobenius error of the rebuilt layer output (float32 round-off is ~1e-6)
_REBUILD_SEQUENCES = 4  # sequences the rebuild is checked on
_CHUNK = 8  # sequences per batched bound evaluation (memory: chunk x heads x L^2)
_LOSS_TOL = 1e-5  # relative error of the loss against the mean-squared error in the proven setting


_LEGEND = (
    "*measured / GN*: measured λ_max over the exact single-layer Gauss-Newton norm c·λ_max(mean over all "
    "sequences of J_s'J_s), c = 2/(L·d): how much the rest of the network and the loss amplify (> 1) or damp "
    "(< 1) the layer's own curvature; comparable across Q, K, V. *measured / outer*: over a worst-case bound "
    "instead, mostly the bound's looseness (far below 1 for Q, K). *measured / bound*: a theorem only where "
    "marked (proven): ≤ 1."
)


class _Unsupported(Exception):
    """The layer is outside what the formulas describe; the message says why."""


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """A self-attention layer whose query, key and value blocks were found.

    Attributes:
        name: the attention module's path (``"blocks.0.attn"``).
        module: that module (its input is the layer's ``X``).
        blocks: the ``"Q"``, ``"K"`` and ``"V"`` blocks (see :func:`~lightning_hessian.find_blocks`).
        out: the output projection module, or ``None`` when the heads' concatenation is the output.
        num_heads: number of heads, read from the module (``num_heads``, ``n_head``, ``heads``, ...).
    """

    name: str
    module: nn.Module
    blocks: Mapping[str, Block]
    out: nn.Module | None
    num_heads: int


@dataclass
class LayerTheory:
    r"""The theory for one attention layer on one curvature pass.

    Attributes:
        layer: the attention module's path.
        blocks: block names by ``"Q"``, ``"K"``, ``"V"``.
        mask: ``"none"`` or ``"causal"``, the mask that reproduced the layer's output.
        heads: number of heads.
        input_norm: mean over sequences of :math:`\|X\|_2` (the input scale of [O]'s growth laws).
        jacobian: per ``"Q"``, ``"K"``, ``"V"``, the norm :math:`\|G\|_2` of each head (mean over the first
            ``jacobian_samples`` sequences).
        gauss_newton: per ``"Q"``, ``"K"``, ``"V"``, the exact single-layer Gauss-Newton norm of each head,
            :math:`c\,\lambda_{\max}(\frac1S\sum_s J_s^\top J_s)` with :math:`c = 2/(L d)`, over every
            sequence of the curvature data
            (:func:`~lightning_hessian.formulas.gauss_newton.gauss_newton_norms`); the layer's is the largest
            head's (without an output projection the layer's Gram operator is block diagonal over heads).
        outer_bound: per ``"Q"``, ``"K"``, ``"V"``, the corrected bound on the outer (Gauss-Newton) part of
            the diagonal Hessian block of the single-layer mean-squared error.
        bound: the same for the whole block (outer + functional), when the target is known; else ``None``.
        measured: per ``"Q"``, ``"K"``, ``"V"``, the measured block norm ``max(|λ_max|, |λ_min|)`` (from the
            report, when given).
        proven: whether the bounds are proven for the measured Hessian (see the module docstring).
    """

    layer: str
    blocks: dict[str, str]
    mask: str
    heads: int
    input_norm: float
    jacobian: dict[str, list[float]]
    outer_bound: dict[str, float]
    gauss_newton: dict[str, list[float]] = field(default_factory=dict)
    bound: dict[str, float] | None = None
    measured: dict[str, float] = field(default_factory=dict)
    top: dict[str, float] = field(default_factory=dict)
    proven: bool = False


@dataclass
class TheoryComparison:
    """The theory of every recognised attention layer, and the layers left out with the reason.

    Attributes:
        layers: by attention module path.
        skipped: attention module path -> why it is not compared.
        proven_reason: why the setting is not the proven one (``None`` when it is, or when no target was
            given).
    """

    layers: dict[str, LayerTheory] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    proven_reason: str | None = None

    def scalars(self) -> dict[str, float]:
        """The ``theory/...`` tags of :mod:`lightning_hessian.tags` for this pass."""
        out: dict[str, float] = {}
        for lt in self.layers.values():
            out[tags.theory_tag(lt.layer, "input_norm")] = lt.input_norm
            jac = {n: max(v) for n, v in lt.jacobian.items()}
            if jac["V"] > 0:
                out[tags.theory_tag(lt.layer, "qk_over_v")] = max(jac["Q"], jac["K"]) / jac["V"]
            for stat, per_head in (("jacobian", lt.jacobian), ("gauss_newton", lt.gauss_newton)):
                for n, values in per_head.items():
                    for h, value in enumerate(values):
                        out[tags.theory_tag(f"{lt.layer}/head_{h}", f"{stat}_{n.lower()}")] = value
            for n, block in lt.blocks.items():
                out[tags.theory_tag(block, "jacobian_norm")] = jac[n]
                out[tags.theory_tag(block, "outer_bound")] = lt.outer_bound[n]
                gn = max(lt.gauss_newton[n]) if n in lt.gauss_newton else math.nan
                if math.isfinite(gn):
                    out[tags.theory_tag(block, "gauss_newton")] = gn
                    if n in lt.top and gn > 0:
                        out[tags.theory_tag(block, "gauss_newton_ratio")] = lt.top[n] / gn
                if n in lt.top and lt.outer_bound[n] > 0:
                    out[tags.theory_tag(block, "outer_ratio")] = lt.top[n] / lt.outer_bound[n]
                if lt.bound is not None:
                    out[tags.theory_tag(block, "bound")] = lt.bound[n]
                    if lt.proven and n in lt.measured and lt.bound[n] > 0:
                        out[tags.theory_tag(block, "bound_ratio")] = lt.measured[n] / lt.bound[n]
        return out

    def table(self) -> str:
        """A Markdown table: one row per compared block, then the skipped layers."""
        rows = [
            "| block | heads | mask | max head ‖G‖ | measured λ_max | single-layer GN | measured / GN | "
            "outer bound | measured / outer | bound | measured / bound |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def num(x: float | None) -> str:
            return format_number(x if x is None or math.isfinite(x) else None)

        for lt in self.layers.values():
            for n, block in lt.blocks.items():
                top = lt.top.get(n)
                bound = None if lt.bound is None else lt.bound[n]
                ratio = lt.measured[n] / bound if (lt.proven and bound and n in lt.measured) else None
                outer_ratio = top / lt.outer_bound[n] if top is not None and lt.outer_bound[n] > 0 else None
                gn = max(lt.gauss_newton[n]) if n in lt.gauss_newton else None
                gn_ratio = top / gn if top is not None and gn else None
                rows.append(
                    f"| `{block}` | {lt.heads} | {lt.mask} | {num(max(lt.jacobian[n]))} | {num(top)} | "
                    f"{num(gn)} | {num(gn_ratio)} | {num(lt.outer_bound[n])} | {num(outer_ratio)} | "
                    f"{num(bound)} | "
                    f"{num(ratio)}{' (proven)' if ratio is not None else ''} |"
                )
        if self.layers:
            rows.append("\n" + _LEGEND)
        for name, reason in self.skipped.items():
            rows.append(f"\n`{name}`: not compared ({reason})")
        return "\n".join(rows)


# --- recognising layers ----------------------------------------------------------------------------------


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def find_attention_layers(
    model: nn.Module,
    blocks: Sequence[Block] | None = None,
    rules: Mapping[str, str | FusedLayout] | None = None,
) -> tuple[list[AttentionLayer], dict[str, str]]:
    """Group the query, key and value blocks of ``model`` into attention layers.

    A layer's module is the one that holds the query/key/value parameters (``nn.MultiheadAttention``'s
    ``in_proj_weight``) or the parent of the projections that hold them (``attn.qkv``, ``self.query``). Its
    output projection is the ``attn_out`` block inside that module (BERT's ``attention.output.dense`` is
    outside ``attention.self``: there the heads' concatenation is the output).

    Args:
        model: the model.
        blocks: its blocks (default: :func:`~lightning_hessian.find_blocks` with ``rules``, no warning).
        rules: extra rules for :func:`~lightning_hessian.find_blocks`.

    Returns:
        The layers, and ``{module path: reason}`` for attention modules that cannot be compared (no head
        count, missing query/key/value block).
    """
    blocks = find_blocks(model, rules, warn=False) if blocks is None else list(blocks)
    modules = dict(model.named_modules())
    groups: dict[str, dict[str, Block]] = {}
    for block in blocks:
        if block.kind not in _NAMES:
            continue
        owner = _owner(block.parts[0].param)
        path = owner if isinstance(modules.get(owner), nn.MultiheadAttention) else _owner(owner)
        groups.setdefault(path, {})[_NAMES[block.kind]] = block
    layers, skipped = [], {}
    for path, found in groups.items():
        module = modules.get(path)
        if module is None or sorted(found) != ["K", "Q", "V"]:
            skipped[display_name(path)] = f"needs one query, key and value block, found {sorted(found)}"
            continue
        heads = next(
            (getattr(module, a) for a in _HEAD_ATTRS if isinstance(getattr(module, a, None), int)), None
        )
        if heads is None or heads < 1:
            skipped[display_name(path)] = f"no head count on the module (looked for {', '.join(_HEAD_ATTRS)})"
            continue
        out = None
        for block in blocks:
            if block.kind == "attn_out" and all(p.startswith(path + ".") for p in block.params):
                weight = next((p for p in block.params if p.endswith("weight")), block.params[0])
                out = modules.get(_owner(weight))
                break
        if out is None:  # a frozen output projection has no block, but the layer still applies it
            children = (getattr(module, n, None) for n in _OUT_NAMES)
            out = next((child for child in children if isinstance(child, nn.Module)), None)
        # Named like the blocks (without torch.compile's wrapper component), so tags of a layer and of its
        # blocks share a prefix.
        layers.append(
            AttentionLayer(name=display_name(path), module=module, blocks=found, out=out, num_heads=heads)
        )
    return layers, skipped


def _projection(
    params: Mapping[str, Tensor], modules: Mapping[str, nn.Module], block: Block
) -> tuple[Tensor, Tensor | None]:
    """A block's weight as ``d_in x d_out`` (the papers' orientation) and its bias."""
    weight = bias = None
    for part in block.parts:
        t = part.select(params[part.param].detach())
        if t.dim() == 2 and weight is None:
            conv1d = stores_weight_transposed(modules.get(_owner(part.param)))
            weight = t if part.dim == 1 or (part.dim is None and conv1d) else t.T
        elif t.dim() == 1 and bias is None:
            bias = t
        else:
            raise _Unsupported(f"unexpected parameter {part.param} of shape {tuple(t.shape)} in {block.name}")
    if weight is None:
        raise _Unsupported(f"no weight matrix in {block.name}")
    if bias is None:  # a frozen bias is not in the block, but it is in the layer's computation
        part = next(p for p in block.parts if params[p.param].dim() == 2)
        head, _, tail = part.param.rpartition("weight")
        frozen = params.get(head + "bias" + tail) if part.param.endswith("weight") else None
        if frozen is not None and frozen.dim() == 1:
            bias = (
                frozen.detach()
                if part.dim is None
                else BlockPart.along(part.param, 0, part.indices).select(frozen.detach())
            )
    return weight, bias


# --- capturing inputs ------------------------------------------------------------------------------------


@dataclass
class _Capture:
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    calls: int = 0
    problem: str | None = None


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _hooks(layer: AttentionLayer, capture: _Capture) -> list[Any]:
    module = layer.module
    seq_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        capture.calls += 1
        x = args[0] if args else next((kwargs[k] for k in _INPUT_KWARGS if k in kwargs), None)
        if isinstance(mod, nn.MultiheadAttention):
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            if key is not x or value is not x:
                capture.problem = "cross-attention (keys/values are not the queries' input)"
            padding = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
            if padding is not None and bool(torch.as_tensor(padding).any()):
                capture.problem = "a key padding mask (the formulas assume whole sequences)"
        if not isinstance(x, Tensor) or x.dim() != 3:
            capture.problem = "the layer's input is not a (batch, tokens, features) tensor"
            return
        capture.inputs.append((x.transpose(0, 1) if seq_first else x).detach())

    def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        y = _first_tensor(output)
        if y is None or y.dim() != 3:
            capture.problem = "the layer's output is not a (batch, tokens, features) tensor"
            return
        capture.outputs.append((y.transpose(0, 1) if seq_first else y).detach())

    return [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True),
    ]


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(enabled)


# --- evaluating the theory -------------------------------------------------------------------------------


def _causal(n: int, like: Tensor) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=like.device).tril()


def _heads(weight: Tensor, heads: int) -> Tensor:
    """``d_in x (H d_h)`` -> ``H x d_in x d_h`` (head ``h`` = columns ``h d_h : (h+1) d_h``)."""
    d_in, d_out = weight.shape
    return weight.reshape(d_in, heads, d_out // heads).permute(1, 0, 2)


@dataclass
class _Prepared:
    x: Tensor  # S x L x (d + 1), float64, the ones column last
    weights: dict[str, Tensor]  # H x (d + 1) x d_h, float64
    mask: Tensor | None
    mask_name: str
    d_model: int


def _prepare(layer: AttentionLayer, model: nn.Module, capture: _Capture, n_batches: int) -> _Prepared:
    """Cast the layer in the papers' form and check that it reproduces the captured output."""
    if capture.problem is not None:
        raise _Unsupported(capture.problem)
    if capture.calls != n_batches or len(capture.inputs) != n_batches or len(capture.outputs) != n_batches:
        raise _Unsupported(f"the layer ran {capture.calls} times on {n_batches} batches, not once per batch")
    lengths = {x.shape[1] for x in capture.inputs}
    if len(lengths) != 1:
        raise _Unsupported("sequence lengths differ between curvature batches")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    raw = {n: _projection(params, modules, b) for n, b in layer.blocks.items()}
    d_in = capture.inputs[0].shape[-1]
    h = layer.num_heads
    widths = {n: tuple(w.shape) for n, (w, _) in raw.items()}
    if any(s[0] != d_in for s in widths.values()):
        raise _Unsupported(f"projection shapes {widths} do not take inputs of width {d_in}")
    if widths["Q"] != widths["K"] or any(s[1] % h for s in widths.values()):
        raise _Unsupported(f"projection shapes {widths} do not split into {h} equal heads (grouped queries?)")
    weights = {}
    for n, (w, b) in raw.items():
        b = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device) if b is None else b
        weights[n] = _heads(torch.cat([w, b[None]], 0).double(), h)
    x = torch.cat(capture.inputs).double()
    x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    y = torch.cat(capture.outputs).double()
    d_out = widths["V"][1]
    first = x[: min(capture.inputs[0].shape[0], _REBUILD_SEQUENCES), None]
    # Half-precision layers round far more than float32: allow a few units in the last place.
    tol = max(_REBUILD_TOL, 4 * torch.finfo(capture.outputs[0].dtype).eps)
    for mask_name, mask in (("none", None), ("causal", _causal(x.shape[1], x))):
        f = attn.forward(first, weights["Q"][None], weights["K"][None], weights["V"][None], mask=mask)["F"]
        rebuilt = f.permute(0, 2, 1, 3).reshape(first.shape[0], x.shape[1], d_out)
        if layer.out is not None:
            with torch.no_grad():
                rebuilt = layer.out(rebuilt.to(capture.outputs[0].dtype)).double()
        target = y[: first.shape[0]]
        if rebuilt.shape == target.shape and (rebuilt - target).norm() <= tol * target.norm():
            return _Prepared(x=x, weights=weights, mask=mask, mask_name=mask_name, d_model=d_out)
    raise _Unsupported(
        "the papers' attention (scaled dot product, softmax, no mask or a causal one, heads split evenly) "
        "does not reproduce the layer's output (rotary embeddings, other scaling, extra masks?)"
    )


def _evaluate(
    layer: AttentionLayer, prep: _Prepared, targets: Tensor | None, jacobian_samples: int | None, iters: int
) -> LayerTheory:
    x, w, mask = prep.x, prep.weights, prep.mask
    h = layer.num_heads
    d_h = w["V"].shape[-1]
    scale = d_h / prep.d_model  # the layer's c = 2/(L d) against each head's 2/(L d_h)
    per_head_target = None
    if targets is not None:
        per_head_target = targets.double().reshape(*targets.shape[:2], h, d_h).permute(0, 2, 1, 3)
    # Mean over sequences of the per-sequence, per-head bounds, in chunks of sequences to bound memory.
    sums: dict[tuple[str, str], Tensor] = {}
    for start in range(0, x.shape[0], _CHUNK):
        chunk = slice(start, start + _CHUNK)
        t_chunk = None if per_head_target is None else per_head_target[chunk]
        terms = attn.bound_terms(
            x[chunk, None], w["Q"][None], w["K"][None], w["V"][None], t_chunk, "corrected", None, mask
        )
        for n in "QKV":
            for part in ("outer", "total"):
                value = terms[(n, n)][part].sum(0)
                sums[(n, part)] = value if (n, part) not in sums else sums[(n, part)] + value
    outer = {n: float((scale * sums[(n, "outer")] / x.shape[0]).max()) for n in "QKV"}
    bound = None
    if per_head_target is not None:
        bound = {n: float((scale * sums[(n, "total")] / x.shape[0]).max()) for n in "QKV"}
    # Every (sequence, head) Gram operator in one Lanczos loop: sequences x heads broadcast.
    samples = x[: x.shape[0] if jacobian_samples is None else jacobian_samples, None]
    norms = attn.jacobian_norms(samples, w["Q"][None], w["K"][None], w["V"][None], iters=iters, mask=mask)
    jac = {n: [float(v) for v in norms[n].mean(0)] for n in "QKV"}  # type: ignore[union-attr]
    # The layer's loss is the mean-squared error of the heads' concatenation: c = 2 / (L d), d its width.
    c = 2.0 / (x.shape[1] * prep.d_model)
    gn = gauss_newton_norms(x, w["Q"], w["K"], w["V"], c=c, mask=mask, iters=iters, chunk=_CHUNK)
    input_norm = float(torch.linalg.matrix_norm(x[..., :-1], ord=2).mean())
    return LayerTheory(
        layer=layer.name,
        blocks={n: b.name for n, b in layer.blocks.items()},
        mask=prep.mask_name,
        heads=h,
        input_norm=input_norm,
        jacobian=jac,
        outer_bound=outer,
        gauss_newton={n: [float(v) for v in gn[n]] for n in "QKV"},
        bound=bound,
    )


def _loss_value(value: Any) -> float:
    loss = value[0] if isinstance(value, tuple) else value
    return float(loss.detach().double()) if isinstance(loss, Tensor) and loss.numel() == 1 else math.nan


def compare_attention(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Any],
    data: Any,
    report: CurvatureReport | None = None,
    *,
    target: Callable[[Any], Tensor] | None = None,
    blocks: Sequence[Block] | None = None,
    rules: Mapping[str, str | FusedLayout] | None = None,
    jacobian_samples: int | None = None,
    iters: int = 30,
    mode: str = "eval",
) -> TheoryComparison:
    r"""Evaluate the papers' attention theory on ``model``'s own layers and compare it with ``report``.

    One forward pass of ``loss_fn`` per curvature batch (no gradients) captures each attention layer's input
    and output; then, per layer, the Jacobian norms and the corrected [P] Thm 1 bounds described in
    :mod:`lightning_hessian.theory`. The model is left as it was (same context as a curvature pass).

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch)``, as for :func:`~lightning_hessian.analyze`.
        data: one batch, or several (:class:`~lightning_hessian.operators.Batches`, a DataLoader): the same
            data the report was measured on, so the bounds cover the measured Hessian.
        report: the measured curvature (:func:`~lightning_hessian.analyze`); its query/key/value blocks'
            eigenvalues fill ``measured`` and the ratios. ``None``: theory only.
        target: ``target(batch) -> Tensor (batch, tokens, features)``, the regression target of the papers'
            setting. When given and the setting checks out (module docstring), the total bounds are proven
            and ``bound_ratio`` is reported.
        blocks: the model's blocks (default: :func:`~lightning_hessian.find_blocks` with ``rules``).
        rules: extra rules for :func:`~lightning_hessian.find_blocks` (as given to ``analyze``).
        jacobian_samples: how many sequences the per-sequence Jacobian norms ``jacobian`` are averaged over
            (each costs ``2 x iters`` small products per head); ``None``: every sequence. The Gauss-Newton
            norms, the primary normaliser, always use every sequence.
        iters: Lanczos steps for each Jacobian and Gauss-Newton norm (from below; exact once the Krylov space
            is exhausted).
        mode: train/eval mode during the forward pass, as in :func:`~lightning_hessian.analyze`.

    Returns:
        A :class:`TheoryComparison`.
    """
    if jacobian_samples is not None and (
        isinstance(jacobian_samples, bool) or not isinstance(jacobian_samples, int) or jacobian_samples < 1
    ):
        raise ValueError(
            f"jacobian_samples must be a positive int or None (every sequence), got {jacobian_samples!r}."
        )
    if target is not None and not callable(target):
        raise TypeError("target must be a callable target(batch) -> Tensor (batch, tokens, features).")
    batches = as_batches(data)
    if blocks is None:  # the layouts read off the attention, as analyze finds them
        blocks, _ = cached_blocks(model, rules, loss_fn, batches[0])
    layers, skipped = find_attention_layers(model, blocks, rules)
    result = TheoryComparison(skipped=dict(skipped))
    if not layers:
        return result
    captures = {layer.name: _Capture() for layer in layers}
    device = next(model.parameters()).device
    losses, mses = [], []
    handles = [h for layer in layers for h in _hooks(layer, captures[layer.name])]
    # The forward runs on the live module: in training mode normalisation layers would update their running
    # statistics, so every buffer is restored afterwards.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        # No gradients; PyTorch's fused Transformer fast path (taken without gradients) would bypass the
        # attention modules and their hooks.
        with curvature_context(model, mode), torch.no_grad(), _no_mha_fastpath():
            for batch in batches:
                batch = map_tensors(batch, lambda t: t.to(device))  # the containers analyze accepts
                before = {name: len(c.outputs) for name, c in captures.items()}
                losses.append(_loss_value(loss_fn(model, batch)))
                if target is not None and len(layers) == 1:
                    outputs = captures[layers[0].name].outputs
                    t = target(batch)
                    if len(outputs) == before[layers[0].name] + 1 and isinstance(t, Tensor):
                        y = outputs[-1]
                        mses.append((y, t.detach().to(y.device)))
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])

    proven_layer = None
    if target is not None:
        proven_layer, result.proven_reason = _proven(layers, losses, mses)
    for layer in layers:
        try:
            prep = _prepare(layer, model, captures[layer.name], len(losses))
        except _Unsupported as why:
            result.skipped[layer.name] = str(why)
            continue
        targets = None
        if layer is proven_layer:
            targets = torch.cat([t for _, t in mses])
        theory = _evaluate(layer, prep, targets, jacobian_samples, iters)
        theory.proven = targets is not None
        if report is not None:
            for n, name in theory.blocks.items():
                measured = report.blocks.get(name)
                if measured is None or measured.top_eigenvalue is None:
                    continue
                theory.top[n] = measured.top_eigenvalue
                low = measured.min_eigenvalue if measured.min_eigenvalue is not None else 0.0
                theory.measured[n] = max(abs(measured.top_eigenvalue), abs(low))
        result.layers[layer.name] = theory
    if proven_layer is not None and proven_layer.name not in result.layers:
        why = result.skipped[proven_layer.name]
        result.proven_reason = f"layer {proven_layer.name} is not compared: {why}"
    return result


def _proven(
    layers: Sequence[AttentionLayer], losses: Sequence[float], mses: Sequence[tuple[Tensor, Tensor]]
) -> tuple[AttentionLayer | None, str | None]:
    """The layer whose single-layer bound is proven for the model's loss, or ``None`` and the reason."""
    if len(layers) != 1:
        return None, f"the model has {len(layers)} attention layers; the bounds are proven for one"
    layer = layers[0]
    if layer.out is not None:
        return None, "the layer has an output projection; the bounds are proven without one"
    if len(mses) != len(losses):
        return None, "target(batch) did not give a tensor for every curvature batch"
    mismatch = loss_mismatch(losses, mses)
    return (None, mismatch) if mismatch else (layer, None)


def loss_mismatch(losses: Sequence[float], outputs_and_targets: Sequence[tuple[Any, Tensor]]) -> str | None:
    """Why the model's loss is not the mean-squared error of a layer's output against the target on every
    curvature batch (the papers' proven setting), or ``None`` when it is."""
    for loss, (y, t) in zip(losses, outputs_and_targets, strict=True):
        if not isinstance(y, Tensor) or y.shape != t.shape:
            return (
                f"target shape {tuple(t.shape)} differs from the layer output's {getattr(y, 'shape', None)}"
            )
        mse = float(((y.double() - t.double()) ** 2).mean())
        if not abs(loss - mse) <= _LOSS_TOL * max(abs(mse), 1e-30):
            return (
                f"the loss ({loss:.6g}) is not the mean-squared error of the layer's output against the "
                f"target ({mse:.6g})"
            )
    return None
