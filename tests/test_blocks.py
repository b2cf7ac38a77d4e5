"""Tests of lightning_hessian.blocks: block discovery across Transformer families, rules, and warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import MODELS, RMSNorm, forward_fn, make_batch, make_model, tree
from torch import nn

from lightning_hessian.blocks import KINDS, Block, BlockPart, FusedLayout, find_blocks, model_block

# --- helpers -------------------------------------------------------------------------------------------


def _layers(prefix: str, rows: list[tuple[str, str]], count: int = 2) -> list[tuple[str, str, int]]:
    """Per-layer rows ``(prefix.format(i) + suffix, kind, i)`` for layers 0..count-1."""
    return [(prefix.format(i) + suffix, kind, i) for i in range(count) for suffix, kind in rows]


def _summary(blocks: list[Block]) -> list[tuple[str, str, int | None]]:
    return [(b.name, b.kind, b.layer) for b in blocks]


def _find(model: nn.Module, **kwargs) -> list[Block]:
    """find_blocks, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_blocks(model, **kwargs)


def _rows(block: Block, param: str) -> tuple[int | None, int, int]:
    (part,) = [p for p in block.parts if p.param == param]
    return part.dim, part.start, part.stop


_ATTN = [
    ("self_attn.q", "query"),
    ("self_attn.k", "key"),
    ("self_attn.v", "value"),
    ("self_attn.out_proj", "attn_out"),
]

EXPECTED = {
    "encoder": [
        ("embed", "embedding", None),
        *_layers(
            "encoder.layers.{}.",
            [*_ATTN, ("linear1", "ffn_in"), ("linear2", "ffn_out"), ("norm1", "norm"), ("norm2", "norm")],
        ),
        ("encoder.norm", "norm", None),
        ("head", "head", None),
    ],
    "mha": [
        ("attn.q", "query", None),
        ("attn.k", "key", None),
        ("attn.v", "value", None),
        ("attn.out_proj", "attn_out", None),
        ("head", "head", None),
    ],
    "decoder": [
        ("embed", "embedding", None),
        *_layers(
            "decoder.layers.{}.",
            [
                *_ATTN,
                *[(name.replace("self_attn", "multihead_attn"), kind) for name, kind in _ATTN],
                ("linear1", "ffn_in"),
                ("linear2", "ffn_out"),
                ("norm1", "norm"),
                ("norm2", "norm"),
                ("norm3", "norm"),
            ],
        ),
        ("decoder.norm", "norm", None),
        ("head", "head", None),
    ],
    "vit": [
        ("cls_token", "embedding", None),
        ("pos_embed", "embedding", None),
        ("patch_embed.proj", "embedding", None),
        *_layers(
            "blocks.{}.",
            [
                ("norm1", "norm"),
                ("attn.q", "query"),
                ("attn.k", "key"),
                ("attn.v", "value"),
                ("attn.proj", "attn_out"),
                ("norm2", "norm"),
                ("mlp.fc1", "ffn_in"),
                ("mlp.fc2", "ffn_out"),
            ],
        ),
        ("norm", "norm", None),
        ("head", "head", None),
    ],
    "nanogpt": [
        ("transformer.wte", "embedding", None),  # tied with lm_head: counted once, under the first name
        ("transformer.wpe", "embedding", None),
        *_layers(
            "transformer.h.{}.",
            [
                ("ln_1", "norm"),
                ("attn.q", "query"),
                ("attn.k", "key"),
                ("attn.v", "value"),
                ("attn.c_proj", "attn_out"),
                ("ln_2", "norm"),
                ("mlp.c_fc", "ffn_in"),
                ("mlp.c_proj", "ffn_out"),
            ],
        ),
        ("transformer.ln_f", "norm", None),
    ],
    "bert": [
        ("bert.embeddings.word_embeddings", "embedding", None),
        ("bert.embeddings.position_embeddings", "embedding", None),
        ("bert.embeddings.LayerNorm", "norm", None),
        *_layers(
            "bert.encoder.layer.{}.",
            [
                ("attention.self.query", "query"),
                ("attention.self.key", "key"),
                ("attention.self.value", "value"),
                ("attention.output.dense", "attn_out"),
                ("attention.output.LayerNorm", "norm"),
                ("intermediate.dense", "ffn_in"),
                ("output.dense", "ffn_out"),
                ("output.LayerNorm", "norm"),
            ],
        ),
        ("bert.pooler.dense", "head", None),
        ("classifier", "head", None),
    ],
    "llama": [
        ("model.embed_tokens", "embedding", None),
        *_layers(
            "model.layers.{}.",
            [
                ("self_attn.q_proj", "query"),
                ("self_attn.k_proj", "key"),
                ("self_attn.v_proj", "value"),
                ("self_attn.o_proj", "attn_out"),
                ("mlp.gate_proj", "ffn_in"),
                ("mlp.up_proj", "ffn_in"),
                ("mlp.down_proj", "ffn_out"),
                ("input_layernorm", "norm"),
                ("post_attention_layernorm", "norm"),
            ],
        ),
        ("model.norm", "norm", None),
        ("lm_head", "head", None),
    ],
}
EXPECTED["gpt2"] = [*EXPECTED["nanogpt"], ("lm_head", "head", None)]  # same names, untied head


