"""A zoo of real attention implementations, with their query/key/value layouts derived by hand.

Each :class:`ZooEntry` builds one tiny model (float64, random weights, fixed seed, eval mode, no dropout)
and an example input, and knows, for every parameter that holds query/key/value projection entries, which
entries are queries, keys and values. The layouts are read off each library's source and the config (head
counts, head size, how the fused projection is viewed and split), not computed: ``tests/test_zoo.py``
checks them against a functional ground truth, then checks that ``find_blocks(model, example=...)``
recovers them.

Families:

* Hugging Face ``transformers`` (the real classes, built from configs): LLaMA, Qwen2, Mistral, Phi-3,
  GPT-2 (with and without cross-attention), GPT-NeoX, BLOOM, Falcon (multi-query and the new decoder
  architecture), BERT, T5, ViT. Some run ``attn_implementation="eager"``, others ``"sdpa"``: the entry
  name ends in ``_eager`` or ``_sdpa``.
* PyTorch's ``nn.MultiheadAttention``: packed ``in_proj_weight`` (bmm-softmax-bmm path, need_weights=True)
  and separate ``q/k/v_proj_weight`` with ``add_bias_kv`` (scaled_dot_product_attention path).
* nanoGPT's ``CausalSelfAttention`` and litgpt's ``CausalSelfAttention`` (both layouts litgpt has used),
  rebuilt here from their sources.
* Custom layouts: oddly named separate projections, a fused ``[V | Q | K]`` projection, and a per-group
  interleaved grouped-query projection ``[K, Q, Q, V]`` per group.

Usage::

    from _zoo import ZOO, call_model, labels_from_blocks   # pytest puts tests/ on sys.path

    for entry in ZOO:
        model, example = entry.build()
        out = call_model(model, example)     # model(example) / model(**example) / model(*example)
        masks = entry.expected(model)        # {param: {"query": mask, ...}}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ROLES", "ZOO", "Expected", "ZooEntry", "call_model", "labels_from_blocks"]

ROLES = ("query", "key", "value")

Expected = dict[str, dict[str, Tensor]]  # param name -> {"query" | "key" | "value": bool mask}
_Layout = Callable[[torch.Size], dict[str, Tensor]]  # param shape -> role masks

VOCAB = 64
SEQ = 6
BATCH = 2


@dataclass(frozen=True)
class ZooEntry:
    """One real attention implementation, with its hand-derived query/key/value layout.

    Attributes:
        name: e.g. ``"hf_phi3_gqa_eager"``; HF entries end in their ``attn_implementation``.
        build: ``build() -> (model, example)``: the model in float64 and eval mode, built with a fixed seed
            (the global RNG is left as it was); ``example`` is a Tensor (``model(example)``), a Mapping
            (``model(**example)``) or a tuple (``model(*example)``).
        expected: ``expected(model) -> {param name: {role: bool mask of the param's shape}}`` for every
            parameter holding query/key/value projection entries (weights and biases, fused or separate);
            roles a parameter has no entries of are left out.
        unsplittable: parameters a correct tool may only leave unsplit.
        needs: a module to import first (e.g. ``"transformers"``); the entry is skipped when it is absent.
    """

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    expected: Callable[[nn.Module], Expected]
    unsplittable: frozenset[str] = frozenset()
    needs: str | None = None


def call_model(model: nn.Module, example: Any) -> Any:
    """Run ``model`` on ``example`` the way ``find_blocks(model, example=...)`` does.

    Args:
        model: the model.
        example: a Tensor (``model(example)``), a Mapping (``model(**example)``) or a tuple / list
            (``model(*example)``).

    Returns:
        The model's output.
    """
    if isinstance(example, Tensor):
        return model(example)
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    raise TypeError(f"example must be a Tensor, a Mapping or a tuple, got {type(example).__name__}.")


def labels_from_blocks(model: nn.Module, blocks: Sequence[Any], param: str) -> dict[str, Tensor]:
    """Which entries of one parameter each kind of block holds.

    Args:
        model: the model the blocks were found in.
        blocks: :class:`lightning_hessian.blocks.Block` objects (anything with ``kind``, ``params`` and
            ``masks(model)``).
        param: a parameter name, as in ``model.named_parameters()``.

    Returns:
        ``{kind: mask}``: for each kind of block touching ``param``, the union of those blocks' masks of
        ``param``. Kinds whose blocks do not touch ``param`` are left out.
    """
    labels: dict[str, Tensor] = {}
    for block in blocks:
        if param not in block.params:
            continue
        mask = block.masks(model)[param]
        labels[block.kind] = labels[block.kind] | mask if block.kind in labels else mask.clone()
    return labels


# --- helpers: seeding, generic weights, layouts ----------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG inside the block (libraries initialise with it), restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode, and generic weights: every parameter gets small seeded noise.

    Libraries initialise biases to zero and norm gains to one; the noise makes every entry generic (no
    exactly-zero query/key/value biases) without changing the scale of anything.
    """
    model = model.to(torch.float64).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    return model


def _tokens(seed: int, shape: tuple[int, ...] = (BATCH, SEQ)) -> Tensor:
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _floats(seed: int, *shape: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _whole(role: str) -> _Layout:
    """The whole parameter is ``role`` (a separate projection's weight or bias)."""
    return lambda shape: {role: torch.ones(shape, dtype=torch.bool)}


def _tiled(pattern: Sequence[tuple[str, int]], dim: int = 0) -> _Layout:
    """Pieces ``(role, size)`` in order along ``dim``, the pattern repeated until the dim is filled.

    ``[("query", 32), ("key", 16), ("value", 16)]`` on 64 rows is a contiguous ``[Q | K | V]`` split;
    ``[("query", 8), ("key", 8), ("value", 8)]`` on 96 rows is GPT-NeoX's per-head interleaving (repeated
    for 4 heads). ``dim`` applies to weights; 1-D biases are always split along 0.
    """

    def layout(shape: torch.Size) -> dict[str, Tensor]:
        d = dim if len(shape) > 1 else 0
        period = sum(size for _, size in pattern)
        if shape[d] % period:
            raise ValueError(f"pattern {pattern} (period {period}) does not tile dim {d} of {tuple(shape)}")
        masks = {role: torch.zeros(shape, dtype=torch.bool) for role, _ in pattern}
        start = 0
        while start < shape[d]:
            for role, size in pattern:
                masks[role].narrow(d, start, size).fill_(True)
                start += size
        return masks

    return layout


def _table(*rows: tuple[str, _Layout]) -> Callable[[nn.Module], Expected]:
    """``expected`` from rows ``(regex fully matching a parameter name, layout)``."""
    compiled = [(re.compile(pattern), layout) for pattern, layout in rows]

    def expected(model: nn.Module) -> Expected:
        out: Expected = {}
        for name, param in model.named_parameters():
            hits = [layout for regex, layout in compiled if regex.fullmatch(name)]
            if len(hits) > 1:
                raise ValueError(f"{name!r} matches {len(hits)} rows of the expected-layout table")
            if hits:
                out[name] = hits[0](param.shape)
        return out

    return expected


# --- Hugging Face transformers ---------------------------------------------------------------------------

D = 32  # HF width
HEADS = 4
KV_HEADS = 2
HD = D // HEADS  # head size 8
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # within the toy vocabulary


def _hf(model_cls: str, config_cls: str, impl: str, seed: int, **config: Any) -> nn.Module:
    """A real ``transformers`` model from a config, with random weights, attention ``impl``."""
    import transformers

    cfg = getattr(transformers, config_cls)(**config)
    with _seeded(seed):
        model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation=impl)
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"{model_cls} runs {model.config._attn_implementation!r}, not {impl!r}")
    return _finish(model, seed)


def _decoder_config(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        max_position_embeddings=16,
        use_cache=False,
        **_SPECIAL,
        **extra,
    )


def _lm_example(seed: int) -> dict[str, Tensor]:
    return {"input_ids": _tokens(seed)}


def _build_llama() -> tuple[nn.Module, Any]:
    # LlamaAttention: q_proj (heads * head_dim rows), k_proj / v_proj (kv_heads * head_dim rows), no bias
    model = _hf(
        "LlamaForCausalLM", "LlamaConfig", "eager", 1, **_decoder_config(num_key_value_heads=KV_HEADS)
    )
    return model, _lm_example(1)


def _build_qwen2() -> tuple[nn.Module, Any]:
    # Qwen2Attention: like LLaMA, with biases on q_proj / k_proj / v_proj (not on o_proj)
    model = _hf("Qwen2ForCausalLM", "Qwen2Config", "sdpa", 2, **_decoder_config(num_key_value_heads=KV_HEADS))
    return model, _lm_example(2)


def _build_mistral() -> tuple[nn.Module, Any]:
    model = _hf(
        "MistralForCausalLM", "MistralConfig", "sdpa", 3, **_decoder_config(num_key_value_heads=KV_HEADS)
    )
    return model, _lm_example(3)


_SEPARATE_QKV = (
    (r".*\.self_attn\.q_proj\.(weight|bias)", _whole("query")),
    (r".*\.self_attn\.k_proj\.(weight|bias)", _whole("key")),
    (r".*\.self_attn\.v_proj\.(weight|bias)", _whole("value")),
)


def _build_phi3() -> tuple[nn.Module, Any]:
    # Phi3Attention: qkv_proj rows [Q (heads * hd) | K (kv * hd) | V (kv * hd)] = [32 | 16 | 16], no bias
    model = _hf("Phi3ForCausalLM", "Phi3Config", "eager", 4, **_decoder_config(num_key_value_heads=KV_HEADS))
    return model, _lm_example(4)


def _gpt2_config(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        n_embd=D,
        n_head=HEADS,
        n_layer=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        **_SPECIAL,
        **extra,
    )


def _build_gpt2() -> tuple[nn.Module, Any]:
    # GPT2Attention: Conv1D c_attn, weight (in, 3 * D): columns [Q | K | V], split(D, dim=2)
    return _hf("GPT2LMHeadModel", "GPT2Config", "eager", 5, **_gpt2_config()), _lm_example(5)


def _build_gpt2_cross() -> tuple[nn.Module, Any]:
    # is_cross_attention: q_attn Conv1D(D, D) holds Q, c_attn Conv1D(2 * D, D) columns [K | V]
    model = _hf("GPT2LMHeadModel", "GPT2Config", "sdpa", 6, **_gpt2_config(add_cross_attention=True))
    return model, {"input_ids": _tokens(6), "encoder_hidden_states": _floats(6, BATCH, 5, D)}


def _build_neox() -> tuple[nn.Module, Any]:
    # GPTNeoXAttention: query_key_value(x).view(B, T, heads, 3 * hd), chunk(3, -1): per head [q | k | v]
    model = _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", "sdpa", 7, **_decoder_config())
    return model, _lm_example(7)


def _build_bloom() -> tuple[nn.Module, Any]:
    # BloomAttention._reshape: fused.view(B, T, heads, 3, hd) -> [..., 0 / 1 / 2, :]: per head [q | k | v]
    model = _hf(
        "BloomForCausalLM",
        "BloomConfig",
        "eager",
        8,
        vocab_size=VOCAB,
        hidden_size=D,
        n_head=HEADS,
        n_layer=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,
        **_SPECIAL,
    )
    return model, _lm_example(8)


def _falcon_config(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        alibi=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,
        **_SPECIAL,
        **extra,
    )


def _build_falcon_mqa() -> tuple[nn.Module, Any]:
    # multi_query: query_key_value out = D + 2 * hd; view(B, T, heads + 2, hd): [Q (heads) | K (1) | V (1)]
    model = _hf(
        "FalconForCausalLM",
        "FalconConfig",
        "sdpa",
        9,
        **_falcon_config(multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=True),
    )
    return model, _lm_example(9)


def _build_falcon_new() -> tuple[nn.Module, Any]:
    # new_decoder_architecture: view(B, T, kv, heads // kv + 2, hd): per group [q, q | k | v]
    model = _hf(
        "FalconForCausalLM",
        "FalconConfig",
        "eager",
        10,
        **_falcon_config(new_decoder_architecture=True, num_kv_heads=KV_HEADS, bias=True),
    )
    return model, _lm_example(10)


def _build_bert() -> tuple[nn.Module, Any]:
    # BertSelfAttention: separate query / key / value Linear(D, D) with biases
    model = _hf(
        "BertModel",
        "BertConfig",
        "eager",
        11,
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=48,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return model, {"input_ids": _tokens(11), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


T5_KV = 6  # T5's d_kv: inner_dim = heads * d_kv = 24 != d_model


def _build_t5() -> tuple[nn.Module, Any]:
    # T5Attention: q / k / v Linear(d_model, heads * d_kv, bias=False); EncDecAttention takes k / v from the
    # encoder output
    model = _hf(
        "T5Model",
        "T5Config",
        "eager",
        12,
        vocab_size=VOCAB,
        d_model=D,
        d_kv=T5_KV,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model, {"input_ids": _tokens(12), "decoder_input_ids": _tokens(13, (BATCH, 4))}


def _build_vit() -> tuple[nn.Module, Any]:
    # ViTAttention (transformers 5): separate q_proj / k_proj / v_proj with qkv_bias
    model = _hf(
        "ViTModel",
        "ViTConfig",
        "sdpa",
        14,
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return model, _floats(14, BATCH, 3, 8, 8)  # a plain Tensor: model(pixel_values)


# --- PyTorch nn.MultiheadAttention -------------------------------------------------------------------------


class MHAProbe(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) followed by a linear head.

    Args:
        attn: the attention layer.
        need_weights: passed to every call: True takes the bmm-softmax-bmm path of
            ``F.multi_head_attention_forward``, False its ``scaled_dot_product_attention`` path.
    """

    def __init__(self, attn: nn.MultiheadAttention, need_weights: bool) -> None:
        super().__init__()
        self.attn = attn
        self.need_weights = need_weights
        self.head = nn.Linear(attn.embed_dim, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return self.head(self.attn(query, key, value, need_weights=self.need_weights)[0])


MHA_E = 12


def _build_mha_packed() -> tuple[nn.Module, Any]:
    # embed_dim == kdim == vdim: in_proj_weight (3E, E) rows [Q | K | V], in_proj_bias the same
    with _seeded(20):
        model = MHAProbe(nn.MultiheadAttention(MHA_E, 3, batch_first=True), need_weights=True)
    x = _floats(20, BATCH, 5, MHA_E)
    return _finish(model, 20), (x, x, x)  # one tensor three times: the packed self-attention fast route


def _build_mha_separate() -> tuple[nn.Module, Any]:
    # kdim / vdim != embed_dim: q_proj_weight (E, E), k_proj_weight (E, 7), v_proj_weight (E, 5); the
    # in_proj_bias (3E) is still [Q | K | V]; add_bias_kv appends bias_k / bias_v (1, 1, E) to keys / values
    with _seeded(21):
        attn = nn.MultiheadAttention(MHA_E, 2, kdim=7, vdim=5, add_bias_kv=True, batch_first=True)
        model = MHAProbe(attn, need_weights=False)
    example = (_floats(21, BATCH, 4, MHA_E), _floats(22, BATCH, 6, 7), _floats(23, BATCH, 6, 5))
    return _finish(model, 21), example


# --- nanoGPT (karpathy/nanoGPT, model.py) ----------------------------------------------------------------


@dataclass
class GPTConfig:
    """nanoGPT's config, tiny."""

    block_size: int = 16
    vocab_size: int = VOCAB
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True
    flash: bool = False  # nanoGPT picks flash when F.scaled_dot_product_attention exists; here explicit


class NanoGPTLayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoGPTCausalSelfAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention``: ``q, k, v = self.c_attn(x).split(n_embd, dim=2)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash
        if not self.flash:
            mask = torch.tril(torch.ones(config.block_size, config.block_size))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoGPTMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoGPTBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = NanoGPTLayerNorm(config.n_embd, bias=config.bias)
        self.attn = NanoGPTCausalSelfAttention(config)
        self.ln_2 = NanoGPTLayerNorm(config.n_embd, bias=config.bias)
        self.mlp = NanoGPTMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's ``GPT`` (``lm_head`` tied to ``wte``), returning the logits of every position."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([NanoGPTBlock(config) for _ in range(config.n_layer)]),
                ln_f=NanoGPTLayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _build_nanogpt() -> tuple[nn.Module, Any]:
    # c_attn rows [Q | K | V] (n_embd each), heads then split within each; the "slow attention" path
    with _seeded(30):
        model = NanoGPT(GPTConfig())
    return _finish(model, 30), _tokens(30)


# --- litgpt (Lightning-AI/litgpt, litgpt/model.py) -------------------------------------------------------
#
# Rebuilt from the source (litgpt must not be installed here: its pins replace torch). Two layouts:
#   * LITGPT_OLD = db308ba1f1aaf7cc2a56753f19d2cb33a4255f9b (2024-12-24), the parent of fabf765 "Drop
#     interleave placement in QKV matrix (#1013)": the fused projection is ``self.attn``, its output viewed
#     as ``(B, T, n_query_groups, q_per_kv + 2, head_size)`` and split ``(q_per_kv, 1, 1)`` along dim 2;
#   * LITGPT_NEW = 26857050fe3ff627cd714fe92f5838f51a3d5efa (v0.5.13): the fused projection is ``self.qkv``,
#     split contiguously ``qkv.split((n_head * hs, n_query_groups * hs, n_query_groups * hs), dim=-1)``, keys
#     and values ``repeat_interleave``d to the query heads.
# Both use F.scaled_dot_product_attention (no softcapping), RoPE on the first rope_n_elem dims of q and k.

LITGPT_OLD = "db308ba1f1aaf7cc2a56753f19d2cb33a4255f9b"
LITGPT_NEW = "26857050fe3ff627cd714fe92f5838f51a3d5efa"


@dataclass
class LitConfig:
    """The part of litgpt's ``Config`` that ``CausalSelfAttention`` reads, tiny."""

    n_embd: int = 32
    n_head: int = 4
    n_query_groups: int = 2
    head_size: int = 8
    rotary_percentage: float = 0.5
    bias: bool = False
    attn_bias: bool = False
    n_layer: int = 2
    block_size: int = 16
    vocab_size: int = VOCAB
    interleaved: bool = False  # True: the layout of LITGPT_OLD; False: LITGPT_NEW

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)


def _lit_build_rope_cache(seq_len: int, n_elem: int, base: int = 10000) -> tuple[Tensor, Tensor]:
    """litgpt's ``build_rope_cache`` (no extra_config, condense_ratio 1)."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2).float() / n_elem))
    seq_idx = torch.arange(seq_len) / 1
    idx_theta = torch.outer(seq_idx, theta).repeat(1, 2)
    return torch.cos(idx_theta), torch.sin(idx_theta)


def _lit_apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """litgpt's ``apply_rope``: x (B, nh, T, hs), cos / sin (1, T, hs)."""
    head_size = x.size(-1)
    x1 = x[..., : head_size // 2]
    x2 = x[..., head_size // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos = cos.unsqueeze(-3)
    sin = sin.unsqueeze(-3)
    roped = (x * cos) + (rotated * sin)
    return roped.to(dtype=x.dtype)


class LitCausalSelfAttention(nn.Module):
    """litgpt's ``CausalSelfAttention`` (no KV cache, no sliding window, no qk-norm).

    ``config.interleaved`` picks the layout of commit :data:`LITGPT_OLD` (module ``attn``, per-group
    interleaved ``[q_1 .. q_{q_per_kv}, k, v]``) or of :data:`LITGPT_NEW` (module ``qkv``, ``[Q | K | V]``).
    """

    def __init__(self, config: LitConfig) -> None:
        super().__init__()
        shape = (config.n_head + 2 * config.n_query_groups) * config.head_size
        fused = nn.Linear(config.n_embd, shape, bias=config.bias or config.attn_bias)
        if config.interleaved:
            self.attn = fused
        else:
            self.qkv = fused
        self.proj = nn.Linear(config.head_size * config.n_head, config.n_embd, bias=config.bias)
        self.config = config

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.size()
        cfg = self.config
        if cfg.interleaved:  # litgpt @ LITGPT_OLD
            qkv = self.attn(x)
            q_per_kv = cfg.n_head // cfg.n_query_groups
            total_qkv = q_per_kv + 2
            qkv = qkv.view(B, T, cfg.n_query_groups, total_qkv, cfg.head_size)
            qkv = qkv.permute(0, 2, 3, 1, 4)  # (B, n_query_groups, total_qkv, T, hs)
            q, k, v = qkv.split((q_per_kv, 1, 1), dim=2)
            if cfg.n_query_groups != cfg.n_head:  # input_pos is None here
                k = k.expand(*q.shape)
                v = v.expand(*q.shape)
            q = q.reshape(B, -1, T, cfg.head_size)
            k = k.reshape(B, -1, T, cfg.head_size)
            v = v.reshape(B, -1, T, cfg.head_size)
        else:  # litgpt @ LITGPT_NEW
            qkv = self.qkv(x)
            query_size = cfg.n_head * cfg.head_size
            key_size = value_size = cfg.n_query_groups * cfg.head_size
            q, k, v = qkv.split((query_size, key_size, value_size), dim=-1)
            q = q.view(B, T, cfg.n_head, cfg.head_size).transpose(1, 2)
            k = k.view(B, T, cfg.n_query_groups, cfg.head_size).transpose(1, 2)
            v = v.view(B, T, cfg.n_query_groups, cfg.head_size).transpose(1, 2)
        n = cfg.rope_n_elem
        q = torch.cat((_lit_apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((_lit_apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        if not cfg.interleaved and cfg.n_query_groups != cfg.n_head:
            q_per_kv = cfg.n_head // cfg.n_query_groups
            k = k.repeat_interleave(q_per_kv, dim=1)
            v = v.repeat_interleave(q_per_kv, dim=1)
        scale = 1.0 / math.sqrt(cfg.head_size)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=0.0, scale=scale, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, cfg.head_size * cfg.n_head)
        return self.proj(y)


class LitGptNeoxMLP(nn.Module):
    """litgpt's ``GptNeoxMLP``: ``fc``, GELU, ``proj``."""

    def __init__(self, config: LitConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class LitBlock(nn.Module):
    """litgpt's ``Block`` with ``parallel_residual=False``."""

    def __init__(self, config: LitConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd)
        self.attn = LitCausalSelfAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd)
        self.mlp = LitGptNeoxMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = self.attn(self.norm_1(x), cos, sin) + x
        return self.mlp(self.norm_2(x)) + x


class LitGPT(nn.Module):
    """litgpt's ``GPT``: ``transformer.{wte, h, ln_f}`` and ``lm_head``; RoPE cos / sin buffers."""

    def __init__(self, config: LitConfig) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(LitBlock(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        cos, sin = _lit_build_rope_cache(config.block_size, config.rope_n_elem)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        cos = self.cos[:T].unsqueeze(0)
        sin = self.sin[:T].unsqueeze(0)
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return self.lm_head(self.transformer.ln_f(x))


def _litgpt_builder(seed: int, **config: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        with _seeded(seed):
            model = LitGPT(LitConfig(**config))
        return _finish(model, seed), _tokens(seed)

    return build


# --- custom layouts --------------------------------------------------------------------------------------

CD = 24  # custom models' width


class CustomModel(nn.Module):
    """Embedding, ``layers.{i}.{norm, mix}`` residual blocks, a head; ``mix`` is any token mixer."""

    def __init__(self, mixer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, CD)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(CD), mix=mixer())) for _ in range(2))
        self.out = nn.Linear(CD, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer["mix"](layer["norm"](x))
        return self.out(x)


class OddNames(nn.Module):
    """Separate projections named ``a`` (queries), ``b`` (keys), ``c`` (values); explicit softmax.

    2 heads; query/key heads of size 8 (``a``, ``b``: 16 rows), value heads of size 10 (``c``: 20 rows),
    only ``a`` has a bias; ``d`` maps the 20 value features back to the width.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(CD, 16)
        self.b = nn.Linear(CD, 16, bias=False)
        self.c = nn.Linear(CD, 20, bias=False)
        self.d = nn.Linear(20, CD)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 2, -1).transpose(1, 2) for t in (self.a(x), self.b(x), self.c(x)))
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        y = torch.matmul(F.softmax(w, dim=-1), v)
        return self.d(y.transpose(1, 2).reshape(B, T, 20))


class FusedVQK(nn.Module):
    """One fused projection ``wide`` whose output chunks are ``[V | Q | K]``; 3 heads of size 8."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(CD, 3 * CD)
        self.back = nn.Linear(CD, CD)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        v, q, k = (t.view(B, T, 3, -1).transpose(1, 2) for t in self.wide(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.back(y.transpose(1, 2).reshape(B, T, CD))


class GroupInterleaved(nn.Module):
    """Grouped-query attention, 4 query heads in 2 groups, head size 6, one fused projection ``mixed``.

    Rows ``view(groups, 4, head)``: per group ``[k, q, q, v]``; scores with ``torch.bmm`` over (batch *
    head) and an explicit softmax.
    """

    groups, per_group, head = 2, 2, 6

    def __init__(self) -> None:
        super().__init__()
        self.mixed = nn.Linear(CD, self.groups * (self.per_group + 2) * self.head)
        self.back = nn.Linear(self.groups * self.per_group * self.head, CD)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        g, p, h = self.groups, self.per_group, self.head
        m = self.mixed(x).view(B, T, g, p + 2, h)
        k, q, v = m[:, :, :, :1], m[:, :, :, 1 : 1 + p], m[:, :, :, 1 + p :]
        k, v = k.expand(B, T, g, p, h), v.expand(B, T, g, p, h)

        def heads(t: Tensor) -> Tensor:  # (B, T, g, p, h) -> (B * g * p, T, h)
            return t.permute(0, 2, 3, 1, 4).reshape(B * g * p, T, h)

        q, k, v = heads(q), heads(k), heads(v)
        probs = F.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(h), dim=-1)
        y = torch.bmm(probs, v).view(B, g * p, T, h).transpose(1, 2).reshape(B, T, g * p * h)
        return self.back(y)


def _custom_builder(mixer: Callable[[], nn.Module], seed: int) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        with _seeded(seed):
            model = CustomModel(mixer)
        return _finish(model, seed), _tokens(seed)

    return build


# --- the zoo ---------------------------------------------------------------------------------------------

_Q, _K, _V = "query", "key", "value"
_HF = "transformers"

ZOO: list[ZooEntry] = [
    ZooEntry("hf_llama_gqa_eager", _build_llama, _table(*_SEPARATE_QKV), needs=_HF),
    ZooEntry("hf_qwen2_gqa_bias_sdpa", _build_qwen2, _table(*_SEPARATE_QKV), needs=_HF),
    ZooEntry("hf_mistral_gqa_sdpa", _build_mistral, _table(*_SEPARATE_QKV), needs=_HF),
    ZooEntry(
        "hf_phi3_gqa_eager",
        _build_phi3,
        _table(
            (
                r".*\.self_attn\.qkv_proj\.weight",
                _tiled([(_Q, HEADS * HD), (_K, KV_HEADS * HD), (_V, KV_HEADS * HD)]),
            )
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_gpt2_eager",
        _build_gpt2,
        _table((r".*\.attn\.c_attn\.(weight|bias)", _tiled([(_Q, D), (_K, D), (_V, D)], dim=1))),
        needs=_HF,
    ),
    ZooEntry(
        "hf_gpt2_cross_sdpa",
        _build_gpt2_cross,
        _table(
            (r".*\.attn\.c_attn\.(weight|bias)", _tiled([(_Q, D), (_K, D), (_V, D)], dim=1)),
            (r".*\.crossattention\.c_attn\.(weight|bias)", _tiled([(_K, D), (_V, D)], dim=1)),
            (r".*\.crossattention\.q_attn\.(weight|bias)", _whole(_Q)),
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_gpt_neox_sdpa",
        _build_neox,
        _table((r".*\.attention\.query_key_value\.(weight|bias)", _tiled([(_Q, HD), (_K, HD), (_V, HD)]))),
        needs=_HF,
    ),
    ZooEntry(
        "hf_bloom_eager",
        _build_bloom,
        _table(
            (r".*\.self_attention\.query_key_value\.(weight|bias)", _tiled([(_Q, HD), (_K, HD), (_V, HD)]))
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_falcon_mqa_sdpa",
        _build_falcon_mqa,
        _table(
            (r".*\.self_attention\.query_key_value\.(weight|bias)", _tiled([(_Q, D), (_K, HD), (_V, HD)]))
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_falcon_new_arch_gqa_eager",
        _build_falcon_new,
        _table(
            (
                r".*\.self_attention\.query_key_value\.(weight|bias)",
                _tiled([(_Q, (HEADS // KV_HEADS) * HD), (_K, HD), (_V, HD)]),
            )
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_bert_eager",
        _build_bert,
        _table(
            (r".*\.attention\.self\.query\.(weight|bias)", _whole(_Q)),
            (r".*\.attention\.self\.key\.(weight|bias)", _whole(_K)),
            (r".*\.attention\.self\.value\.(weight|bias)", _whole(_V)),
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_t5_eager",
        _build_t5,
        _table(
            (r".*\.(SelfAttention|EncDecAttention)\.q\.weight", _whole(_Q)),
            (r".*\.(SelfAttention|EncDecAttention)\.k\.weight", _whole(_K)),
            (r".*\.(SelfAttention|EncDecAttention)\.v\.weight", _whole(_V)),
        ),
        needs=_HF,
    ),
    ZooEntry(
        "hf_vit_sdpa",
        _build_vit,
        _table(
            (r".*\.attention\.q_proj\.(weight|bias)", _whole(_Q)),
            (r".*\.attention\.k_proj\.(weight|bias)", _whole(_K)),
            (r".*\.attention\.v_proj\.(weight|bias)", _whole(_V)),
        ),
        needs=_HF,
    ),
    ZooEntry(
        "torch_mha_packed_need_weights",
        _build_mha_packed,
        _table((r"attn\.in_proj_(weight|bias)", _tiled([(_Q, MHA_E), (_K, MHA_E), (_V, MHA_E)]))),
    ),
    ZooEntry(
        "torch_mha_kdim_vdim_bias_kv_sdpa",
        _build_mha_separate,
        _table(
            (r"attn\.q_proj_weight", _whole(_Q)),
            (r"attn\.k_proj_weight", _whole(_K)),
            (r"attn\.v_proj_weight", _whole(_V)),
            (r"attn\.in_proj_bias", _tiled([(_Q, MHA_E), (_K, MHA_E), (_V, MHA_E)])),
            (r"attn\.bias_k", _whole(_K)),
            (r"attn\.bias_v", _whole(_V)),
        ),
    ),
    ZooEntry(
        "nanogpt_c_attn_split_eager",
        _build_nanogpt,
        _table((r"transformer\.h\.\d+\.attn\.c_attn\.(weight|bias)", _tiled([(_Q, 32), (_K, 32), (_V, 32)]))),
    ),
    # litgpt @ LITGPT_OLD: per query group [q * q_per_kv | k | v], each head_size rows
    ZooEntry(
        "litgpt_db308ba_interleaved_gqa",
        _litgpt_builder(40, n_query_groups=2, interleaved=True, attn_bias=True),
        _table((r"transformer\.h\.\d+\.attn\.attn\.(weight|bias)", _tiled([(_Q, 2 * 8), (_K, 8), (_V, 8)]))),
    ),
    ZooEntry(
        "litgpt_db308ba_interleaved_mqa",
        _litgpt_builder(41, n_query_groups=1, interleaved=True),
        _table((r"transformer\.h\.\d+\.attn\.attn\.weight", _tiled([(_Q, 4 * 8), (_K, 8), (_V, 8)]))),
    ),
    # litgpt @ LITGPT_NEW: [Q (n_head * hs) | K (groups * hs) | V (groups * hs)]
    ZooEntry(
        "litgpt_2685705_split_gqa",
        _litgpt_builder(42, n_query_groups=2, interleaved=False, attn_bias=True),
        _table(
            (
                r"transformer\.h\.\d+\.attn\.qkv\.(weight|bias)",
                _tiled([(_Q, 4 * 8), (_K, 2 * 8), (_V, 2 * 8)]),
            )
        ),
    ),
    ZooEntry(
        "litgpt_2685705_split_mqa",
        _litgpt_builder(43, n_query_groups=1, interleaved=False),
        _table((r"transformer\.h\.\d+\.attn\.qkv\.weight", _tiled([(_Q, 4 * 8), (_K, 8), (_V, 8)]))),
    ),
    ZooEntry(
        "custom_odd_names_abc_eager",
        _custom_builder(OddNames, 50),
        _table(
            (r"layers\.\d+\.mix\.a\.(weight|bias)", _whole(_Q)),
            (r"layers\.\d+\.mix\.b\.weight", _whole(_K)),
            (r"layers\.\d+\.mix\.c\.weight", _whole(_V)),
        ),
    ),
    ZooEntry(
        "custom_fused_vqk_sdpa",
        _custom_builder(FusedVQK, 51),
        _table((r"layers\.\d+\.mix\.wide\.(weight|bias)", _tiled([(_V, CD), (_Q, CD), (_K, CD)]))),
    ),
    ZooEntry(
        "custom_group_interleaved_kqqv_bmm",
        _custom_builder(GroupInterleaved, 52),
        _table((r"layers\.\d+\.mix\.mixed\.(weight|bias)", _tiled([(_K, 6), (_Q, 2 * 6), (_V, 6)]))),
    ),
]
