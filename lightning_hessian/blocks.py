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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_hessian.layouts import Layouts, ParamLayout, infer_layouts

__all__ = [
    "FOUND_BY",
    "KINDS",
    "Block",
    "BlockPart",
    "FusedLayout",
    "check_blocks",
    "describe_blocks",
    "find_blocks",
    "model_block",
]

KINDS = ("query", "key", "value", "attn_out", "norm", "ffn_in", "ffn_out", "embedding", "head", "other")

_QKV_SUFFIX = {"query": "q", "key": "k", "value": "v"}


@dataclass(frozen=True)
class BlockPart:
    """One piece of a block: a whole parameter, or some indices of it along one dim.

    ``BlockPart("w", 0, 4, 8)`` is rows 4-7 of ``w``; ``BlockPart("w", 0, runs=((0, 2), (6, 8)))`` rows 0, 1,
    6 and 7 (a per-head interleaved layout); :meth:`along` builds one from any indices. A part's entries
    are laid out as the parameter with only the selected indices along ``dim`` kept, row-major.

    Attributes:
        param: the parameter's name, exactly as in ``model.named_parameters()``.
        dim: ``None`` for the whole tensor; else the dim the selected indices lie along.
        start: the first selected index along ``dim``.
        stop: one past the last selected index along ``dim``.
        runs: the selected indices as sorted, disjoint ``(start, stop)`` ranges (``((start, stop),)`` when
            contiguous; ``None`` for a whole parameter).

    Raises:
        ValueError: on empty, unsorted or overlapping ranges.
    """

    param: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    runs: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.dim is None:
            if self.runs is not None:
                raise ValueError(f"BlockPart {self.param!r}: runs need a dim.")
            return
        runs = ((self.start, self.stop),) if self.runs is None else tuple(map(tuple, self.runs))
        merged: list[tuple[int, int]] = []
        for start, stop in runs:
            if not 0 <= start < stop or (merged and start < merged[-1][1]):
                raise ValueError(
                    f"BlockPart {self.param!r}: the ranges {list(runs)} along dim {self.dim} must be "
                    "non-empty, sorted and disjoint."
                )
            if merged and start == merged[-1][1]:
                merged[-1] = (merged[-1][0], stop)
            else:
                merged.append((start, stop))
        object.__setattr__(self, "runs", tuple(merged))
        object.__setattr__(self, "start", merged[0][0])
        object.__setattr__(self, "stop", merged[-1][1])

    @classmethod
    def along(cls, param: str, dim: int, indices: Iterable[int]) -> BlockPart:
        """The part of ``param`` holding ``indices`` (in any order, without repeats) along ``dim``."""
        ordered = sorted(indices)
        runs: list[tuple[int, int]] = []
        for i in ordered:
            if runs and i == runs[-1][1]:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return cls(param, dim, runs=tuple(runs))

    @property
    def indices(self) -> list[int]:
        """The selected indices along ``dim``, sorted (empty for a whole parameter)."""
        return [i for start, stop in self.runs or () for i in range(start, stop)]

    def numel(self, shape: torch.Size) -> int:
        """Number of entries of a parameter of shape ``shape`` in this part."""
        if self.dim is None:
            return math.prod(shape)
        rest = math.prod(s for d, s in enumerate(shape) if d != self.dim)
        return rest * sum(stop - start for start, stop in self.runs or ())

    def select(self, tensor: torch.Tensor, leading: int = 0) -> torch.Tensor:
        """The entries of ``tensor`` in this part: a view when they are contiguous, else a copy.

        Args:
            tensor: shaped like the parameter, after ``leading`` extra dims (e.g. a batch of vectors).
            leading: the number of extra dims in front.
        """
        if self.dim is None:
            return tensor
        dim = self.dim + leading
        if len(self.runs) == 1:
            return tensor.narrow(dim, self.start, self.stop - self.start)
        return torch.cat([tensor.narrow(dim, start, stop - start) for start, stop in self.runs], dim)

    def assign(self, tensor: torch.Tensor, values: torch.Tensor, leading: int = 0) -> None:
        """Write ``values`` (shaped like :meth:`select`'s result) into this part of ``tensor``, in place."""
        if self.dim is None:
            tensor.copy_(values)
            return
        dim, offset = self.dim + leading, 0
        for start, stop in self.runs:
            tensor.narrow(dim, start, stop - start).copy_(values.narrow(dim, offset, stop - start))
            offset += stop - start

    def narrow(self, tensor: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`select` (kept for code written when parts were contiguous slices)."""
        return self.select(tensor)

    def describe(self) -> str:
        """``"w"``, ``"w[rows 0:4]"``, ``"w[cols 0:4, 8:12]"``: the part in words."""
        if self.dim is None:
            return self.param
        axis = {0: "rows", 1: "cols"}.get(self.dim, f"dim {self.dim}")
        runs = ", ".join(f"{a}:{b}" for a, b in self.runs[:4]) + (", ..." if len(self.runs) > 4 else "")
        return f"{self.param}[{axis} {runs}]"


FOUND_BY = ("inferred", "rule", "name", "given")


@dataclass(frozen=True)
class Block:
    """A group of parameter entries whose Hessian is measured as one diagonal block.

    Attributes:
        name: e.g. ``"encoder.layers.0.self_attn.q"`` (a fused slice) or ``"encoder.layers.0.linear1"``.
        kind: one of :data:`KINDS`, or ``"model"`` for :func:`model_block`.
        layer: the index of the Transformer layer the block belongs to, or ``None``.
        numel: number of entries in the block.
        parts: the pieces, in the order the block's vectors are laid out. Several parts may share a
            parameter if their entries are disjoint.
        found_by: how the block's layout was determined: ``"inferred"`` from the attention computation on
            an example, ``"rule"`` from the user's rules, ``"name"`` from the name patterns, ``"given"``
            (:func:`model_block` or a hand-built block).
    """

    name: str
    kind: str
    layer: int | None
    numel: int
    parts: tuple[BlockPart, ...]
    found_by: str = "given"

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters the block touches, each once, in the order of ``parts``."""
        return tuple(dict.fromkeys(part.param for part in self.parts))

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Boolean masks of this block's entries.

        Args:
            model: the model the block was found in.

        Returns:
            For each parameter of the block, a bool tensor of the parameter's shape and device that is
            True on the entries in this block.
        """
        params = dict(model.named_parameters())
        masks: dict[str, torch.Tensor] = {}
        for part in self.parts:
            mask = masks.setdefault(part.param, torch.zeros_like(params[part.param], dtype=torch.bool))
            part.assign(mask, torch.ones_like(part.select(mask)))
        return masks

    def vector(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This block's entries of parameter-shaped ``tensors`` (by parameter name), as one flat vector.

        The layout is the one every block vector uses: the parts in order, each row-major. For example
        ``block.vector(dict(model.named_parameters()))`` gives the block's current weights.
        """
        return self.columns({name: tensors[name].unsqueeze(0) for name in self.params})[:, 0]

    def columns(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`vector` for ``m`` stacked tensors: per parameter ``(m, *shape)`` -> ``(numel, m)``."""
        pieces = [part.select(tensors[part.param], leading=1) for part in self.parts]
        return torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1).T

    def scatter(self, columns: torch.Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`columns`: ``(numel, m)`` block vectors -> per parameter ``(m, *shape)`` tensors,
        zero outside the block (``shapes``: the parameters' shapes by name)."""
        m = columns.shape[1]
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for part in self.parts:
            target = out.setdefault(part.param, columns.new_zeros((m, *shapes[part.param])))
            piece_shape = part.select(target, leading=1).shape
            n = piece_shape[1:].numel()
            part.assign(target, columns[offset : offset + n].T.reshape(piece_shape), leading=1)
            offset += n
        return out


def check_blocks(blocks: Sequence[Block], model: nn.Module) -> None:
    """Check that blocks fit the model and that no two claim an entry (``"model"`` blocks aside).

    Raises:
        ValueError: naming the parameter, the blocks and what to do.
    """
    shapes = {name: p.shape for name, p in model.named_parameters()}
    owners: dict[str, torch.Tensor] = {}  # param -> index + 1 of the block holding each entry (0: none)
    for number, block in enumerate(blocks, start=1):
        for part in block.parts:
            if part.param not in shapes:
                raise ValueError(f"Block {block.name!r}: the model has no parameter {part.param!r}.")
            shape = shapes[part.param]
            if part.dim is not None and (part.dim >= len(shape) or part.stop > shape[part.dim]):
                raise ValueError(
                    f"Block {block.name!r}: {part.describe()} does not fit {part.param!r} of shape "
                    f"{tuple(shape)}."
                )
            if block.kind == "model":
                continue
            claimed = owners.setdefault(part.param, torch.zeros(shape, dtype=torch.int32))
            taken = part.select(claimed)
            if bool(taken.any()):
                other = blocks[int(taken.max()) - 1].name
                raise ValueError(
                    f"Blocks {other!r} and {block.name!r} both claim entries of {part.param!r}: every "
                    "entry may belong to one block only. Give each block disjoint parts (BlockPart.along "
                    "selects any indices along one dim)."
                )
            part.assign(claimed, torch.full_like(taken, number))


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
_FIRST = "<first layer of a sequential>"  # an MLP's input projection when the MLP is an nn.Sequential
_LAST = "<last layer of a sequential>"

# One path component (or class name) -> kind, fused layout or marker. Whole-component, case-insensitive
# matches, tried in order: the first match wins (so ``q_norm`` is a norm and ``embed_out`` a head).
_PATTERNS: tuple[tuple[str, _Target], ...] = (
    (r"\w*norm\w*|(\w+_)?ln\w*", "norm"),
    (r"(\w+_)?head\w*|\w*classifier|score|pooler|predictions|embed_out", "head"),
    (r"\w*emb(ed\w*)?|wte|wpe|(\w+_)?tokens?|\w*rel(ative)?_pos\w*", "embedding"),
    (r"qkv|to_qkv|wqkv|qkv_proj|c_attn|in_proj(_weight|_bias)?", FusedLayout()),
    (r"kv|to_kv|wkv|kv_proj", FusedLayout(("key", "value"))),
    (r"q|query|wq|to_q|(q|query)_(proj|lin|linear|bias)(_weight)?", "query"),
    (r"k|key|wk|to_k|(k|key)_(proj|lin|linear|bias)(_weight)?|bias_k", "key"),
    (r"v|value|wv|to_v|(v|value)_(proj|lin|linear|bias)(_weight)?|bias_v", "value"),
    (r"o|o_proj|out_proj|to_out|out_lin|attn_out", "attn_out"),
    (
        r"fc1|fc_in|c_fc|fc(_[12])?|linear1|lin1|w1|w3|wi(_\d)?|(gate|up|gate_up)(_proj)?|dense_h_to_4h"
        r"|intermediate",
        "ffn_in",
    ),
    (r"fc2|fc_out|linear2|lin2|w2|down(_proj)?|dense_4h_to_h", "ffn_out"),
    # LayerScale gains end their branch: the first (after attention) with its output projection.
    (r"ls1|gamma_?1|\w*layer_?scale_?1", "attn_out"),
    (r"ls2|gamma_?2|\w*layer_?scale_?2", "ffn_out"),
    (r"ls\d|\w*layer_?scale\w*", "other"),
    (r"c_proj|proj|projection|dense|wo|out|output", _OUT),
    (r"\w*att(n|ention)\w*|mha", _ATTN),
    (r"\w*(mlp|ffn|feed_?forward|ffwd|moe)\w*|ff|dense_?relu_?dense|experts?", _MLP),
)
_COMPILED = tuple((re.compile(pattern, re.IGNORECASE), target) for pattern, target in _PATTERNS)
_CONTAINER_KINDS = ("embedding", "head")  # a container of this kind gives its kind to what it holds
_INNER_KINDS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")  # kinds a container overrides
_CROSS = re.compile(r"cross|enc_?dec|encoder_attn|multihead_attn|src_attn", re.IGNORECASE)
_HEADS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "n_query_groups", "kv_heads")

_MAX_LISTED = 10  # parameter names listed in the warning


@dataclass
class _Draft:
    kind: str
    parts: list[BlockPart]
    found_by: str


def find_blocks(
    model: nn.Module,
    rules: Mapping[str, str | FusedLayout] | None = None,
    *,
    example: Any = None,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    warn: bool = True,
) -> list[Block]:
    """Split a Transformer's trainable parameters into query/key/value/... blocks.

    With an ``example``, which entries of each projection feed the query, key and value of each attention
    call is read off the computation (:mod:`lightning_hessian.layouts`): fused, grouped-query, interleaved
    and cross-attention layouts come out exactly, whatever the names. Without one, names decide (see the
    module docstring), and a fused projection is split only where its shape proves an equal split.
    Tied parameters count once (under the first name ``named_parameters()`` gives), frozen ones are
    skipped.

    Args:
        model: the model.
        rules: regex -> kind or :class:`FusedLayout`, matched with :func:`re.search` against each
            parameter's full name before anything else; the first matching rule wins.
        example: an input to run the model on: a tensor (``model(example)``), a mapping
            (``model(**example)``) or a tuple / list (``model(*example)``); or, with ``loss_fn``, a batch.
        loss_fn: ``loss_fn(model, example)`` runs the model instead (as given to ``analyze``).
        warn: warn (once) about parameters that went to ``other`` blocks or were left unsplit.

    Returns:
        The blocks, in the order of ``model.named_parameters()``.

    Raises:
        ValueError: on an invalid rule (bad regex, unknown kind), a rule's layout that does not fit the
            parameter it matched, or rules that give one block two kinds.
    """
    compiled = compile_rules(rules)
    layouts = None if example is None and loss_fn is None else _example_layouts(model, example, loss_fn)
    modules = dict(model.named_modules(remove_duplicate=False))
    drafts: dict[str, _Draft] = {}
    shapes: dict[str, torch.Size] = {}
    unrecognised: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shapes[name] = param.shape
        path, leaf = _group_path(name, modules)
        target = next((t for regex, t in compiled if regex.search(name)), None)
        if target is not None:
            found_by = "rule"
            try:
                pieces = _pieces(name, param, path, target)
            except ValueError as err:
                raise ValueError(f"rules: the FusedLayout for {name!r} does not fit: {err}.") from None
        else:
            target = _builtin_target(path, modules)
            if isinstance(target, FusedLayout) and stores_weight_transposed(leaf):
                target = replace(target, dim=1)
            layout = None if layouts is None else layouts.params.get(name)
            if layout is not None and not (isinstance(target, str) and target in ("norm", "embedding")):
                found_by = "inferred"
                pieces, problem = _inferred_pieces(name, param, path, layout, target)
            else:
                found_by = "name"
                pieces, problem = _named_pieces(name, param, path, target, modules)
            if problem is not None:
                unrecognised.append(name if not problem else f"{name} ({problem})")
        for block_name, kind, part in pieces:
            draft = drafts.setdefault(block_name, _Draft(kind, [], found_by))
            if draft.kind != kind:
                raise ValueError(
                    f"Block {block_name!r} would be both {draft.kind!r} and {kind!r} (at {part.param!r}): "
                    "make the rule match every parameter of the module (e.g. drop a '.weight' suffix)."
                )
            draft.parts.append(part)
            if found_by == "inferred" or draft.found_by == "name":
                draft.found_by = found_by
    if unrecognised and warn:
        listed = ", ".join(unrecognised[:_MAX_LISTED])
        if len(unrecognised) > _MAX_LISTED:
            listed += f", ... ({len(unrecognised) - _MAX_LISTED} more)"
        warnings.warn(
            f"find_blocks: {len(unrecognised)} trainable parameter(s) were not recognised as parts of a "
            f"Transformer block, or not split, and went to 'other' blocks: {listed}. Pass an example "
            "(find_blocks(model, example=batch_inputs); analyze and HessianMonitor do) so that query / key "
            "/ value layouts are read off the attention computation, or rules= to classify them, e.g. "
            "find_blocks(model, rules={r'\\.my_proj\\.': 'ffn_in'}) or a FusedLayout; map them to 'other' "
            "to silence this warning.",
            UserWarning,
            stacklevel=2,
        )
    layers = _layers(model, drafts, layouts)
    return [
        Block(
            display_name(name),
            d.kind,
            layers[name],
            sum(p.numel(shapes[p.param]) for p in d.parts),
            tuple(d.parts),
            d.found_by,
        )
        for name, d in drafts.items()
    ]


def _example_layouts(
    model: nn.Module, example: Any, loss_fn: Callable[[nn.Module, Any], Any] | None
) -> Layouts:
    """The layouts read off one forward on ``example``, in eval mode, the model left untouched."""
    if loss_fn is not None:

        def forward(m: nn.Module) -> Any:
            return loss_fn(m, example)
    elif isinstance(example, Mapping):

        def forward(m: nn.Module) -> Any:
            return m(**example)
    elif isinstance(example, list | tuple):

        def forward(m: nn.Module) -> Any:
            return m(*example)
    else:

        def forward(m: nn.Module) -> Any:
            return m(example)

    return infer_layouts(model, forward)


_COMPILED_WRAPPER = "_orig_mod"  # the child through which torch.compile's OptimizedModule holds the module


def stores_weight_transposed(module: nn.Module | None) -> bool:
    """Whether ``module`` keeps its weight as ``(in, out)``: Hugging Face's GPT-2 ``Conv1D``, a Linear whose
    weight is the transpose of ``nn.Linear``'s ``(out, in)``."""
    return type(module).__name__ == "Conv1D"


def display_name(path: str) -> str:
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


def compile_rules(rules: Mapping[str, _Target] | None) -> list[tuple[re.Pattern, _Target]]:
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
    direct = path not in modules  # a parameter registered on a module with children: its module speaks too
    role = None  # what the block's own name said: _OUT, _FIRST / _LAST, or "unknown"
    own = None  # the kind the block's own names decided, which an embedding or head container overrides
    for depth in range(len(components), 0, -1):
        name = components[depth - 1]
        if name == _COMPILED_WRAPPER:
            continue
        module = modules.get(".".join(components[:depth]))
        hit = None if name.isdigit() else _match(name)
        if module is not None and hit in (None, _ATTN, _MLP):
            hit = _match(type(module).__name__) or hit  # e.g. class LlamaRMSNorm, nn.Embedding named "shared"
        if name.isdigit() and hit is None and role is None:
            hit = _position(components[:depth], modules)  # the first / last layer of an nn.Sequential
        if name.isdigit() and hit is None:
            continue  # an index says nothing
        if own is not None:
            if own in _INNER_KINDS and not name.isdigit() and _match(name) in _CONTAINER_KINDS:
                return _match(name)  # RoBERTa's classifier.out_proj: the container's kind
            continue
        if role is None:
            if hit not in (None, _OUT, _ATTN, _MLP, _FIRST, _LAST):
                own = hit
                continue
            if hit is None and direct and depth == len(components):
                continue  # x-transformers' norm.gamma: the parameter's module decides
            role = hit if hit in (_OUT, _FIRST, _LAST) else "unknown"
        elif hit in _CONTAINER_KINDS or (role == _OUT and hit in KINDS):
            return hit
        elif role in (_OUT, _FIRST, _LAST) and hit in (_ATTN, _MLP):
            if hit == _ATTN:
                return "attn_out" if role != _FIRST else None
            return "ffn_in" if role == _FIRST else "ffn_out"
    if own is not None:
        return own
    if role == _OUT and _layer(path) is not None:
        return "ffn_out"  # an output projection in a layer but outside its attention: BERT's output.dense
    return None


def _position(components: list[str], modules: Mapping[str, nn.Module]) -> str | None:
    """``_FIRST`` / ``_LAST`` for the first / last child with parameters of an ``nn.Sequential``."""
    parent = modules.get(".".join(components[:-1]))
    if not isinstance(parent, nn.Sequential):
        return None
    module = modules[".".join(components)]
    weighted = [child for child in parent.children() if next(child.parameters(), None) is not None]
    if len(weighted) < 2 or module not in weighted:
        return None
    return _FIRST if module is weighted[0] else _LAST if module is weighted[-1] else None


def _named_pieces(
    name: str, param: torch.Tensor, path: str, target: _Target | None, modules: Mapping[str, nn.Module]
) -> tuple[list[tuple[str, str, BlockPart]], str | None]:
    """The pieces the name patterns give, and a problem to report (or ``None``).

    A fused projection is split only when its weight's shape proves equal query / key / value sizes
    (out = 3 x in, no smaller key/value head count on its attention module); its order is then taken
    to be contiguous, the layout of every such module we know.
    """
    whole = [(path, "other", BlockPart(name))]
    if target is None:
        return whole, ""
    if isinstance(target, FusedLayout):
        reason = _unproven(name, path, target, modules)
        if reason is not None:
            return whole, (
                f"a fused projection left unsplit: {reason}; pass an example to read its layout off the "
                "attention, or rules={...: FusedLayout(sizes=...)}"
            )
    try:
        return _pieces(name, param, path, target), None
    except ValueError as err:  # a fused projection that does not split: report it with the reason
        return whole, str(err)


def _unproven(name: str, path: str, target: FusedLayout, modules: Mapping[str, nn.Module]) -> str | None:
    """Why a name-matched fused projection's equal contiguous split is not proven (``None``: proven)."""
    owner = modules[name.rpartition(".")[0]]
    if isinstance(owner, nn.MultiheadAttention):
        return None  # PyTorch's own module: its in_proj_weight / in_proj_bias are [Q; K; V], equal thirds
    weight = getattr(owner, "weight", None) if path != name else getattr(owner, "in_proj_weight", None)
    count = len(target.kinds)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "no 2-D weight shows its sizes"
    dim = target.dim
    if weight.shape[dim] != count * weight.shape[1 - dim]:
        return (
            f"its weight {tuple(weight.shape)} is not {count} square pieces along dim {dim} (grouped-query "
            "or cross-attention sizes)"
        )
    attention = modules.get(path.rpartition(".")[0]) if path != name else owner
    for source in (attention, getattr(attention, "config", None)):
        heads = next((getattr(source, a) for a in _HEADS if isinstance(getattr(source, a, None), int)), None)
        groups = next(
            (getattr(source, a) for a in _KV_HEADS if isinstance(getattr(source, a, None), int)), None
        )
        if heads is not None and groups is not None and heads != groups:
            return f"its module has {heads} query heads but {groups} key/value heads"
    return None


def _inferred_pieces(
    name: str, param: torch.Tensor, path: str, layout: ParamLayout, target: _Target | None
) -> tuple[list[tuple[str, str, BlockPart]], str | None]:
    """The pieces an inferred layout gives, and a problem to report (or ``None``)."""
    if layout.problem is not None:
        return [(path, "other", BlockPart(name))], f"left unsplit: {layout.problem}"
    if layout.dim is None:
        return _pieces(name, param, path, next(iter(layout.roles))), None
    parent = path.rpartition(".")[0]
    prefix = f"{parent}." if parent else ""
    pieces = [
        (prefix + _QKV_SUFFIX[role], role, BlockPart.along(name, layout.dim, indices))
        for role, indices in sorted(layout.roles.items(), key=lambda kv: kv[1][0])
    ]
    used = {i for indices in layout.roles.values() for i in indices}
    rest = [i for i in range(param.shape[layout.dim]) if i not in used]
    problem = None
    if rest:
        kind = target if isinstance(target, str) and target not in _QKV_SUFFIX else "other"
        if kind == "other":
            problem = f"{len(rest)} entries along dim {layout.dim} feed no query, key or value"
        pieces.append((path, kind, BlockPart.along(name, layout.dim, rest)))
    return pieces, problem


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


def _layers(model: nn.Module, drafts: Mapping[str, _Draft], layouts: Layouts | None) -> dict[str, int | None]:
    """The Transformer layer of each block.

    A layer module is the outermost numbered module (an element of a ``ModuleList`` / ``nn.Sequential``)
    around a self-attention that holds no other self-attention: ``h.3`` in GPT-2, ``encoder.block.3`` in
    T5 (not its sub-layer ``layer.0``), ``layers.1.blocks.0`` in Swin (not the stage ``layers.1``). Its
    index is its position in its list, except where the list holds sub-layers (x-transformers keeps
    attention and feed-forward as alternate elements) or the lists are nested in stages (Swin): then
    layer modules are counted in model order. Every element of a list of layers takes that list's
    numbering (so a hybrid model's non-attention layers keep theirs); feed-forward sub-layers take the
    layer before them. Without any attention found, the first integer of the block's path is its layer.
    """
    if layouts is not None and layouts.calls:
        owners = {(c.module, c.self_attention) for c in layouts.calls}
    else:
        owners = {
            (name.rpartition(".")[0], not _CROSS.search(name))
            for name, d in drafts.items()
            if d.kind in _QKV_SUFFIX
        }
    selves = [owner for owner, self_attention in owners if self_attention]
    found = set()
    for owner in selves:
        components = owner.split(".")
        numbered = [".".join(components[: i + 1]) for i, c in enumerate(components) if c.isdigit()]
        for candidate in numbered:  # outermost first
            if sum(_contains(candidate, other) for other in selves) == 1:
                found.add(candidate)
                break
    if not found:
        return {name: _layer(name) for name in drafts}
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    by_container: dict[str, list[int]] = {}
    for module in found:
        container, _, position = module.rpartition(".")
        by_container.setdefault(container, []).append(int(position))
    stacks: dict[str, list[str]] = {}  # lists nested in numbered stages, counted together
    for module in sorted(found, key=lambda p: order.get(p, len(order))):
        container = module.rpartition(".")[0]
        if _nested(container) or _sub_layers(container, by_container[container], drafts):
            stacks.setdefault(_stack(container), []).append(module)
    ranks = {module: i for members in stacks.values() for i, module in enumerate(members)}
    return {name: _layer_of(name, by_container, ranks) for name in drafts}


def _contains(module: str, path: str) -> bool:
    return path == module or path.startswith(module + ".")


def _join(container: str, position: int) -> str:
    return f"{container}.{position}" if container else str(position)


def _nested(container: str) -> bool:
    return any(c.isdigit() for c in container.split("."))


def _stack(container: str) -> str:
    return ".".join("*" if c.isdigit() else c for c in container.split("."))


def _sub_layers(container: str, positions: list[int], drafts: Mapping[str, _Draft]) -> bool:
    """Whether the list's other elements are feed-forward sub-layers of the attention elements."""
    between = {
        int(name[len(container) + 1 :].split(".")[0])
        for name in drafts
        if name.startswith(container + ".") and name[len(container) + 1 :].split(".")[0].isdigit()
    } - set(positions)
    if not between or not any(p > min(positions) for p in between):
        return False
    kinds = {
        d.kind
        for name, d in drafts.items()
        if name.startswith(container + ".") and int(name[len(container) + 1 :].split(".")[0]) in between
    }
    return kinds <= {"ffn_in", "ffn_out", "norm"}


def _layer_of(path: str, by_container: Mapping[str, list[int]], ranks: Mapping[str, int]) -> int | None:
    """The layer index of a block path (see :func:`_layers`)."""
    components = path.split(".")
    for depth in range(1, len(components) + 1):  # outermost list first
        if not components[depth - 1].isdigit():
            continue
        container, position = ".".join(components[: depth - 1]), int(components[depth - 1])
        if container not in by_container:
            continue
        if any(_join(container, p) in ranks for p in by_container[container]):
            earlier = [p for p in by_container[container] if p <= position]
            return ranks[_join(container, max(earlier))] if earlier else None
        return position
    return None


def _layer(path: str) -> int | None:
    """The first integer component of a dotted path."""
    return next((int(c) for c in path.split(".") if c.isdigit()), None)


def describe_blocks(blocks: Sequence[Block]) -> str:
    """A table of blocks: name, kind, layer, size, how the layout was found, and the parts.

    Args:
        blocks: e.g. ``find_blocks(model, example=x)``.

    Returns:
        The table as text, one block per line (``print`` it).
    """
    rows = [("block", "kind", "layer", "params", "found by", "parts")]
    for b in blocks:
        parts = ", ".join(p.describe() for p in b.parts)
        rows.append(
            (b.name, b.kind, "-" if b.layer is None else str(b.layer), str(b.numel), b.found_by, parts)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join([*cells, row[5]]).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
