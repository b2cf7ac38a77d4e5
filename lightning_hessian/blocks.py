"""Parameter blocks of a Transformer: the queries, keys, values, ... of each layer.

:func:`find_blocks` splits a model's trainable parameters into blocks whose Hessians are measured
separately: per layer the ``query``, ``key``, ``value`` and ``attn_out`` projections, each ``norm``, the
``ffn_in`` and ``ffn_out`` projections, plus ``embedding``, ``head`` and ``other``. The blocks partition
the trainable parameters: every trainable entry belongs to exactly one block.

How parameters are grouped
    A projection's weight and bias form one block named by the module path (``"h.0.mlp.c_fc"``). A
    parameter registered directly on a module that has children (``cls_token``, ``pos_embed``, the
    ``in_proj_weight`` of :class:`torch.nn.MultiheadAttention`) is a block of its own, named by the
    parameter path. Fused projections are split into slices: ``[Q; K; V]`` rows of ``attn.qkv`` become
    the blocks ``attn.q``, ``attn.k`` and ``attn.v`` (the fused module's name is replaced by the suffix).
    A query/key/value parameter registered directly on an attention module (``q_proj_weight``,
    ``bias_k``) joins the same ``<attention>.q/k/v`` block, so nn.MultiheadAttention's separate
    ``q_proj_weight`` and the Q slice of its packed ``in_proj_bias`` form one block.

How a block's kind is found (heuristics)
    Each component of the module path (and, when the name says nothing, the module's class name) is
    matched against one table of name patterns, :data:`_PATTERNS` (case-insensitive, whole component).
    The walk starts at the parameter's own module and goes up:

    * the module's own name decides when it is specific: ``q_proj`` is a query, ``fc1`` an FFN input,
      ``ln_1`` or any class whose name contains ``Norm`` a norm, ``qkv`` / ``c_attn`` / ``in_proj`` a fused
      ``[Q; K; V]`` projection (equal split; columns for HF's transposed ``Conv1D``);
    * a generic output projection (``proj``, ``c_proj``, ``dense``, ``wo``, ``out``) takes its kind from
      the nearest enclosing module that says what it is: an attention module (``attn``, ``attention``,
      ``SelfAttention``, ...) makes it ``attn_out``, an MLP (``mlp``, ``ffn``, ``DenseReluDense``, ...)
      ``ffn_out``, BERT's ``intermediate`` ``ffn_in``, ``pooler`` ``head``, ``patch_embed`` ``embedding``.
      Inside a numbered layer with no such module (BERT's ``layer.3.output.dense``) it is ``ffn_out``;
    * anything inside an embedding or head module (``patch_embed.proj``, ``pooler.dense``) takes that kind;
    * the rest is ``other``, with one warning that lists the parameters.

    ``layer`` is the first integer in the path (``"encoder.layers.3.linear1"`` -> 3), ``None`` for
    embeddings, final norms and heads.

    Compiled modules: the ``_orig_mod`` component that ``torch.compile`` adds to parameter
    names is left out of block names and ignored by the heuristics (``encoder._orig_mod.layers.0.linear1``
    is the block ``encoder.layers.0.linear1``); the parts keep the real parameter names.

Extending with rules
    ``rules`` maps regular expressions, matched with :func:`re.search` against full parameter names, to a
    kind or a :class:`FusedLayout`; the first matching rule wins and rules take precedence over the
    built-in table. Examples::

        find_blocks(model, rules={r"\\.mixer\\.in_proj": "ffn_in", r"rel_pos": "other"})
        # a fused grouped-query projection: 8 query heads, 2 key/value heads of size 64
        find_blocks(model, rules={r"attn\\.wqkv": FusedLayout(sizes=(512, 128, 128))})

    A rule mapping to ``"other"`` silences the warning for those parameters.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

__all__ = ["KINDS", "Block", "BlockPart", "FusedLayout", "find_blocks", "model_block"]

KINDS = ("query", "key", "value", "attn_out", "norm", "ffn_in", "ffn_out", "embedding", "head", "other")

_QKV_SUFFIX = {"query": "q", "key": "k", "value": "v"}


@dataclass(frozen=True)
class BlockPart:
    """One piece of a block: a whole parameter, or a contiguous slice of it along one dim.

    Attributes:
        param: the parameter's name, exactly as in ``model.named_parameters()``.
        dim: ``None`` for the whole tensor; else the slice ``param.narrow(dim, start, stop - start)``.
        start: first index of the slice along ``dim``.
        stop: one past the last index of the slice along ``dim``.
    """

    param: str
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def numel(self, shape: torch.Size) -> int:
        """Number of entries of a parameter of shape ``shape`` in this part."""
        if self.dim is None:
            return math.prod(shape)
        return (self.stop - self.start) * math.prod(s for d, s in enumerate(shape) if d != self.dim)

    def narrow(self, tensor: torch.Tensor) -> torch.Tensor:
        """The entries of ``tensor`` (shaped like the parameter) in this part, as a view."""
        return tensor if self.dim is None else tensor.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True)
class Block:
    """A group of parameter entries whose Hessian is measured as one diagonal block.

    Attributes:
        name: e.g. ``"encoder.layers.0.self_attn.q"`` (a fused slice) or ``"encoder.layers.0.linear1"``.
        kind: one of :data:`KINDS`, or ``"model"`` for :func:`model_block`.
        layer: the first integer component of the path (``"encoder.layers.3.x"`` -> 3), or ``None``.
        numel: number of entries in the block.
        parts: the pieces, in the order the block's vectors are laid out; each parameter appears once.
    """

    name: str
    kind: str
    layer: int | None
    numel: int
    parts: tuple[BlockPart, ...]

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters the block touches, in the order of ``parts``."""
        return tuple(part.param for part in self.parts)

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Boolean masks of this block's entries.

        Args:
            model: the model the block was found in.

        Returns:
            For each parameter of the block, a bool tensor of the parameter's shape and device that is
            True on the entries in this block.
        """
        params = dict(model.named_parameters())
        masks = {}
        for part in self.parts:
            mask = torch.zeros_like(params[part.param], dtype=torch.bool)
            part.narrow(mask).fill_(True)
            masks[part.param] = mask
        return masks

    def vector(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This block's entries of parameter-shaped ``tensors`` (by parameter name), as one flat vector.

        The layout is the one every block vector uses: the parts in order, each row-major. For example
        ``block.vector(dict(model.named_parameters()))`` gives the block's current weights.
        """
        return torch.cat([part.narrow(tensors[part.param]).reshape(-1) for part in self.parts])


