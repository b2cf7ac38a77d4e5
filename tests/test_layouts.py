"""Layouts read off the attention computation: exact blocks on interleaved models, in every operator path.

The zoo (``tests/_zoo.py``, ``tests/test_zoo.py``) checks the inferred layouts of 23 real implementations
entry by entry; this file checks what the blocks are used for (eigenvalues against dense float64
references, chunking, warm starts), what happens without an example, and that inference leaves the model
alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _dense import dense_hessian
from _models import tree
from _zoo import VOCAB, ZOO
from torch import nn

from lightning_hessian import Block, BlockPart, analyze, describe_blocks, find_blocks
from lightning_hessian.blocks import check_blocks
from lightning_hessian.layouts import infer_layouts

QKV = ("query", "key", "value")


def _entry(name: str):
    entry = next(e for e in ZOO if e.name == name)
    if entry.needs is not None:
        pytest.importorskip(entry.needs)
    return entry.build()


def _lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, targets = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def _lm_batch(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return tokens, torch.randint(0, VOCAB, tokens.shape, generator=gen)


def _eigenvalues(model, block, batch):
    return torch.linalg.eigvalsh(dense_hessian(model, _lm_loss, batch, block))


def test_group_interleaved_blocks_match_dense_float64():
    """Per-group interleaved [k, q, q, v] rows: each block's eigenvalues equal the dense Hessian's."""
    model, tokens = _entry("custom_group_interleaved_kqqv_bmm")
    batch = _lm_batch(tokens)
    blocks = [b for b in find_blocks(model, example=batch, loss_fn=_lm_loss) if b.kind in QKV]
    assert [b.kind for b in blocks if b.layer == 0] == ["key", "query", "value"]  # in row order
    assert all(b.found_by == "inferred" and len(b.parts[0].runs) == 2 for b in blocks)  # one run per group
    report = analyze(model, _lm_loss, batch, blocks=blocks, trace=False, tol=1e-9, max_iter=300)
    chunked = analyze(
        model, _lm_loss, batch, blocks=blocks, trace=False, tol=1e-9, max_iter=300, chunk_size=1
    )
    for block in blocks:
        exact = _eigenvalues(model, block, batch)
        for measured in (report.blocks[block.name], chunked.blocks[block.name]):
            assert measured.top_eigenvalues[0] == pytest.approx(exact[-1].item(), rel=1e-6)
            assert measured.min_eigenvalue == pytest.approx(exact[0].item(), rel=1e-6)


def test_analyze_reads_the_layout_from_its_batch_and_warm_starts_on_it():
    """analyze(blocks="auto") infers the layout of a fused GQA projection from the batch it measures."""
    model, example = _entry("hf_phi3_gqa_eager")

    def loss_fn(m, batch):
        return m(**batch).logits.pow(2).mean()

    report = analyze(model, loss_fn, example, trace=False, smallest=False, tol=1e-3)
    sizes = {name: b.numel for name, b in report.blocks.items() if b.kind in QKV and b.layer == 0}
    assert sizes == {
        "model.layers.0.self_attn.q": 32 * 32,
        "model.layers.0.self_attn.k": 16 * 32,
        "model.layers.0.self_attn.v": 16 * 32,
    }
    again = analyze(model, loss_fn, example, trace=False, smallest=False, tol=1e-3, init=report)
    assert again.matvecs < report.matvecs  # the warm start fits the same blocks


def test_a_block_with_several_slices_of_one_parameter_is_exact():
    """Rows 0:4 and 8:12 of one weight as two parts of one block (the eigenvalues were 4x too large)."""
    model, tokens = _entry("custom_odd_names_abc_eager")
    batch = _lm_batch(tokens)
    name = "layers.0.mix.a.weight"
    block = Block("a_slices", "query", 0, 8 * 24, (BlockPart(name, 0, 0, 4), BlockPart(name, 0, 8, 12)))
    assert block.masks(model)[name].sum() == 8 * 24  # both slices, not the last one only
    report = analyze(model, _lm_loss, batch, blocks=[block], trace=False, tol=1e-10, max_iter=200)
    exact = _eigenvalues(model, block, batch)
    assert report.blocks["a_slices"].top_eigenvalues[0] == pytest.approx(exact[-1].item(), rel=1e-6)
    assert report.blocks["a_slices"].min_eigenvalue == pytest.approx(exact[0].item(), rel=1e-6)


def test_blocks_that_claim_the_same_entry_are_refused():
    model, tokens = _entry("custom_odd_names_abc_eager")
    name = "layers.0.mix.a.weight"
    first = Block("first", "query", 0, 4 * 24, (BlockPart(name, 0, 0, 4),))
    second = Block("second", "query", 0, 4 * 24, (BlockPart(name, 0, runs=((2, 3), (10, 13))),))
    with pytest.raises(ValueError, match=r"'first' and 'second' both claim entries of 'layers\.0\.mix\.a"):
        analyze(model, _lm_loss, _lm_batch(tokens), blocks=[first, second])
    twice = Block("twice", "query", 0, 8 * 24, (BlockPart(name, 0, 0, 4), BlockPart(name, 0, 3, 7)))
    with pytest.raises(ValueError, match="both claim"):
        check_blocks([twice], model)
    outside = Block("outside", "query", 0, 4 * 24, (BlockPart(name, 0, 14, 18),))
    with pytest.raises(ValueError, match="does not fit"):
        check_blocks([outside], model)


def test_block_part_runs_select_and_assign():
    part = BlockPart.along("w", 0, [7, 0, 1, 4, 5, 6])
    assert part.runs == ((0, 2), (4, 8)) and (part.start, part.stop) == (0, 8)
    assert part.indices == [0, 1, 4, 5, 6, 7] and part.numel(torch.Size([9, 3])) == 18
    w = torch.arange(27.0).reshape(9, 3)
    assert torch.equal(part.select(w), w[[0, 1, 4, 5, 6, 7]])
    batched = torch.zeros(2, 9, 3)
    part.assign(batched, torch.ones(2, 6, 3), leading=1)
    assert batched.sum() == 36 and batched[:, [2, 3, 8]].sum() == 0
    assert BlockPart("w", 1, 2, 5).describe() == "w[cols 2:5]"
    assert BlockPart("w", 0, runs=((0, 1), (2, 3))) == BlockPart.along("w", 0, [2, 0])
    with pytest.raises(ValueError, match="sorted and disjoint"):
        BlockPart("w", 0, runs=((4, 6), (0, 2)))


def test_without_an_example_a_fused_split_is_made_only_where_the_shape_proves_it():
    """GPT-2's self-attention c_attn (3 x width) is split by name; its cross-attention [K | V] is not."""
    model, _ = _entry("hf_gpt2_cross_sdpa")
    with pytest.warns(
        UserWarning,
        match=r"h\.0\.crossattention\.c_attn\.weight \(a fused projection left "
        r"unsplit: its weight \(32, 64\) is not 3 square pieces",
    ):
        blocks = {b.name: b for b in find_blocks(model)}
    assert blocks["transformer.h.0.attn.q"].found_by == "name"
    assert blocks["transformer.h.0.crossattention.c_attn"].kind == "other"
    model, _ = _entry("hf_phi3_gqa_eager")
    with pytest.warns(UserWarning, match=r"qkv_proj\.weight \(a fused projection left unsplit"):
        kinds = {b.name: b.kind for b in find_blocks(model)}
    assert kinds["model.layers.0.self_attn.qkv_proj"] == "other"