# --- every family --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_blocks_per_family(name):
    assert _summary(_find(make_model(name))) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masks_partition_trainable_parameters(name):
    model = make_model(name)
    blocks = _find(model)
    params = dict(model.named_parameters())
    counts = {n: torch.zeros(p.shape, dtype=torch.long) for n, p in params.items()}
    for block in blocks:
        assert block.kind in KINDS
        assert len(set(block.params)) == len(block.params)
        masks = block.masks(model)
        assert list(masks) == list(block.params)
        assert block.numel == sum(int(m.sum()) for m in masks.values())
        for n, mask in masks.items():
            assert mask.dtype == torch.bool and mask.shape == params[n].shape
            counts[n] += mask
    assert all(bool((c == 1).all()) for c in counts.values())


def test_frozen_parameters_are_skipped():
    model = make_model("encoder")
    model.embed.weight.requires_grad_(False)
    model.encoder.layers[0].norm1.weight.requires_grad_(False)
    blocks = {b.name: b for b in _find(model)}
    assert "embed" not in blocks  # a module without trainable parameters has no block
    assert blocks["encoder.layers.0.norm1"].params == ("encoder.layers.0.norm1.bias",)
    covered = {n for b in blocks.values() for n in b.params}
    assert covered == {n for n, p in model.named_parameters() if p.requires_grad}
    whole = model_block(model)
    assert whole.kind == "model" and set(whole.params) == covered


def test_tied_weights_count_once():
    model = make_model("nanogpt")
    assert model.lm_head.weight is model.transformer.wte.weight
    blocks = _find(model)
    names = [n for b in blocks for n in b.params]
    assert "transformer.wte.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert (
        sum(b.numel for b in blocks) == model_block(model).numel == sum(p.numel() for p in model.parameters())
    )


def test_model_block():
    model = make_model("gpt2")
    block = model_block(model, "all")
    assert (block.name, block.kind, block.layer) == ("all", "model", None)
    assert block.params == tuple(n for n, _ in model.named_parameters())
    assert all(bool(m.all()) for m in block.masks(model).values())


def test_nn_transformer_layers_and_final_norms():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Transformer(8, 2, 1, 1, dim_feedforward=16, batch_first=True)
    found = {b.name: (b.kind, b.layer) for b in _find(model)}
    assert found["encoder.layers.0.self_attn.q"] == ("query", 0)
    assert found["decoder.layers.0.multihead_attn.v"] == ("value", 0)
    assert found["decoder.layers.0.norm3"] == ("norm", 0)
    assert found["encoder.norm"] == found["decoder.norm"] == ("norm", None)
    assert len(found) == 8 + 13 + 2


# --- fused Q/K/V slices --------------------------------------------------------------------------------


