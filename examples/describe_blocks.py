"""How ``find_blocks`` splits real Hugging Face models: layouts read off the attention, or refused by name.

Builds two tiny models from their configs (random weights, no download): Phi-3 with grouped-query attention
(one fused ``qkv_proj``, query 32 rows, key and value 8 rows each) and GPT-NeoX (``query_key_value`` rows
interleaved per head), and prints their first layer's blocks twice: with an example input, where the
query / key / value entries are read off the attention computation, and without one, where a fused
projection whose shape does not prove an equal split is left whole with a warning. Needs ``transformers``:

    pip install transformers && python examples/describe_blocks.py
"""

from __future__ import annotations

import warnings

import torch
import transformers

from lightning_hessian import describe_blocks, find_blocks

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SIZES.update(max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def first_layer(blocks):
    return [b for b in blocks if b.layer == 0]


def main() -> None:
    torch.manual_seed(0)
    models = {
        "Phi-3, 4 query heads, 1 key/value head": transformers.Phi3ForCausalLM(
            transformers.Phi3Config(num_key_value_heads=1, attn_implementation="eager", **SIZES)
        ),
        "GPT-NeoX, 4 heads": transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(attn_implementation="sdpa", **SIZES)
        ),
    }
    example = {"input_ids": torch.randint(0, 64, (2, 8))}
    for title, model in models.items():
        print(f"== {title}: find_blocks(model, example=...)\n")
        print(describe_blocks(first_layer(find_blocks(model.eval(), example=example))))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            named = first_layer(find_blocks(model))
        print(f"\n== {title}: find_blocks(model), names only\n")
        print(describe_blocks(named))
        for warning in caught:
            print(f"\nwarning: {str(warning.message)[:160]}...")
        print()


if __name__ == "__main__":
    main()