@dataclass(frozen=True)
class FusedLayout:
    """How a fused projection is split: kinds in order along the output-feature dim.

    Attributes:
        kinds: the kind of each piece, in order.
        sizes: the size of each piece along ``dim``; ``None`` splits equally.
        dim: the dim of a 2-D (or higher) weight along which the pieces lie: 0 for ``nn.Linear`` rows,
            1 for the columns of GPT-2's transposed ``Conv1D``. 1-D biases are always split along 0.
        names: block-name suffixes; default ``"q"``, ``"k"``, ``"v"`` for query/key/value, else the kind.

    Raises:
        ValueError: on an unknown kind, or sizes / names that do not match the kinds.
    """

    kinds: tuple[str, ...] = ("query", "key", "value")
    sizes: tuple[int, ...] | None = None
    dim: int = 0
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for attr in ("kinds", "sizes", "names"):
            value = getattr(self, attr)
            if isinstance(value, str):
                raise ValueError(f"FusedLayout.{attr} must be a sequence, not the string {value!r}.")
            if value is not None:  # lists are fine too; store tuples so the layout stays hashable
                object.__setattr__(self, attr, tuple(value))
        if not self.kinds or any(kind not in KINDS for kind in self.kinds):
            raise ValueError(f"FusedLayout.kinds {self.kinds!r}: give one or more of {KINDS}.")
        if self.sizes is not None and (
            len(self.sizes) != len(self.kinds) or any(not isinstance(s, int) or s <= 0 for s in self.sizes)
        ):
            raise ValueError(
                f"FusedLayout.sizes {self.sizes!r} must be {len(self.kinds)} positive integers, one per kind "
                f"{self.kinds!r}; or None for an equal split."
            )
        names = self.suffixes
        if len(names) != len(self.kinds) or len(set(names)) != len(names) or not all(names):
            raise ValueError(
                f"FusedLayout.names {names!r} must be {len(self.kinds)} distinct non-empty strings, one per "
                f"kind {self.kinds!r}; pass names= when kinds repeat."
            )
        if not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"FusedLayout.dim must be a non-negative int, got {self.dim!r}.")

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The block-name suffix of each piece (``names`` or the defaults)."""
        return self.names if self.names is not None else tuple(_QKV_SUFFIX.get(k, k) for k in self.kinds)


_Target = str | FusedLayout  # what a rule or a row of the pattern table maps to

# Table values that are not kinds. They only matter when the parameter's own module name is not specific.
_OUT = "<output projection>"  # attention's or MLP's output projection: the enclosing modules decide
_ATTN = "<attention module>"
_MLP = "<mlp module>"

# One path component (or class name) -> kind, fused layout or marker. Whole-component, case-insensitive
# matches, tried in order: the first match wins (so ``q_norm`` is a norm and ``embed_out`` a head).
_PATTERNS: tuple[tuple[str, _Target], ...] = (
    (r"\w*norm\w*|(\w+_)?ln\w*", "norm"),
    (r"(\w+_)?head|\w*classifier|score|pooler|predictions|embed_out", "head"),
    (r"\w*emb(ed\w*)?|wte|wpe|(\w+_)?tokens?", "embedding"),
    (r"qkv|to_qkv|wqkv|qkv_proj|c_attn|in_proj(_weight|_bias)?", FusedLayout()),
    (r"kv|to_kv|wkv|kv_proj", FusedLayout(("key", "value"))),
    (r"q|query|wq|to_q|(q|query)_(proj|lin|linear)(_weight)?", "query"),
    (r"k|key|wk|to_k|(k|key)_(proj|lin|linear)(_weight)?|bias_k", "key"),
    (r"v|value|wv|to_v|(v|value)_(proj|lin|linear)(_weight)?|bias_v", "value"),
    (r"o|o_proj|out_proj|to_out|out_lin|attn_out", "attn_out"),
    (
        r"fc1|fc_in|c_fc|linear1|lin1|w1|w3|wi(_\d)?|(gate|up|gate_up)(_proj)?|dense_h_to_4h|intermediate",
        "ffn_in",
    ),
    (r"fc2|fc_out|linear2|lin2|w2|down(_proj)?|dense_4h_to_h", "ffn_out"),
    (r"ls\d|\w*layer_?scale\w*", "other"),  # LayerScale gains: known, and not a norm
    (r"c_proj|proj|projection|dense|wo|out|output", _OUT),
    (r"\w*att(n|ention)\w*|mha", _ATTN),
    (r"\w*(mlp|ffn|feed_?forward|ffwd|moe)\w*|ff|dense_?relu_?dense|experts?", _MLP),
)
_COMPILED = tuple((re.compile(pattern, re.IGNORECASE), target) for pattern, target in _PATTERNS)

_MAX_LISTED = 10  # parameter names listed in the warning


def find_blocks(
    model: nn.Module, rules: Mapping[str, str | FusedLayout] | None = None, *, warn: bool = True
) -> list[Block]:
    """Split a Transformer's trainable parameters into query/key/value/... blocks.

    See the module docstring for the heuristics. Tied parameters count once (under the first name
    ``named_parameters()`` gives), frozen ones are skipped.

    Args:
        model: the model.
        rules: regex -> kind or :class:`FusedLayout`, matched with :func:`re.search` against each
            parameter's full name before the built-in patterns; the first matching rule wins.
        warn: warn (once) about parameters that no pattern recognised and that went to ``other`` blocks.

    Returns:
        The blocks, in the order of ``model.named_parameters()``.

    Raises:
        ValueError: on an invalid rule (bad regex, unknown kind), a rule's layout that does not fit the
            parameter it matched, or rules that give one block two kinds.
    """
    compiled = _compile_rules(rules)
    modules = dict(model.named_modules(remove_duplicate=False))
    drafts: dict[str, tuple[str, list[BlockPart]]] = {}
    shapes: dict[str, torch.Size] = {}
    unrecognised: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shapes[name] = param.shape
        path, leaf = _group_path(name, modules)
        target = next((t for regex, t in compiled if regex.search(name)), None)
        if target is not None:
            try:
                pieces = _pieces(name, param, path, target)
            except ValueError as err:
                raise ValueError(f"rules: the FusedLayout for {name!r} does not fit: {err}.") from None
        else:
            target = _builtin_target(path, modules)
            if isinstance(target, FusedLayout) and type(leaf).__name__ == "Conv1D":
                target = replace(target, dim=1)  # HF's Conv1D stores the weight transposed: (in, out)
            try:
                pieces = _pieces(name, param, path, target or "other")
            except ValueError as err:  # a fused projection that does not split: report it with the reason
                pieces = _pieces(name, param, path, "other")
                unrecognised.append(f"{name} ({err})")
            else:
                if target is None:
                    unrecognised.append(name)
        for block_name, kind, part in pieces:
            known_kind, parts = drafts.setdefault(block_name, (kind, []))
            if known_kind != kind:
                raise ValueError(
                    f"Block {block_name!r} would be both {known_kind!r} and {kind!r} (at {part.param!r}): "
                    "make the rule match every parameter of the module (e.g. drop a '.weight' suffix)."
                )
            parts.append(part)
    if unrecognised and warn:
        listed = ", ".join(unrecognised[:_MAX_LISTED])
        if len(unrecognised) > _MAX_LISTED:
            listed += f", ... ({len(unrecognised) - _MAX_LISTED} more)"
        warnings.warn(
            f"find_blocks: {len(unrecognised)} trainable parameter(s) were not recognised as parts of a "
            f"Transformer block and went to 'other' blocks: {listed}. Pass rules= to classify them, e.g. "
            "find_blocks(model, rules={r'\\.my_proj\\.': 'ffn_in'}), or map them to 'other' to silence "
            "this warning.",
            UserWarning,
            stacklevel=2,
        )
    return [
        Block(_display(name), kind, _layer(name), sum(p.numel(shapes[p.param]) for p in parts), tuple(parts))
        for name, (kind, parts) in drafts.items()
    ]


_COMPILED_WRAPPER = "_orig_mod"  # the child through which torch.compile's OptimizedModule holds the module


def _display(path: str) -> str:
    """A block name without the components ``torch.compile`` adds."""
    return ".".join(c for c in path.split(".") if c != _COMPILED_WRAPPER)


def model_block(model: nn.Module, name: str = "model") -> Block:
    """One block holding every trainable parameter whole, of kind ``"model"``.

    Args:
        model: the model.
        name: the block's name.

    Returns:
        The block, with parts in the order of ``model.named_parameters()``.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = tuple(BlockPart(n) for n, _ in trainable)
    return Block(name, "model", None, sum(p.numel() for _, p in trainable), parts)


