"""The zoo of real attention implementations: hand-derived q/k/v layouts, and find_blocks recovering them.

``test_expected_layouts_are_functional_truth`` checks each entry's hand-derived layout against a functional
ground truth computed here, independently of ``lightning_hessian``: every attention call of a forward pass
is intercepted (a ``TorchFunctionMode`` records the q, k, v operands of
``F.scaled_dot_product_attention``, or of the matmul before a softmax and the matmul after it), and each
entry of each parameter of the calling module is labelled query / key / value by whether the gradient of
a random projection ``<R, q>`` (``<R, k>``, ``<R, v>``) reaches it.

``test_find_blocks_recovers_the_layout`` checks that ``find_blocks(model, example=...)`` puts exactly those
entries in blocks of the matching kind.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from _zoo import ROLES, ZOO, Expected, ZooEntry, call_model, labels_from_blocks
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import lightning_hessian
from lightning_hessian.blocks import Block, BlockPart

# --- functional ground truth -------------------------------------------------------------------------------

_SDPA = F.scaled_dot_product_attention
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm, torch.Tensor.__matmul__}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}
# Python-level functions that run many torch ops: re-entered with the mode on, so those ops are seen too
_COMPOSITE = {F.multi_head_attention_forward}


@dataclass
class AttentionCall:
    """The q, k, v operands of one attention computation, and the innermost module that ran it."""

    module: str
    q: Tensor
    k: Tensor
    v: Tensor


@dataclass
class _Scores:
    """The operands of the matmul that produced a tensor (``q`` and ``k``-transposed for scores)."""

    a: Tensor
    b: Tensor


@dataclass(eq=False)
class AttentionRecorder(TorchFunctionMode):
    """Records q, k, v of every attention computation run inside it.

    ``F.scaled_dot_product_attention(q, k, v)`` is recorded directly. Explicit attention is recognised by
    data flow: a softmax whose input descends (through elementwise ops, views, casts) from a matmul / bmm /
    baddbmm takes that matmul's operands as q and k (``k`` possibly transposed); the first matmul that then
    consumes the softmax's output (through dropout, casts, views) takes its other operand as v.

    Attributes:
        stack: the names of the modules whose forward is running (maintained by module hooks).
        calls: the attention calls, in order.
    """

    stack: list[str] = field(default_factory=list)
    calls: list[AttentionCall] = field(default_factory=list)
    _origin: dict[int, _Scores] = field(default_factory=dict)
    _probs: dict[int, _Scores] = field(default_factory=dict)
    _keep: list[Any] = field(default_factory=list)  # keeps tensors alive, so their ids stay unique

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _COMPOSITE:  # run its body with the mode on and the dispatch check off (no recursion)
            with self, mock.patch.object(F, "has_torch_function", lambda *_: False):
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        self._keep.append((inputs, outputs))
        if func is _SDPA:
            q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
            self.calls.append(AttentionCall(self.stack[-1], q, k, v))
        elif func in _SOFTMAX:
            scores = self._origin.get(id(inputs[0]))
            if scores is not None:
                self._probs[id(out)] = scores
        elif func in _MATMUL or func in _BADDBMM:
            if func in _MATMUL:
                a, b = args[0], args[1]
            else:
                a = kwargs["batch1"] if "batch1" in kwargs else args[1]
                b = kwargs["batch2"] if "batch2" in kwargs else args[2]
            scores = self._probs.get(id(a)) or self._probs.get(id(b))
            if scores is not None:  # probabilities @ values
                value = b if id(a) in self._probs else a
                self.calls.append(AttentionCall(self.stack[-1], scores.a, scores.b, value))
            else:
                self._origin[id(out)] = _Scores(a, b)
        else:  # propagate "descends from a matmul / a softmax" through everything else
            origin = next((self._origin[id(t)] for t in inputs if id(t) in self._origin), None)
            probs = next((self._probs[id(t)] for t in inputs if id(t) in self._probs), None)
            for t in outputs:
                if origin is not None:
                    self._origin[id(t)] = origin
                if probs is not None:
                    self._probs[id(t)] = probs
        return out


def record_attention(model: nn.Module, example: Any) -> list[AttentionCall]:
    """Run ``model`` on ``example`` (gradients on) and return its attention calls."""
    recorder = AttentionRecorder()
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            recorder.stack.append(name)

        return hook

    def leave(*_: Any) -> None:  # returns None: a forward hook's return value would replace the output
        recorder.stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with torch.enable_grad(), recorder:
            call_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.calls


def functional_labels(model: nn.Module, call: AttentionCall, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Label the entries of the calling module's parameters by the gradients of ``<R, q>``, ``<R, k>``, ...

    Args:
        model: the model.
        call: one recorded attention call.
        seed: seed of the random projections ``R``.

    Returns:
        ``{param name: {role: mask}}`` for every parameter of ``call.module`` (recursively), with a mask
        for each role (all False where that role's tensor does not depend on the parameter).
    """
    prefix = f"{call.module}." if call.module else ""
    named = [(prefix + n, p) for n, p in model.get_submodule(call.module).named_parameters()]
    g = torch.Generator().manual_seed(seed)
    labels: dict[str, dict[str, Tensor]] = {name: {} for name, _ in named}
    for role, tensor in zip(ROLES, (call.q, call.k, call.v)):
        r = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype)
        grads = torch.autograd.grad(
            (r * tensor).sum(), [p for _, p in named], retain_graph=True, allow_unused=True
        )
        for (name, param), grad in zip(named, grads):
            labels[name][role] = torch.zeros_like(param, dtype=torch.bool) if grad is None else grad != 0
    return labels