def test_packed_in_proj_rows():
    blocks = {b.name: b for b in _find(make_model("encoder"))}
    for i, suffix in enumerate("qkv"):
        block = blocks[f"encoder.layers.1.self_attn.{suffix}"]
        assert block.params == (
            "encoder.layers.1.self_attn.in_proj_weight",
            "encoder.layers.1.self_attn.in_proj_bias",
        )
        assert block.parts[0] == BlockPart(block.params[0], 0, 16 * i, 16 * (i + 1))
        assert block.parts[1] == BlockPart(block.params[1], 0, 16 * i, 16 * (i + 1))
        assert block.numel == 16 * 16 + 16
        mask = block.masks(make_model("encoder"))[block.params[0]]
        assert bool(mask[16 * i : 16 * (i + 1)].all()) and int(mask.sum()) == 16 * 16


def test_separate_qkv_weights_share_the_packed_bias():
    blocks = {b.name: b for b in _find(make_model("mha"))}
    q, k, v = blocks["attn.q"], blocks["attn.k"], blocks["attn.v"]
    assert q.params == ("attn.q_proj_weight", "attn.in_proj_bias")
    assert k.params == ("attn.k_proj_weight", "attn.in_proj_bias", "attn.bias_k")
    assert v.params == ("attn.v_proj_weight", "attn.in_proj_bias", "attn.bias_v")
    assert [_rows(b, "attn.in_proj_bias") for b in (q, k, v)] == [(0, 0, 8), (0, 8, 16), (0, 16, 24)]
    assert (q.numel, k.numel, v.numel) == (8 * 8 + 8, 8 * 6 + 8 + 8, 8 * 5 + 8 + 8)


def test_gpt2_conv1d_splits_columns():
    blocks = {b.name: b for b in _find(make_model("gpt2"))}
    k = blocks["transformer.h.0.attn.k"]
    assert _rows(k, "transformer.h.0.attn.c_attn.weight") == (1, 16, 32)  # weight is (in, 3 * out)
    assert _rows(k, "transformer.h.0.attn.c_attn.bias") == (0, 16, 32)


# Where the attention module's output is observed, and its output projection (whose bias is the output when
# the values are zero).
ATTENTION = {
    "encoder": ("encoder.layers.0.self_attn", "encoder.layers.0.self_attn.out_proj"),
    "mha": ("attn", "attn.out_proj"),
    "decoder": ("decoder.layers.1.multihead_attn", "decoder.layers.1.multihead_attn.out_proj"),
    "vit": ("blocks.0.attn", "blocks.0.attn.proj"),
    "nanogpt": ("transformer.h.0.attn", "transformer.h.0.attn.c_proj"),
    "gpt2": ("transformer.h.1.attn", "transformer.h.1.attn.c_proj"),
}


def _attention_output(model: nn.Module, name: str, path: str) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(path).register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        forward_fn(model, make_batch(name, dtype=torch.float64))
    handle.remove()
    return seen[0]