def _compile_rules(rules: Mapping[str, _Target] | None) -> list[tuple[re.Pattern, _Target]]:
    """Validate the user's rules up front, so mistakes surface before any measurement."""
    if rules is None:
        return []
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping regex -> kind or FusedLayout, got {type(rules).__name__}.")
    compiled = []
    for pattern, target in rules.items():
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(
                f"rules: {pattern!r} is not a valid regular expression ({err}). Keys are regexes searched "
                r"in parameter names, e.g. r'attn\.qkv'."
            ) from err
        if isinstance(target, str):
            if target not in KINDS:
                raise ValueError(
                    f"rules: unknown kind {target!r} for {pattern!r}; use one of {KINDS} or a FusedLayout."
                )
        elif not isinstance(target, FusedLayout):
            raise ValueError(
                f"rules: {pattern!r} maps to {target!r}; use a kind string (one of {KINDS}) or a FusedLayout."
            )
        compiled.append((regex, target))
    return compiled


def _group_path(name: str, modules: Mapping[str, nn.Module]) -> tuple[str, nn.Module | None]:
    """The path that names a parameter's block, and its module when that is a leaf module.

    Parameters of a leaf module (a Linear's weight and bias) share the module path; a parameter set
    directly on a module with children (or on the root) is on its own, named by its full path.
    """
    owner_path = name.rpartition(".")[0]
    owner = modules[owner_path]
    if owner_path and next(owner.children(), None) is None:
        return owner_path, owner
    return name, None


