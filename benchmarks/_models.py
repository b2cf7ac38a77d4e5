"""Models and batches shared by the benchmarks (no downloads).

``Classifier`` is the DESIGN.md reference model of ``bench_operators.py`` (the same definition): an
embedding, an ``nn.TransformerEncoder`` (dropout 0, batch first, no nested tensors) and a linear head on
the mean token. ``SPECS`` names the three sizes that ``compare_peers.py`` uses:

* ``reference``: d=64, 4 heads, FFN 256, 2 layers, sequences of 32 tokens, batch 16, float32;
* ``deep``: the same with 6 layers (scaling with depth);
* ``tiny``: d=16, 2 heads, FFN 32, 2 layers, sequences of 8, batch 16, float64, a few thousand
  parameters: small enough for the dense Hessian, so estimates there are checked against exact values.

The loss is a mean cross-entropy, written both as ``loss_fn(model, batch)`` (lightning_hessian and
hessian-eigenthings) and as ``criterion(outputs, targets)`` / an ``nn.CrossEntropyLoss`` module
(PyHessian and curvlinops): the same function for every tool.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    def __init__(
        self,
        d: int = 64,
        heads: int = 4,
        layers: int = 2,
        vocab: int = 50,
        classes: int = 10,
        ffn: int | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d if ffn is None else ffn, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def reference_batch(
    batch_size: int = 16, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch for ``Classifier()``: ``batch_size`` sequences of 32 tokens and their labels (draws
    from torch's global generator: seed it first)."""
    return (
        torch.randint(0, 50, (batch_size, 32), device=device),
        torch.randint(0, 10, (batch_size,), device=device),
    )


def publish(text: str, out: Path) -> None:
    """Print a benchmark's Markdown result and write it to ``out`` (creating its folder)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``loss_fn(model, batch)``: mean cross-entropy of the model's logits."""
    tokens, labels = batch
    return F.cross_entropy(model(tokens), labels)


def one_optimizer_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` after one AdamW step (lr 1e-3) on ``batch``: the weights of the next pass."""
    stepped = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(stepped.parameters(), lr=1e-3)
    loss_fn(stepped, batch).backward()
    optimizer.step()
    stepped.zero_grad(set_to_none=True)
    return stepped.eval()


@dataclass(frozen=True)
class ModelSpec:
    """A model size, its batch and its dtype."""

    name: str
    d: int
    heads: int
    layers: int
    ffn: int
    vocab: int
    classes: int
    seq: int
    batch: int
    dtype: torch.dtype

    def build(self, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """The model (eval mode, in ``dtype``) and one batch, both from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # parameter initialisation draws from the global stream
        try:
            model = Classifier(self.d, self.heads, self.layers, self.vocab, self.classes, self.ffn)
        finally:
            torch.random.set_rng_state(state)
        model = model.to(self.dtype).eval()
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq), generator=gen)
        labels = torch.randint(0, self.classes, (self.batch,), generator=gen)
        return model, (tokens, labels)

    def describe(self, model: nn.Module) -> str:
        params = sum(p.numel() for p in model.parameters())
        return (
            f"{self.name}: {self.layers}-layer encoder, d={self.d}, {self.heads} heads, FFN {self.ffn}, "
            f"{params} parameters, batch {self.batch} x {self.seq} tokens, {str(self.dtype).split('.')[-1]}"
        )


SPECS = {
    "reference": ModelSpec("reference", 64, 4, 2, 256, 50, 10, 32, 16, torch.float32),
    "deep": ModelSpec("deep", 64, 4, 6, 256, 50, 10, 32, 16, torch.float32),
    "tiny": ModelSpec("tiny", 16, 2, 2, 32, 16, 4, 8, 16, torch.float64),
}
