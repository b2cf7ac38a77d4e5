"""Tiny Transformers of the common families, for tests: no downloads, no ``transformers`` / ``timm``.

Each family copies the module names and parameter layouts of the real one (PyTorch's own layers, a
timm ViT, nanoGPT, HF GPT-2 with its transposed ``Conv1D``, BERT, LLaMA with grouped-query attention), at
toy size: width 8-16, 2 layers, vocabulary 11. Models are built with a fixed seed (without touching the
global RNG), have no dropout, and work in float64 (``make_model(name, torch.float64)``).

Usage::

    from _models import MODELS, loss_fn, make_batch, make_model   # pytest puts tests/ on sys.path

    model = make_model("llama", torch.float64)
    batch = make_batch("llama", dtype=torch.float64)
    loss = loss_fn(model, batch)                      # = criterion(forward_fn(model, batch), batch)

A batch is a pair ``(inputs, targets)``: ``inputs`` a tuple of tensors passed as ``model(*inputs)``,
``targets`` class indices. Every model returns logits whose last dim is the classes, and
:func:`criterion` is the mean cross-entropy over all positions. ``MODELS[name]`` is a :class:`ModelSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 11
D = 16  # model width
SEQ = 5  # tokens per sequence
CLASSES = 3  # classes of the classifiers (ViT, BERT, the attention probe)

Batch = tuple[tuple[Tensor, ...], Tensor]


# --- PyTorch's own layers ------------------------------------------------------------------------------


class EncoderLM(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (batch_first, final norm) + per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=2 * D, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=2, norm=nn.LayerNorm(D), enable_nested_tensor=False
        )
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class AttentionProbe(nn.Module):
    """``nn.MultiheadAttention`` with kdim/vdim != embed_dim (separate q/k/v weights) and add_bias_kv."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return self.head(self.attn(query, key, value, need_weights=False)[0])


class DecoderLM(nn.Module):
    """Embedding + ``nn.TransformerDecoder`` of ``nn.TransformerDecoderLayer`` (causal, cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerDecoderLayer(D, nhead=2, dim_feedforward=2 * D, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=2, norm=nn.LayerNorm(D))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: Tensor, memory: Tensor) -> Tensor:
        x = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True))


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Explicit-softmax causal attention on (batch, heads, seq, head_dim) tensors (HF's "eager" path)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def _heads(x: Tensor, n: int) -> Tensor:
    """(batch, seq, n * head_dim) -> (batch, n, seq, head_dim)."""
    return x.reshape(*x.shape[:2], n, -1).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """Inverse of :func:`_heads`."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


