"""Query / key / value layouts read off the attention computation itself, not guessed from names.

A fused projection (``qkv``, ``c_attn``, ``query_key_value``, ``Wqkv``, ``in_proj_weight``, ...) stores
the query, key and value rows in an order only the model's forward knows: contiguous ``[Q | K | V]``,
grouped-query sizes, ``[K | V]`` for cross-attention, per-head or per-group interleaved, or chunked in
another order. :func:`infer_layouts` runs the model once on an example and watches every attention
call:

* ``torch.nn.functional.scaled_dot_product_attention`` (Hugging Face's ``"sdpa"``, PyTorch 2 models),
* ``torch.nn.functional.multi_head_attention_forward`` (:class:`torch.nn.MultiheadAttention`, whose
  ``q, k, v`` are internal to the function: its parameters are labelled by the function's documented
  layout, and the call still tells self- from cross-attention),
* plain attention: a ``matmul`` / ``bmm`` / ``baddbmm`` / ``einsum`` whose result goes through a
  ``softmax`` (with any scaling, masking, bias, dtype casts or dropout in between) into a second
  ``matmul``: its operands are the query and key, the second matmul's other operand the value
  (Hugging Face's ``"eager"`` attention, nanoGPT, BERT, T5, BLOOM's ``baddbmm``, ...).

For each call it takes the tensors ``q``, ``k``, ``v`` the attention received and the module that owns
the call (the innermost module on the call stack holding parameters that reach them), and labels each
entry of each of that module's parameters by which of ``q``, ``k``, ``v`` the gradient of a random
projection ``<R, q>`` (resp. ``k``, ``v``) reaches. Entries that reach one of them only are that role's;
entries that reach several (a norm before the projections) or none (the output projection) are not
labelled. The labels are exact up to a gradient entry vanishing by accident (probability zero for
generic weights and inputs; a zero-initialised weight, e.g. a fresh LoRA factor, can hide a role).

The labels of a parameter must be constant along all dimensions but one (rows of ``nn.Linear``, columns
of GPT-2's transposed ``Conv1D``): that dimension and the index sets along it are the layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from lightning_hessian._context import curvature_context

__all__ = ["AttentionCall", "Layouts", "ParamLayout", "infer_layouts"]

ROLES = ("query", "key", "value")

_SDPA = {F.scaled_dot_product_attention}
_MHA = {F.multi_head_attention_forward}
_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax}
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.mm, Tensor.mm}
_BADDBMM = {torch.baddbmm, Tensor.baddbmm}
_EINSUM = {torch.einsum}


@dataclass(frozen=True)
class ParamLayout:
    """Which entries of one parameter feed the query, key and value of its attention.

    Attributes:
        param: the parameter's name in ``model.named_parameters()``.
        dim: the dimension the roles lie along (``None`` when the whole parameter has one role).
        roles: role -> sorted indices along ``dim`` (all of them when ``dim`` is ``None``). Indices in no
            role (an output or feed-forward part of a fused projection) are absent.
        problem: why the labels could not be turned into a layout (then ``roles`` is empty), or ``None``.
    """

    param: str
    dim: int | None
    roles: dict[str, tuple[int, ...]]
    problem: str | None = None


@dataclass(frozen=True)
class AttentionCall:
    """One attention computation seen during the example's forward pass.

    Attributes:
        module: path of the module that owns it (``""`` for the root).
        self_attention: whether query and key come from the same upstream computation (cross-attention
            keys come from another input, e.g. an encoder's output).
        via: how it was captured: ``"sdpa"``, ``"multi_head_attention"`` or ``"softmax"``.
    """

    module: str
    self_attention: bool
    via: str


@dataclass(frozen=True)
class Layouts:
    """What :func:`infer_layouts` found: per-parameter layouts and the attention calls."""

    params: dict[str, ParamLayout]
    calls: tuple[AttentionCall, ...]


class _Tag:
    """Provenance of a tensor on the way from ``q @ k^T`` to ``softmax(...) @ v``."""

    __slots__ = ("key", "probs", "query")

    def __init__(self, query: Tensor, key: Tensor, probs: bool) -> None:
        self.query, self.key, self.probs = query, key, probs


class _Capture(TorchFunctionMode):
    """Records ``(q, k, v, via)`` of every attention call, with the module stack at that moment."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: list[tuple[Tensor, Tensor, Tensor, str, tuple[str, ...]]] = []
        self.modules: list[tuple[Tensor, Tensor, tuple[str, ...]]] = []  # nn.MultiheadAttention calls
        self._tags: dict[int, tuple[Tensor, _Tag]] = {}  # id -> (tensor kept alive, tag)

    def _tag(self, value: Any) -> _Tag | None:
        if isinstance(value, Tensor):
            entry = self._tags.get(id(value))
            return entry[1] if entry is not None and entry[0] is value else None
        if isinstance(value, list | tuple):
            return next((t for t in map(self._tag, value) if t is not None), None)
        return None

    def _set(self, out: Any, tag: _Tag) -> None:
        for t in out if isinstance(out, list | tuple) else (out,):
            if isinstance(t, Tensor):
                self._tags[id(t)] = (t, tag)

    def _record(self, q: Tensor, k: Tensor, v: Tensor, via: str) -> None:
        if all(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v)):
            self.calls.append((q, k, v, via, tuple(self.stack)))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SDPA:
            named = dict(zip(("query", "key", "value"), args))
            named.update({k: kwargs[k] for k in ("query", "key", "value") if k in kwargs})
            self._record(named["query"], named["key"], named["value"], "sdpa")
        elif func in _MHA:  # its q, k, v are internal: its documented layout labels the entries below
            query, key = (args[i] if len(args) > i else kwargs[n] for i, n in ((0, "query"), (1, "key")))
            self.modules.append((query, key, tuple(self.stack)))
        elif func in _MATMUL or func in _BADDBMM or func in _EINSUM:
            operands = _operands(func, args, kwargs)
            if operands is not None:
                self._matmul(out, *operands)
        elif func in _SOFTMAX:
            tag = self._tag(args[0] if args else kwargs.get("input"))
            if tag is not None and not tag.probs:
                self._set(out, _Tag(tag.query, tag.key, probs=True))
        else:
            tag = self._tag(list(args) + list(kwargs.values()))
            if tag is not None:
                self._set(out, tag)
        return out

    def _matmul(self, out: Any, left: Tensor, right: Tensor) -> None:
        left_tag, right_tag = self._tag(left), self._tag(right)
        for probs, other in ((left_tag, right), (right_tag, left)):
            if probs is not None and probs.probs:
                self._record(probs.query, probs.key, other, "softmax")
                return
        if not (_is_parameter_view(left) or _is_parameter_view(right)):
            self._set(out, _Tag(left, right, probs=False))


