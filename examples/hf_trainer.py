"""Curvature tiers in a Hugging Face ``transformers.Trainer``: ``HessianTrainerCallback``.

A tiny LLaMA built from a config (random weights; 2 layers, grouped-query attention) learns Shakespeare's
sonnets character by character in a stock ``Trainer``. The callback measures the curvature tiers within a
time budget and writes them to TensorBoard next to the Trainer's own run, with the tags the Lightning
callback logs (needs ``transformers`` and ``accelerate``):

    python examples/hf_trainer.py              # 3000 steps at a 20% budget, ~45 s on 2 CPU cores
    python examples/hf_trainer.py --fast       # a few-second smoke run (used by the tests)
    tensorboard --logdir runs/hf_trainer/runs

Options: --steps, --budget, --output-dir, --fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

from lightning_hessian import tags
from lightning_hessian.huggingface import HessianTrainerCallback

TEXT = Path(__file__).parent / "data" / "sonnets.txt"


def windows(context: int, count: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """``count`` random windows of the sonnets as character ids (labels = inputs: the model shifts them),
    and the vocabulary size."""
    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    starts = torch.randint(len(ids) - context, (count,), generator=torch.Generator().manual_seed(seed))
    found = [{"input_ids": ids[s : s + context], "labels": ids[s : s + context]} for s in starts.tolist()]
    return found, len(chars)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--budget", type=float, default=0.2, help="curvature time / training time (0.2)")
    parser.add_argument("--output-dir", default="runs/hf_trainer", help="the Trainer's output_dir")
    parser.add_argument("--fast", action="store_true", help="smoke run: 200 steps at budget 0.5")
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.budget = 200, 0.5
    torch.set_num_threads(1)

    train, vocab = windows(context=32, count=8192, seed=0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    # The curvature batch: a fixed batch, made by the same collator, measured at every point.
    curvature_batch = default_data_collator(windows(context=32, count=16, seed=1)[0])
    callback = HessianTrainerCallback(curvature_batch, budget=args.budget)
    training = TrainingArguments(
        args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=args.steps // 10,
        logging_steps=25,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model, training, train_dataset=train, data_collator=default_data_collator, callbacks=[callback]
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    tracker, count = callback.tracker, len(callback.history)
    print(
        f"trained {args.steps} steps in {seconds:.0f} s; {count} curvature measurement(s) took "
        f"{tracker.planner.overhead:.1%} of the training time ({tracker.rotations} rotation(s) over the "
        "blocks)"
    )
    sharpness = [(step, s[tags.SHARPNESS]) for step, s in callback.history if tags.SHARPNESS in s]
    if sharpness:
        step, value = sharpness[-1]
        print(f"whole-model sharpness λ_max = {value:.4g} at step {step} ({tags.SHARPNESS})")
    runs = Path(args.output_dir) / "runs"
    print(f"\nTensorBoard logs in {callback.writer_dir}: tensorboard --logdir {runs}")


if __name__ == "__main__":
    main()
