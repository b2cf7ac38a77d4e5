"""Curvature tiers in your own training loop: plain PyTorch, or Lightning Fabric, no Trainer.

The same tiny character GPT as ``train_char_gpt.py`` (nanoGPT: fused ``c_attn``, causal SDPA, tied
``lm_head``) on Shakespeare's sonnets, trained by a hand-written loop. ``CurvatureTracker`` plans the
curvature measurements within a time budget: call ``before_step`` after the backward pass and
``after_step`` after the optimiser step; what it returns goes to TensorBoard with the same tags the
Lightning callback logs:

    python examples/plain_loop.py                 # plain PyTorch, about a minute on 2 CPU cores
    python examples/plain_loop.py --fabric        # the same loop through lightning.fabric.Fabric
    python examples/plain_loop.py --fast          # a few-second smoke run (used by the tests)
    tensorboard --logdir runs/plain_loop

Options: --steps, --budget, --logdir, --fabric, --fast.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from train_char_gpt import GPT, TEXT, loss_fn

from lightning_hessian import CurvatureTracker, tags


def batches(data: torch.Tensor, context: int, batch_size: int, seed: int):
    """Endless random windows of the text: (inputs, next characters)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(data) - context - 1, (batch_size,), generator=g)
        chunks = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        yield chunks[:, :-1], chunks[:, 1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--budget", type=float, default=0.05, help="curvature time / training time (0.05)")
    parser.add_argument("--logdir", default="runs/plain_loop", help="TensorBoard log directory")
    parser.add_argument("--fabric", action="store_true", help="run the loop through Lightning Fabric")
    parser.add_argument("--fast", action="store_true", help="smoke run: 300 steps at budget 0.5")
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.budget = 300, 0.5
    torch.set_num_threads(1)
    torch.manual_seed(0)

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    model = GPT(len(chars), context=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    if args.fabric:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1)
        model, optimizer = fabric.setup(model, optimizer)
        backward, measured = fabric.backward, model.module  # curvature of the module Fabric wraps
    else:
        backward, measured = (lambda loss: loss.backward()), model

    stream = batches(data, 32, 16, seed=0)
    curvature_batch = next(batches(data, 32, 16, seed=1))  # the same batch at every measurement
    tracker = CurvatureTracker(budget=args.budget)
    writer = SummaryWriter(args.logdir)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, _ = loss_fn(model, next(stream))
        backward(loss)
        tracker.before_step(measured)  # plans; keeps the weights if the update will be measured
        optimizer.step()
        optimizer.zero_grad()
        found = tracker.after_step(measured, loss_fn, curvature_batch, optimizer)
        if found is not None:
            for tag, value in found.scalars.items():
                writer.add_scalar(tag, value, step)
        if step % 100 == 0:
            writer.add_scalar("train/loss", loss.item(), step)
    writer.close()

    seconds = time.perf_counter() - start
    print(
        f"trained {args.steps} steps in {seconds:.0f} s; curvature took {tracker.planner.overhead:.1%} of "
        f"the training time ({tracker.rotations} rotation(s) over the blocks)"
    )
    full = tracker.latest.full
    if full is not None:
        print(f"latest whole-model sharpness λ_max = {full.top_eigenvalue:.4g} ({tags.SHARPNESS})")
    print(f"\nTensorBoard logs in {args.logdir}: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