def test_a_fused_projection_with_equal_sizes_but_fewer_kv_heads_is_not_split_by_name():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.num_key_value_heads = 4, 2
            self.qkv = nn.Linear(8, 24)

    model = nn.Module()
    model.attn = Attention()
    with pytest.warns(UserWarning, match="4 query heads but 2 key/value heads"):
        (block,) = find_blocks(model)
    assert block.kind == "other"


def test_describe_blocks_shows_how_each_layout_was_found():
    model, example = _entry("hf_gpt_neox_sdpa")
    text = describe_blocks(find_blocks(model, example=example))
    header, rule, *rows = text.splitlines()
    assert header.split() == ["block", "kind", "layer", "params", "found", "by", "parts"]
    assert set(rule) == {"-"}
    q = next(r for r in rows if r.startswith("gpt_neox.layers.0.attention.q "))
    assert q.split()[1:5] == ["query", "0", "1056", "inferred"]
    assert "query_key_value.weight[rows 0:8, 24:32, 48:56, 72:80]" in q
    assert any(r.split()[1:5] == ["norm", "0", "64", "name"] for r in rows)


def test_inference_leaves_the_model_its_rng_and_its_flags_alone():
    """A forward that renormalises an embedding in place (max_norm) still leaves the weights bitwise."""
    model, tokens = _entry("custom_odd_names_abc_eager")
    model.embed = nn.Embedding(VOCAB, 24, max_norm=0.5).double()
    with torch.no_grad():
        model.embed.weight.mul_(10)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    layouts = infer_layouts(model, lambda m: m(tokens))
    assert {c.module for c in layouts.calls} == {"layers.0.mix", "layers.1.mix"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and model.training


def test_cross_attention_and_layers_in_an_encoder_decoder():
    model, example = _entry("hf_t5_eager")
    layouts = infer_layouts(model, lambda m: m(**example))
    kinds = {c.module.rsplit(".", 1)[-1]: c.self_attention for c in layouts.calls}
    assert kinds == {"SelfAttention": True, "EncDecAttention": False}
    layers = {b.name: b.layer for b in find_blocks(model, example=example)}
    assert layers["encoder.block.1.layer.0.SelfAttention.q"] == 1
    assert layers["decoder.block.1.layer.1.EncDecAttention.k"] == 1  # the decoder layer, not sub-layer 1
    assert layers["decoder.block.1.layer.2.DenseReluDense.wi"] == 1
    assert layers["shared"] is None


def _layers(paths: list[str]) -> dict[str, int | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {b.name: b.layer for b in find_blocks(tree({p: nn.Linear(4, 4) for p in paths}))}


def test_layers_count_transformer_blocks_not_stages_or_sub_layers():
    swin = _layers(
        [
            f"layers.{s}.blocks.{b}.{m}"
            for s, n in ((0, 2), (1, 2))
            for b in range(n)
            for m in ("attn.q", "attn.k", "mlp.fc1")
        ]
    )
    assert [swin[f"layers.{s}.blocks.{b}.attn.q"] for s in (0, 1) for b in (0, 1)] == [0, 1, 2, 3]
    assert swin["layers.1.blocks.0.mlp.fc1"] == 2
    # x-transformers: attention and feed-forward are alternate elements of one list
    xt = _layers(
        [
            p
            for i in (0, 2, 4)
            for p in (f"layers.{i}.1.to_q", f"layers.{i}.1.to_k", f"layers.{i + 1}.1.ff.w1")
        ]
    )
    assert [xt[f"layers.{i}.1.to_q"] for i in (0, 2, 4)] == [0, 1, 2]
    assert [xt[f"layers.{i}.1.ff.w1"] for i in (1, 3, 5)] == [0, 1, 2]
    # a hybrid: attention in some layers, another mixer in the others; each keeps its own index
    hybrid = _layers(["layers.0.mixer.x_proj", "layers.1.self_attn.q_proj", "layers.2.mixer.x_proj"])
    assert list(hybrid.values()) == [0, 1, 2]


def test_kinds_of_sequential_mlps_norm_gains_and_heads():
    model = tree(
        {
            "blocks.0.attn.q": nn.Linear(4, 4),
            "blocks.0.norm": nn.Module(),
            "blocks.0.mlp": nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)),
        }
    )
    norm = model.get_submodule("blocks.0.norm")
    norm.inner = nn.Identity()  # a norm module with a child holds its gain directly
    norm.gamma = nn.Parameter(torch.ones(4))
    kinds = {b.name: b.kind for b in find_blocks(model)}
    assert kinds == {
        "blocks.0.attn.q": "query",
        "blocks.0.norm.gamma": "norm",
        "blocks.0.mlp.0": "ffn_in",
        "blocks.0.mlp.2": "ffn_out",
    }


