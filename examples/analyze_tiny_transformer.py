"""Per-block curvature of a small Transformer trained on scikit-learn's digits (real images, no download).

Each 8x8 digit becomes a sequence of 8 tokens (its rows); a 2-layer ``nn.TransformerEncoder`` classifies it.
The script trains for a few hundred steps, then prints the Hessian of the loss per parameter block
(query / key / value / attention output / norms / FFN per layer) and for the whole model:

    python examples/analyze_tiny_transformer.py [--steps 300] [--float64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_hessian import analyze, compare_attention


class DigitTransformer(nn.Module):
    """Rows of an 8x8 image as tokens -> Transformer encoder -> mean pool -> 10 classes."""

    def __init__(self, d_model: int = 32, nhead: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, 2 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy, returned with the logits so the Gauss-Newton split can be computed."""
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels), logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps before the analysis")
    parser.add_argument("--float64", action="store_true", help="compute the curvature in float64")
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    labels = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = images[:1500], labels[:1500], images[1500:], labels[1500:]

    model = DigitTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(0, len(train_x), (64,))
        loss, _ = loss_fn(model, (train_x[index], train_y[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    print(
        f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s; test accuracy {accuracy:.1%}\n"
    )

    batch = (train_x[:128], train_y[:128])
    report = analyze(
        model, loss_fn, batch, full=True, split=True, dtype=torch.float64 if args.float64 else None
    )
    print(report.table())
    attention = {
        kind: [b.top_eigenvalue for b in report.blocks.values() if b.kind == kind]
        for kind in ("query", "key", "value")
    }
    print("\nTop eigenvalue per layer:", {k: [f"{v:.3g}" for v in vs] for k, vs in attention.items()})

    # The papers' single-layer theory on this model's own attention layers (docs/theory.md): Jacobian norms
    # per head and the corrected bounds; here a normaliser (cross-entropy through a deeper model).
    print("\nTheory vs measured:\n" + compare_attention(model, loss_fn, batch, report).table())


if __name__ == "__main__":
    main()