def _match(name: str) -> _Target | None:
    return next((target for regex, target in _COMPILED if regex.fullmatch(name)), None)


def _builtin_target(path: str, modules: Mapping[str, nn.Module]) -> _Target | None:
    """Classify a block path with the pattern table; ``None`` when nothing recognises it."""
    components = path.split(".")
    role = None  # what the block's own name said: _OUT, or "unknown"
    for depth in range(len(components), 0, -1):
        name = components[depth - 1]
        if name.isdigit() or name == _COMPILED_WRAPPER:  # an index or torch.compile's wrapper: no role
            continue
        hit = _match(name)
        module = modules.get(".".join(components[:depth]))
        if module is not None and hit in (None, _ATTN, _MLP):
            hit = _match(type(module).__name__) or hit  # e.g. class LlamaRMSNorm, nn.Embedding named "shared"
        if role is None:
            if hit not in (None, _OUT, _ATTN, _MLP):
                return hit
            role = _OUT if hit == _OUT else "unknown"
        elif hit in ("embedding", "head") or (role == _OUT and hit in KINDS):
            return hit
        elif role == _OUT and hit in (_ATTN, _MLP):
            return "attn_out" if hit == _ATTN else "ffn_out"
    if role == _OUT and _layer(path) is not None:
        return "ffn_out"  # an output projection in a layer but outside its attention: BERT's output.dense
    return None


