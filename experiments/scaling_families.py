"""The two model families of the scaling experiment: the examples' digits ViT and character GPT, with data.

Each family builds its model at a given width and depth (4 heads; the examples' other settings), draws a
training subset of a given fraction for a seed, training batches from it, a fixed curvature batch that lies
in every training subset, and a held-out score. Subsets are nested per seed: the first ``fraction`` of one
random permutation (of the training images; of the training text's 256-character chunks), so the
curvature batch, drawn from the smallest subset, is a uniform sample of every larger one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
from sklearn.datasets import load_digits
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEADS = 4


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package) to reuse its model class and ``loss_fn``."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {EXAMPLES / name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count(fraction: float, total: int) -> int:
    return max(1, round(fraction * total))


class Family(Protocol):
    """What the experiment needs from a model family (see the two below)."""

    name: str
    title: str
    size_unit: str  # what ``size`` counts
    held_out_name: str

    def model(self, width: int, depth: int) -> nn.Module: ...
    def loss_fn(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]: ...
    def training_set(self, fraction: float, seed: int): ...
    def size(self, data) -> int: ...
    def training_batch(self, data, gen: torch.Generator): ...
    def curvature_batch(self, seed: int, fraction: float, size: int): ...
    def held_out(self, model: nn.Module) -> float: ...


class DigitsViT:
    """``ViT(patch=4, dim=width, depth=depth, heads=4)`` on scikit-learn's digits: a class token and four
    patch tokens; the example's split (1500 training, 297 held-out images); batches of 64."""

    name, title, size_unit, held_out_name = "vit", "digits ViT", "training images", "test accuracy"
    batch_size = 64

    def __init__(self) -> None:
        self.example = load_example("train_vit_digits")
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        self.train = images[order[:1500]], labels[order[:1500]]
        self.test = images[order[1500:]], labels[order[1500:]]

    def model(self, width: int, depth: int) -> nn.Module:
        return self.example.ViT(patch=4, dim=width, depth=depth, heads=HEADS)

    def loss_fn(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.example.loss_fn(model, batch)

    def _order(self, seed: int) -> torch.Tensor:
        return torch.randperm(len(self.train[0]), generator=torch.Generator().manual_seed(seed))

    def training_set(self, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self._order(seed)[: _count(fraction, len(self.train[0]))]
        return self.train[0][keep], self.train[1][keep]

    def size(self, data) -> int:
        return len(data[0])

    def training_batch(self, data, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(data[0]), (self.batch_size,), generator=gen)
        return data[0][idx], data[1][idx]

    def curvature_batch(self, seed: int, fraction: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        smallest = _count(fraction, len(self.train[0]))
        if size > smallest:
            raise ValueError(
                f"a curvature batch of {size} images does not fit in the smallest subset ({smallest})."
            )
        keep = self._order(seed)[:size]
        return self.train[0][keep], self.train[1][keep]

    def held_out(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(self.test[0]).argmax(-1) == self.test[1]).float().mean())


class CharGPT:
    """``GPT(vocab, context=32, dim=width, depth=depth, heads=4)`` on the sonnets: the example's 90/10 split
    of the text; the training text cut in 256-character chunks; batches of 16 windows of 33 characters."""

    name, title, size_unit, held_out_name = "gpt", "character GPT", "training tokens", "validation loss"
    context, chunk, batch_size = 32, 256, 16

    def __init__(self) -> None:
        self.example = load_example("train_char_gpt")
        text = self.example.TEXT.read_text(encoding="utf-8")
        chars = sorted(set(text))
        data = torch.tensor([chars.index(c) for c in text])
        split = int(0.9 * len(data))
        train = data[:split]
        self.vocab = len(chars)
        self.chunks = train[: len(train) // self.chunk * self.chunk].reshape(-1, self.chunk)
        val = data[split:]
        gen = torch.Generator().manual_seed(0)  # a fixed held-out set of 64 windows
        starts = torch.randint(len(val) - self.context - 1, (64,), generator=gen)
        windows = torch.stack([val[s : s + self.context + 1] for s in starts.tolist()])
        self.val = windows[:, :-1], windows[:, 1:]

    def model(self, width: int, depth: int) -> nn.Module:
        return self.example.GPT(self.vocab, self.context, dim=width, depth=depth, heads=HEADS)

    def loss_fn(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.example.loss_fn(model, batch)

    def _order(self, seed: int) -> torch.Tensor:
        return torch.randperm(len(self.chunks), generator=torch.Generator().manual_seed(seed))

    def training_set(self, fraction: float, seed: int) -> torch.Tensor:
        return self.chunks[self._order(seed)[: _count(fraction, len(self.chunks))]]

    def size(self, data) -> int:
        return data.numel()

    def _windows(
        self, chunks: torch.Tensor, count: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(chunks), (count,), generator=gen)
        starts = torch.randint(self.chunk - self.context, (count,), generator=gen)
        windows = torch.stack(
            [chunks[r, s : s + self.context + 1] for r, s in zip(rows.tolist(), starts.tolist())]
        )
        return windows[:, :-1], windows[:, 1:]

    def training_batch(self, data, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(data, self.batch_size, gen)

    def curvature_batch(self, seed: int, fraction: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        smallest = self.training_set(fraction, seed)
        return self._windows(smallest, size, torch.Generator().manual_seed(seed + 2))

    def held_out(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float(self.loss_fn(model, self.val)[0])


FAMILIES: dict[str, type] = {"vit": DigitsViT, "gpt": CharGPT}