def _edit(model: nn.Module, block: Block, fn) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for part in block.parts:
            fn(part.narrow(params[part.param]))


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_qkv_slices_act_as_query_key_value(name):
    """Functional check of the slices: shifting every key by one vector leaves softmax attention unchanged,
    shifting the queries does not, and zero values give the output projection's bias."""
    attn, out_proj = ATTENTION[name]
    model = make_model(name, torch.float64)
    blocks = {b.name: b for b in _find(model)}
    reference = _attention_output(model, name, attn)
    width = reference.shape[-1]
    shift = torch.randn(width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def add_to_biases(t: torch.Tensor) -> None:
        if t.dim() != 2:  # biases (and bias_k): the weights stay
            t.add_(shift)

    for suffix, changes in (("k", False), ("q", True)):
        edited = make_model(name, torch.float64)
        _edit(edited, blocks[f"{attn}.{suffix}"], add_to_biases)
        moved = not torch.allclose(_attention_output(edited, name, attn), reference, atol=1e-10)
        assert moved == changes, suffix
    _edit(model, blocks[f"{attn}.v"], torch.Tensor.zero_)
    bias = model.get_submodule(out_proj).bias.detach()
    torch.testing.assert_close(_attention_output(model, name, attn), bias.expand_as(reference))


# --- naming variants -----------------------------------------------------------------------------------


class MyAttention(nn.Module):  # an attention module that only its class name reveals
    pass


class GatedMlp(nn.Module):
    pass


def _linear() -> nn.Module:
    return nn.Linear(4, 6)


VARIANTS = [
    # LLaMA (Meta), Mixtral
    ("layers.0.attention.wq", "query", 0),
    ("layers.0.attention.wk", "key", 0),
    ("layers.0.attention.wv", "value", 0),
    ("layers.0.attention.wo", "attn_out", 0),
    ("layers.0.feed_forward.w1", "ffn_in", 0),
    ("layers.0.feed_forward.w3", "ffn_in", 0),
    ("layers.0.feed_forward.w2", "ffn_out", 0),
    ("layers.1.block_sparse_moe.experts.3.w2", "ffn_out", 1),
    ("layers.0.self_attn.q_norm", "norm", 0),
    # diffusers / lucidrains
    ("blocks.2.attn1.to_q", "query", 2),
    ("blocks.2.attn1.to_k", "key", 2),
    ("blocks.2.attn1.to_v", "value", 2),
    ("blocks.2.attn1.to_out.0", "attn_out", 2),
    # DistilBERT
    ("transformer.layer.0.attention.q_lin", "query", 0),
    ("transformer.layer.0.attention.out_lin", "attn_out", 0),
    ("transformer.layer.0.ffn.lin1", "ffn_in", 0),
    ("transformer.layer.0.ffn.lin2", "ffn_out", 0),
    ("transformer.layer.0.sa_layer_norm", "norm", 0),
    # T5
    ("encoder.block.0.layer.0.SelfAttention.q", "query", 0),
    ("encoder.block.0.layer.0.SelfAttention.o", "attn_out", 0),
    ("encoder.block.0.layer.1.DenseReluDense.wi", "ffn_in", 0),
    ("encoder.block.0.layer.1.DenseReluDense.wo", "ffn_out", 0),
    ("encoder.final_layer_norm", "norm", None),
    # GPT-NeoX, GPT-J, MPT
    ("gpt_neox.embed_in", "embedding", None),
    ("gpt_neox.layers.0.attention.dense", "attn_out", 0),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h", "ffn_in", 0),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h", "ffn_out", 0),
    ("embed_out", "head", None),
    ("transformer.h.0.mlp.fc_in", "ffn_in", 0),
    ("transformer.blocks.0.ffn.up_proj", "ffn_in", 0),
    ("transformer.blocks.0.norm_1", "norm", 0),
    ("transformer.norm_f", "norm", None),
    # HF ViT and heads
    ("vit.embeddings.patch_embeddings.projection", "embedding", None),
    ("vit.encoder.layer.0.layernorm_before", "norm", 0),
    ("vit.encoder.layer.0.attention.attention.query", "query", 0),
    ("vit.encoder.layer.0.attention.output.dense", "attn_out", 0),
    ("vit.layernorm", "norm", None),
    ("score", "head", None),
    ("model.pooler.dense", "head", None),
    ("cls.predictions.transform.dense", "head", None),
    ("pre_classifier", "head", None),
    # LayerScale gains end their branch: counted with its output projection
    ("blocks.0.ls1", "attn_out", 0),
    ("blocks.0.ls2", "ffn_out", 0),
    ("blocks.0.gamma_1", "attn_out", 0),
    ("blocks.0.gamma_2", "ffn_out", 0),
    # relative-position bias tables, distillation heads, litgpt MLPs, RoBERTa's classifier
    ("layers.0.attn.relative_position_bias_table", "embedding", 0),
    ("head_dist", "head", None),
    ("transformer.h.0.mlp.fc", "ffn_in", 0),
    ("transformer.h.0.mlp.fc_1", "ffn_in", 0),
    ("transformer.h.0.mlp.fc_2", "ffn_in", 0),
    ("transformer.h.0.mlp.proj", "ffn_out", 0),
    ("classifier.out_proj", "head", None),
    ("classifier.dense", "head", None),
    ("layers.0.attn.q_bias", "query", 0),
    ("layers.0.attn.v_bias", "value", 0),
]