def _operands(func: Any, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """The two multiplied tensors of a matmul-like call (``None`` when it is not a product of two)."""
    if func in _BADDBMM:
        pair = (
            kwargs.get("batch1", args[1] if len(args) > 1 else None),
            kwargs.get("batch2", args[2] if len(args) > 2 else None),
        )
    elif func in _EINSUM:
        tensors = args[1:] if len(args) > 2 else (args[1] if len(args) == 2 else ())
        pair = tuple(tensors) if isinstance(tensors, list | tuple) and len(tensors) == 2 else (None, None)
    else:
        pair = (args[0] if args else kwargs.get("input"), args[1] if len(args) > 1 else kwargs.get("other"))
    return pair if all(isinstance(t, Tensor) for t in pair) else None  # type: ignore[return-value]


_VIEWS = {
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ViewBackward0",
    "UnsqueezeBackward0",
    "ExpandBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
}


def _is_parameter_view(t: Tensor) -> bool:
    """Whether ``t`` is a parameter itself or a view of one (a projection ``x @ W``, not attention)."""
    node = t.grad_fn
    if node is None:
        return t.requires_grad
    while type(node).__name__ in _VIEWS:
        nxt = [n for n, _ in node.next_functions if n is not None]
        if len(nxt) != 1:
            return False
        node = nxt[0]
    return type(node).__name__ == "AccumulateGrad"


def _mha_labels(module: str, params: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Role masks of an :class:`torch.nn.MultiheadAttention`'s parameters, from PyTorch's own layout.

    ``F.multi_head_attention_forward`` takes rows ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)`` of ``in_proj_weight``
    / ``in_proj_bias`` for q, k, v (or the separate ``q/k/v_proj_weight``) and appends ``bias_k`` /
    ``bias_v`` to k / v. Labelling from this contract, instead of re-running the in-projection, adds no
    operation to the forward (activation checkpointing counts the saved tensors).
    """
    prefix = f"{module}." if module else ""
    labels: dict[str, dict[str, Tensor]] = {}
    for name, roles in (
        ("in_proj_weight", ROLES),
        ("in_proj_bias", ROLES),
        ("q_proj_weight", ("query",)),
        ("k_proj_weight", ("key",)),
        ("v_proj_weight", ("value",)),
        ("bias_k", ("key",)),
        ("bias_v", ("value",)),
    ):
        param = params.get(prefix + name)
        if param is None:
            continue
        rows = param.shape[0] // len(roles)
        masks = labels.setdefault(prefix + name, {})
        for i, role in enumerate(roles):
            masks[role] = torch.zeros(param.shape, dtype=torch.bool)
            masks[role][i * rows : (i + 1) * rows] = True
    return labels


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """The paths of the modules whose forward is running, outermost first."""
    stack: list[str] = []
    handles = []

    def push(path: str) -> Callable[..., None]:
        return lambda module, args: stack.append(path) and None

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()  # returns None: a forward hook's return value would replace the output

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(path)))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _reached(tensor: Tensor) -> set[Tensor]:
    """The leaf tensors (parameters) that ``tensor``'s autograd graph reaches."""
    seen, leaves, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return leaves


def infer_layouts(model: nn.Module, forward: Callable[[nn.Module], Any], seed: int = 0) -> Layouts:
    """Run ``forward(model)`` once and read the query / key / value layouts off its attention calls.

    The model runs on detached copies of its parameters and buffers (:func:`torch.func.functional_call`)
    in eval mode, with its random streams isolated: its weights, ``.grad``, buffers, flags and RNG are
    left as they were, even when the forward writes to its tensors in place.

    Args:
        model: the model.
        forward: runs the model on an example, e.g. ``lambda m: m(x)``.
        seed: seed of the random projections ``R``.

    Returns:
        The layouts of every parameter that feeds a query, key or value directly, and the attention calls.
    """
    tensors = {
        name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in model.named_parameters()
    }
    names = {t: name for name, t in tensors.items() if t.requires_grad}
    state = {**tensors, **{name: b.detach().clone() for name, b in model.named_buffers()}}
    modules = dict(model.named_modules())
    with curvature_context(model, "eval"), _module_stack(model) as stack, _Capture(stack) as capture:
        functional_call(_Forward(model, forward), {f"model.{k}": v for k, v in state.items()}, ())
    gen = torch.Generator().manual_seed(seed)
    labels: dict[str, dict[str, Tensor]] = {}  # param -> role -> bool mask
    calls = []
    for q, k, v, via, path in capture.calls:
        owner, owned = _owner(path, names, (q, k, v))
        if owner is None:
            continue
        upstream = [_reached(t) - set(owned) for t in (q, k)]
        calls.append(AttentionCall(owner, upstream[0] == upstream[1], via))
        for role, t in zip(ROLES, (q, k, v)):
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
            grads = torch.autograd.grad(t, owned, r, retain_graph=True, allow_unused=True)
            for p, g in zip(owned, grads):
                if g is not None and bool((g != 0).any()):
                    masks = labels.setdefault(names[p], {})
                    masks[role] = masks.get(role, torch.zeros(p.shape, dtype=torch.bool)) | (g != 0).cpu()
    by_name = {name: t for t, name in names.items()}
    for query, key, path in capture.modules:
        module = next((p for p in reversed(path) if isinstance(modules.get(p), nn.MultiheadAttention)), None)
        if module is None:
            continue
        owned = {t for n, t in by_name.items() if n.startswith(f"{module}." if module else "")}
        same = query is key or _reached(query) - owned == _reached(key) - owned
        calls.append(AttentionCall(module, same, "multi_head_attention"))
        for name, masks in _mha_labels(module, by_name).items():
            labels.setdefault(name, {}).update(masks)
    return Layouts({name: _layout(name, masks) for name, masks in labels.items()}, tuple(calls))


class _Forward(nn.Module):
    """``forward(model)`` as a module, so that ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.model, self.run = model, forward

    def forward(self) -> Any:
        return self.run(self.model)


def _owner(
    path: tuple[str, ...], names: dict[Tensor, str], qkv: tuple[Tensor, ...]
) -> tuple[str | None, list[Tensor]]:
    """The innermost module on the call stack with trainable parameters that reach q, k or v."""
    reached = set().union(*(_reached(t) for t in qkv))
    for module in reversed(path):
        owned = [t for t, n in names.items() if t in reached and (not module or n.startswith(module + "."))]
        if owned:
            return module, owned
    return None, []


def _layout(name: str, masks: dict[str, Tensor]) -> ParamLayout:
    """Turn per-entry role masks into index sets along the one dimension the roles lie along."""
    count = sum(m.int() for m in masks.values())
    if bool((count > 1).any()):
        return ParamLayout(name, None, {}, "some entries feed more than one of query, key and value")
    shape = next(iter(masks.values())).shape
    if len(masks) == 1:  # one role: the whole parameter (an entry with a zero gradient is an accident)
        return ParamLayout(name, None, {next(iter(masks)): ()})
    for dim in range(len(shape)):
        others = [d for d in range(len(shape)) if d != dim]
        along = [m.amax(dim=others) if others else m for m in masks.values()]
        if not bool((sum(a.int() for a in along) > 1).any()):  # each index along dim has one role at most
            roles = {role: tuple(torch.nonzero(a).flatten().tolist()) for role, a in zip(masks, along)}
            return ParamLayout(name, dim, roles)
    return ParamLayout(name, None, {}, "its query / key / value entries do not lie along one dimension")