def test_interleaved_blocks_through_the_process_reduction():
    """The DDP path (products summed over processes) on interleaved blocks: two equal processes."""
    model, tokens = _entry("hf_gpt_neox_sdpa")
    batch = {"input_ids": tokens["input_ids"]}

    def loss_fn(m, b):
        return m(**b).logits.pow(2).mean()

    settings = dict(trace=False, smallest=False, tol=1e-8, max_iter=200)
    alone = analyze(model, loss_fn, batch, **settings)
    doubled = analyze(model, loss_fn, batch, reduce=lambda t: 2 * t, **settings)
    for name in ("gpt_neox.layers.0.attention.q", "gpt_neox.layers.1.attention.v"):
        assert alone.blocks[name].numel == 1056
        assert doubled.blocks[name].top_eigenvalues[0] == pytest.approx(
            alone.blocks[name].top_eigenvalues[0], rel=1e-6
        )


def test_a_failing_layout_probe_falls_back_to_names_with_a_warning():
    """The probe's failure is reported when the pass itself works (it is then the probe's fault)."""
    model, tokens = _entry("hf_gpt_neox_sdpa")
    calls = []

    def flaky(m, batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("only the first call fails")
        return m(**batch).logits.pow(2).mean()

    with pytest.warns(UserWarning, match=r"layouts off the attention failed \(RuntimeError: only the first"):
        report = analyze(model, flaky, tokens, trace=False, smallest=False, max_iter=3)
    assert "gpt_neox.layers.0.attention.query_key_value" in report.blocks  # names only: left whole
    again = analyze(model, flaky, tokens, trace=False, smallest=False, max_iter=3)  # the probe works now
    assert "gpt_neox.layers.0.attention.q" in again.blocks