@pytest.mark.parametrize(("path", "kind", "layer"), VARIANTS)
def test_naming_variants(path, kind, layer):
    (block,) = _find(tree({path: _linear()}))
    assert (block.name, block.kind, block.layer) == (path, kind, layer)


@pytest.mark.parametrize(
    ("modules", "kind"),
    [
        ({"blocks.0.mixer": MyAttention(), "blocks.0.mixer.proj": _linear()}, "attn_out"),
        ({"blocks.0.channel": GatedMlp(), "blocks.0.channel.proj": _linear()}, "ffn_out"),
        ({"blocks.0.attn": MyAttention(), "blocks.0.attn.qk_scale": RMSNorm(4)}, "norm"),
        ({"shared": nn.Embedding(3, 4)}, "embedding"),
    ],
)
def test_class_names_resolve_ambiguous_names(modules, kind):
    (block,) = _find(tree(modules))
    assert block.kind == kind


def test_fused_key_value():
    blocks = _find(tree({"layers.0.cross.kv": nn.Linear(4, 8)}))
    assert _summary(blocks) == [("layers.0.cross.k", "key", 0), ("layers.0.cross.v", "value", 0)]
    assert _rows(blocks[1], "layers.0.cross.kv.weight") == (0, 4, 8)


# --- rules ---------------------------------------------------------------------------------------------


def _gqa_model() -> nn.Module:
    """A fused grouped-query projection: 16 query rows, 8 key rows, 8 value rows (32: not a 3-way split)."""
    return tree({"layers.0.attn.wqkv": nn.Linear(16, 32), "layers.0.attn.o_proj": nn.Linear(16, 16)})


def test_fused_projection_that_does_not_split_warns():
    with pytest.warns(UserWarning, match=r"layers\.0\.attn\.wqkv\.weight.*rules=") as record:
        blocks = find_blocks(_gqa_model())
    assert len(record) == 1
    assert _summary(blocks) == [("layers.0.attn.wqkv", "other", 0), ("layers.0.attn.o_proj", "attn_out", 0)]


def test_rule_with_unequal_fused_layout():
    blocks = _find(_gqa_model(), rules={r"attn\.wqkv": FusedLayout(sizes=(16, 8, 8))})
    assert _summary(blocks)[:3] == [
        ("layers.0.attn.q", "query", 0),
        ("layers.0.attn.k", "key", 0),
        ("layers.0.attn.v", "value", 0),
    ]
    rows = [(_rows(b, "layers.0.attn.wqkv.weight"), _rows(b, "layers.0.attn.wqkv.bias")) for b in blocks[:3]]
    assert rows == [((0, 0, 16), (0, 0, 16)), ((0, 16, 24), (0, 16, 24)), ((0, 24, 32), (0, 24, 32))]
    assert [b.numel for b in blocks[:3]] == [16 * 17, 8 * 17, 8 * 17]


def test_rule_with_column_layout_and_names():
    layout = FusedLayout(dim=1, names=("wq", "wk", "wv"))
    blocks = {b.name: b for b in _find(make_model("gpt2"), rules={r"attn\.c_attn": layout})}
    v = blocks["transformer.h.0.attn.wv"]
    assert v.kind == "value"
    assert _rows(v, "transformer.h.0.attn.c_attn.weight") == (1, 32, 48)
    assert _rows(v, "transformer.h.0.attn.c_attn.bias") == (0, 32, 48)


def test_rules_take_precedence_and_first_match_wins():
    rules = {r"mlp\.c_fc": "ffn_out", r"mlp": "other", r"c_fc": "head"}
    found = {b.name: b.kind for b in _find(make_model("nanogpt"), rules=rules)}
    assert found["transformer.h.0.mlp.c_fc"] == "ffn_out"
    assert found["transformer.h.1.mlp.c_proj"] == "other"
    assert found["transformer.h.1.attn.c_proj"] == "attn_out"