def _describe(mask: Tensor) -> str:
    """The indices along each dim where a mask holds True, for failure messages."""
    if not mask.any():
        return "nothing"
    if mask.dim() == 1:
        return f"entries {mask.nonzero().flatten().tolist()}"
    along = []
    for d in range(mask.dim()):
        others = [o for o in range(mask.dim()) if o != d]
        along.append(f"dim {d} {mask.any(dim=others).nonzero().flatten().tolist()}")
    return ", ".join(along)


def _build(entry: ZooEntry) -> tuple[nn.Module, Any]:
    if entry.needs is not None and importlib.util.find_spec(entry.needs) is None:
        pytest.skip(f"{entry.name} needs {entry.needs}")
    return entry.build()


def _check_expected_shape(model: nn.Module, expected: Expected) -> None:
    params = dict(model.named_parameters())
    assert expected, "the entry expects no query/key/value parameter at all"
    for name, roles in expected.items():
        assert name in params, f"{name!r} is not a parameter name"
        assert roles and set(roles) <= set(ROLES), f"{name}: roles {sorted(roles)}"
        union = torch.zeros_like(params[name], dtype=torch.bool)
        for role, mask in roles.items():
            assert mask.dtype == torch.bool and mask.shape == params[name].shape, f"{name}[{role}] shape"
            assert mask.any(), f"{name}[{role}] is empty"
            assert not (union & mask).any(), f"{name}: {role} overlaps another role"
            union |= mask


# --- 1. the hand-derived layouts are the functional truth ---------------------------------------------------


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_expected_layouts_are_functional_truth(entry: ZooEntry) -> None:
    model, example = _build(entry)
    expected = entry.expected(model)
    _check_expected_shape(model, expected)
    calls = record_attention(model, example)
    assert calls, "no attention call was recorded"
    covered: set[str] = set()
    for i, call in enumerate(calls):
        labels = functional_labels(model, call, seed=i)
        for name, roles in labels.items():
            if name not in expected:
                for role, mask in roles.items():
                    assert not mask.any(), (
                        f"call {i} in {call.module!r}: {name} holds {role} entries ({_describe(mask)}) "
                        "but the entry does not expect it"
                    )
                continue
            covered.add(name)
            for role in ROLES:
                want = expected[name].get(role, torch.zeros_like(roles[role]))
                assert torch.equal(roles[role], want), (
                    f"call {i} in {call.module!r}: {name}[{role}]: the gradient reaches "
                    f"{_describe(roles[role])}, the entry expects {_describe(want)}"
                )
    assert covered == set(expected), f"expected parameters no attention call uses: {set(expected) - covered}"