def _pieces(name: str, param: torch.Tensor, path: str, target: _Target) -> list[tuple[str, str, BlockPart]]:
    """(block name, kind, part) for each piece of one parameter.

    Raises:
        ValueError: when a fused layout does not fit the parameter.
    """
    parent = path.rpartition(".")[0]
    prefix = f"{parent}." if parent else ""
    if isinstance(target, str):
        if path == name and target in _QKV_SUFFIX:  # q_proj_weight, bias_k: join the packed Q/K/V blocks
            return [(prefix + _QKV_SUFFIX[target], target, BlockPart(name))]
        return [(path, target, BlockPart(name))]
    dim = target.dim if param.dim() > 1 else 0
    if dim >= param.dim():
        raise ValueError(f"dim {dim} does not exist in shape {tuple(param.shape)}")
    length, count = param.shape[dim], len(target.kinds)
    sizes = target.sizes or (length // count,) * count
    if sum(sizes) != length:
        split = f"sizes {list(sizes)}" if target.sizes else f"{count} equal parts"
        raise ValueError(f"its {length} entries along dim {dim} do not split into {split}")
    starts = [sum(sizes[:i]) for i in range(count)]
    return [
        (prefix + suffix, kind, BlockPart(name, dim, start, start + size))
        for kind, suffix, start, size in zip(target.kinds, target.suffixes, starts, sizes, strict=True)
    ]


def _layer(path: str) -> int | None:
    """The first integer component of a dotted path."""
    return next((int(c) for c in path.split(".") if c.isdigit()), None)