def test_rule_to_other_silences_the_warning():
    model = tree({"layers.0.attn.rel_pos": _linear(), "layers.0.attn.q": _linear()})
    blocks = _find(model, rules={"rel_pos": "other"})
    assert _summary(blocks) == [("layers.0.attn.rel_pos", "other", 0), ("layers.0.attn.q", "query", 0)]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"(": "query"}, "regular expression"),
        ({"attn": "attention"}, "unknown kind"),
        ({"attn": "model"}, "unknown kind"),
        ({"attn": 3}, "FusedLayout"),
    ],
)
def test_invalid_rules(rules, message):
    with pytest.raises(ValueError, match=message):
        find_blocks(make_model("vit"), rules=rules)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ("query", "keys")}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"kinds": "query"}, "sequence"),
        ({"sizes": (16, 8)}, "sizes"),
        ({"sizes": (16, 0, 8)}, "sizes"),
        ({"kinds": ("ffn_in", "ffn_in")}, "names"),
        ({"names": ("q", "k")}, "names"),
        ({"dim": -1}, "dim"),
    ],
)
def test_invalid_fused_layout(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedLayout(**kwargs)


def test_fused_layout_accepts_lists_and_repeated_kinds_with_names():
    layout = FusedLayout(["ffn_in", "ffn_in"], [3, 5], names=["gate", "up"])
    assert layout.sizes == (3, 5) and layout.suffixes == ("gate", "up")
    blocks = _find(tree({"layers.0.mlp.gate_up": nn.Linear(4, 8)}), rules={"gate_up": layout})
    assert _summary(blocks) == [("layers.0.mlp.gate", "ffn_in", 0), ("layers.0.mlp.up", "ffn_in", 0)]


def test_rule_layout_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="do not split"):
        find_blocks(_gqa_model(), rules={r"wqkv": FusedLayout(sizes=(16, 8, 4))})


def test_rule_giving_one_block_two_kinds_raises():
    with pytest.raises(ValueError, match="both"):
        find_blocks(make_model("vit"), rules={r"attn\.proj\.weight": "other"})


# --- the warning ---------------------------------------------------------------------------------------


def test_one_warning_lists_unrecognised_parameters():
    model = tree({"layers.0.attn.mystery": _linear(), "layers.0.mlp.fc1": _linear()})
    model.register_parameter("logit_scale", nn.Parameter(torch.ones(())))
    with pytest.warns(UserWarning) as record:
        blocks = find_blocks(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "logit_scale, layers.0.attn.mystery.weight, layers.0.attn.mystery.bias." in message
    assert "rules=" in message and "fc1" not in message
    assert _summary(blocks) == [
        ("logit_scale", "other", None),
        ("layers.0.attn.mystery", "other", 0),
        ("layers.0.mlp.fc1", "ffn_in", 0),
    ]


def test_warning_is_truncated_and_can_be_disabled():
    model = tree({f"stack.{i}.mystery": nn.Linear(2, 2, bias=False) for i in range(15)})
    with pytest.warns(
        UserWarning, match=r"15 trainable.*stack\.9\.mystery\.weight, \.\.\. \(5 more\)"
    ) as record:
        find_blocks(model)
    assert len(record) == 1 and "stack.10." not in str(record[0].message)
    assert len(_find(model, warn=False)) == 15


# --- small API pieces ----------------------------------------------------------------------------------


def test_block_part_numel_and_narrow():
    shape = torch.Size((6, 4))
    assert BlockPart("w").numel(shape) == 24
    assert BlockPart("w", 0, 2, 5).numel(shape) == 12
    assert BlockPart("w", 1, 1, 2).numel(shape) == 6
    t = torch.arange(24).reshape(shape)
    assert torch.equal(BlockPart("w", 1, 1, 3).narrow(t), t[:, 1:3])
    assert BlockPart("w").narrow(t) is t