# --- 2. find_blocks recovers them ---------------------------------------------------------------------------


def layout_errors(
    model: nn.Module, blocks: list[Any], expected: Expected, unsplittable: frozenset[str] = frozenset()
) -> list[str]:
    """How ``blocks`` disagree with the expected query/key/value layout (empty when they agree).

    For each expected parameter and role, the union of that parameter's masks over the blocks of that kind
    must equal the expected mask; and no query/key/value block may touch any other parameter. A parameter
    in ``unsplittable`` must instead lie whole in a single block.

    Args:
        model: the model.
        blocks: what ``find_blocks`` returned (or hand-built blocks).
        expected: the entry's expected layout.
        unsplittable: parameters a correct tool may only leave unsplit.

    Returns:
        One line per disagreement.
    """
    errors = []
    for name, roles in expected.items():
        labels = labels_from_blocks(model, blocks, name)
        if name in unsplittable:
            if len(labels) != 1 or not next(iter(labels.values())).all():
                errors.append(f"{name} is unsplittable, yet lies in blocks of kinds {sorted(labels)}")
            continue
        for role in ROLES:
            want, got = roles.get(role), labels.get(role)
            if want is None and got is None:
                continue
            want = torch.zeros_like(got) if want is None else want
            got = torch.zeros_like(want) if got is None else got
            if not torch.equal(got, want):
                errors.append(
                    f"{name}[{role}]: {role} blocks hold {_describe(got)}, expected {_describe(want)} "
                    f"(kinds of the blocks touching it: {sorted(labels)})"
                )
    for block in blocks:
        if block.kind in ROLES:
            extra = sorted(set(block.params) - set(expected))
            if extra:
                errors.append(f"{block.kind} block {block.name!r} touches {extra}")
    return errors


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_find_blocks_recovers_the_layout(entry: ZooEntry) -> None:
    model, example = _build(entry)
    blocks = lightning_hessian.find_blocks(model, example=example)
    errors = layout_errors(model, blocks, entry.expected(model), entry.unsplittable)
    assert not errors, "\n".join(errors)


# --- the checker of test 2, on hand-built answers ---------------------------------------------------------


def _blocks_from_masks(expected: Expected) -> list[Block]:
    """Real :class:`Block` objects holding exactly the expected entries: one block per contiguous slab."""
    blocks = []
    for name, roles in expected.items():
        for role, mask in roles.items():
            if mask.all():
                blocks.append(Block(f"{name}.{role}", role, None, mask.numel(), (BlockPart(name),)))
                continue
            (dim,) = [
                d
                for d in range(mask.dim())
                if not torch.equal(mask, mask.any(d, keepdim=True).expand_as(mask))
            ]
            line = mask.any(dim=[d for d in range(mask.dim()) if d != dim]) if mask.dim() > 1 else mask
            idx = line.nonzero().flatten().tolist()
            runs, start = [], idx[0]
            for prev, cur in zip(idx, [*idx[1:], None]):
                if cur != prev + 1:
                    runs.append((start, prev + 1))
                    start = cur
            for j, (lo, hi) in enumerate(runs):
                part = BlockPart(name, dim, lo, hi)
                blocks.append(Block(f"{name}.{role}.{j}", role, None, part.numel(mask.shape), (part,)))
    return blocks


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_layout_check_accepts_a_correct_answer_and_rejects_swapped_kinds(entry: ZooEntry) -> None:
    model, _ = _build(entry)
    expected = entry.expected(model)
    blocks = _blocks_from_masks(expected)
    assert layout_errors(model, blocks, expected) == []
    swap = {"query": "key", "key": "query", "value": "value"}
    swapped = [Block(b.name, swap[b.kind], b.layer, b.numel, b.parts) for b in blocks]
    assert layout_errors(model, swapped, expected)
    assert layout_errors(model, blocks[1:], expected)  # a missing slab