# --- timm ViT ------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, D, kernel_size=4, stride=4)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's ``Attention``: fused ``qkv`` rows [Q; K; V], output ``proj``."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        return self.proj(_merge(attn @ v))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(D)
        self.mlp = Mlp()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm-style ViT on 3x8x8 images with 4x4 patches; classifies from the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + 4, D))
        self.blocks = nn.ModuleList(ViTBlock() for _ in range(2))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# --- nanoGPT -------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """nanoGPT's own LayerNorm (optional bias)."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.c_attn(x).split(D, dim=2))
        return self.c_proj(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(D, 4 * D)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(D)
        self.attn = CausalSelfAttention()
        self.ln_2 = LayerNorm(D)
        self.mlp = MLP()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT: ``transformer.{wte, wpe, h, ln_f}`` and an ``lm_head`` tied to ``wte``."""

    def __init__(self, block_size: int = 8) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(VOCAB, D),
                wpe=nn.Embedding(block_size, D),
                h=nn.ModuleList(GPTBlock() for _ in range(2)),
                ln_f=LayerNorm(D),
            )
        )
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT

    def forward(self, idx: Tensor) -> Tensor:
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


# --- HF GPT-2 ------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """HF transformers' ``Conv1D``: a linear layer with a transposed (in, out) weight, ``x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.02 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.02 * torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


class GPT2Attention(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(3 * D, D)  # columns [Q | K | V]
        self.c_proj = Conv1D(D, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.c_attn(x).split(D, dim=2))
        return self.c_proj(_merge(_causal_attention(q, k, v)))


class GPT2MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * D, D)
        self.c_proj = Conv1D(D, 4 * D)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = GPT2Attention()
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = GPT2MLP()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(8, D)
        self.h = nn.ModuleList(GPT2Block() for _ in range(2))
        self.ln_f = nn.LayerNorm(D)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """HF GPT-2 layout with an untied ``lm_head``."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = GPT2Model()
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.transformer(idx))


# --- BERT ----------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, D)
        self.position_embeddings = nn.Embedding(8, D)
        self.LayerNorm = nn.LayerNorm(D)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.LayerNorm(self.word_embeddings(tokens) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(f(x), self.heads) for f in (self.query, self.key, self.value))
        return _merge((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v)


class BertSelfOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(D, D)
        self.LayerNorm = nn.LayerNorm(D)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = BertSelfAttention()
        self.output = BertSelfOutput()

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(D, 2 * D)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(2 * D, D)
        self.LayerNorm = nn.LayerNorm(D)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = BertAttention()
        self.intermediate = BertIntermediate()
        self.output = BertOutput()

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer() for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertPooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings()
        self.encoder = BertEncoder()
        self.pooler = BertPooler()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.pooler(self.encoder(self.embeddings(tokens)))


class BertForSequenceClassification(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bert = BertModel()
        self.classifier = nn.Linear(D, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.classifier(self.bert(tokens))


# --- LLaMA ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaAttention(nn.Module):
    """Grouped-query attention: 4 query heads, 2 key/value heads of size 4 (q: 16 rows, k and v: 8)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, head_dim = heads, kv_heads, D // heads
        self.q_proj = nn.Linear(D, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(D, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(D, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        groups = self.heads // self.kv_heads
        q = _heads(self.q_proj(x), self.heads)
        k = _heads(self.k_proj(x), self.kv_heads).repeat_interleave(groups, dim=1)
        v = _heads(self.v_proj(x), self.kv_heads).repeat_interleave(groups, dim=1)
        return self.o_proj(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class LlamaMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, 2 * D, bias=False)
        self.up_proj = nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = LlamaAttention()
        self.mlp = LlamaMLP()
        self.input_layernorm = RMSNorm(D)
        self.post_attention_layernorm = RMSNorm(D)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(LlamaDecoderLayer() for _ in range(2))
        self.norm = RMSNorm(D)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = LlamaModel()
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm_head(self.model(tokens))


# --- registry, batches, loss ---------------------------------------------------------------------------


def _lm_batch(n: int, dtype: torch.dtype, g: torch.Generator) -> Batch:
    """Token sequences with one target token per position."""
    return (torch.randint(VOCAB, (n, SEQ), generator=g),), torch.randint(VOCAB, (n, SEQ), generator=g)


def _classify_batch(n: int, dtype: torch.dtype, g: torch.Generator) -> Batch:
    """Token sequences with one target class per sequence."""
    return (torch.randint(VOCAB, (n, SEQ), generator=g),), torch.randint(CLASSES, (n,), generator=g)


def _probe_batch(n: int, dtype: torch.dtype, g: torch.Generator) -> Batch:
    query, key, value = (torch.randn(n, s, d, generator=g, dtype=dtype) for s, d in ((4, 8), (6, 6), (6, 5)))
    return (query, key, value), torch.randint(CLASSES, (n, 4), generator=g)


def _decoder_batch(n: int, dtype: torch.dtype, g: torch.Generator) -> Batch:
    (tokens,), targets = _lm_batch(n, dtype, g)
    return (tokens, torch.randn(n, 6, D, generator=g, dtype=dtype)), targets


def _image_batch(n: int, dtype: torch.dtype, g: torch.Generator) -> Batch:
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=dtype),), torch.randint(CLASSES, (n,), generator=g)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one family's model and its batches.

    Attributes:
        build: builds the model in float32 (call through :func:`make_model` for the fixed seed).
        batch: ``batch(batch_size, dtype, generator) -> (inputs, targets)``.
    """

    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.dtype, torch.Generator], Batch]


MODELS: dict[str, ModelSpec] = {
    "encoder": ModelSpec(EncoderLM, _lm_batch),
    "mha": ModelSpec(AttentionProbe, _probe_batch),
    "decoder": ModelSpec(DecoderLM, _decoder_batch),
    "vit": ModelSpec(VisionTransformer, _image_batch),
    "nanogpt": ModelSpec(GPT, _lm_batch),
    "gpt2": ModelSpec(GPT2LMHeadModel, _lm_batch),
    "bert": ModelSpec(BertForSequenceClassification, _classify_batch),
    "llama": ModelSpec(LlamaForCausalLM, _lm_batch),
}


def make_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Build ``MODELS[name]`` with a fixed seed (the global RNG is left as it was), in ``dtype``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name].build()
    return model.to(dtype)


def make_batch(name: str, batch_size: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    """A reproducible random batch ``(inputs, targets)`` for ``MODELS[name]``; float inputs in ``dtype``."""
    return MODELS[name].batch(batch_size, dtype, torch.Generator().manual_seed(seed))


def forward_fn(model: nn.Module, batch: Batch) -> Tensor:
    """The model's logits on the batch's inputs."""
    inputs, _ = batch
    return model(*inputs)


def criterion(output: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy of logits ``output`` (classes last) against the batch's targets."""
    _, targets = batch
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """``criterion(forward_fn(model, batch), batch)``: the scalar loss."""
    return criterion(forward_fn(model, batch), batch)


def tree(modules: dict[str, nn.Module]) -> nn.Module:
    """A model holding ``modules`` at the given dotted paths (plain containers in between)."""
    root = nn.Module()
    for path, module in modules.items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if name not in parent._modules:
                parent.add_module(name, nn.Module())
            parent = parent._modules[name]
        parent.add_module(leaf, module)
    return root
