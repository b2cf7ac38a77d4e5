"""The nanoGPT-style model of ``examples/train_char_gpt.py`` at benchmark sizes, and a random batch.

Issue 12 measures the monitor on this model (vocab 65, sequences of 64 tokens, batch 8, d=128, 4 heads)
with 2 to 12 layers; the class is loaded from the example itself so that both stay the same model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

VOCAB, SEQ, BATCH = 65, 64, 8


def _example() -> object:
    path = Path(__file__).parents[1] / "examples" / "train_char_gpt.py"
    spec = importlib.util.spec_from_file_location("_train_char_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_EXAMPLE = _example()
loss_fn = _EXAMPLE.loss_fn  # next-character cross-entropy, returned with the logits


def char_gpt(
    layers: int, dim: int = 128, heads: int = 4, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The example's ``GPT`` (float32, eval mode) and a random batch of ``BATCH`` x ``SEQ`` tokens."""
    torch.manual_seed(seed)
    model = _EXAMPLE.GPT(VOCAB, SEQ, dim=dim, depth=layers, heads=heads).eval()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    return model, (tokens[:, :-1], tokens[:, 1:])
