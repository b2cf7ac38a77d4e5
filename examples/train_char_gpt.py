"""Train a tiny character-level GPT on Shakespeare's sonnets with Lightning, and watch its curvature live.

The model follows nanoGPT (Karpathy): token and position embeddings, pre-norm blocks with one fused
``c_attn`` projection and causal ``F.scaled_dot_product_attention``, a GELU MLP, and an ``lm_head`` tied to
the token embedding. The text is ``examples/data/sonnets.txt`` (public domain, kept in the repository: no
download). ``HessianMonitor`` measures the Hessian of the loss per block (query / key / value slices of
``c_attn``, ``c_proj``, norms, MLP, embeddings) and for the whole model within a time budget (5% of the
training time: the curvature along each update often, the whole model's sharpness less often, one layer's
blocks at a time), plus one full pass at the end, and writes TensorBoard dashboards and an HTML report; at
the end the model writes a few lines of "sonnet":

    python examples/train_char_gpt.py                   # about 1-2 minutes on 2 CPU cores
    tensorboard --logdir runs/char_gpt

    python examples/train_char_gpt.py --fast            # a ~20 s smoke run (used by the tests)

Options: --max-steps, --budget, --lr, --logdir, --fast.
"""

from __future__ import annotations

import argparse
import math
import shlex
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_hessian import HessianMonitor, tags

TEXT = Path(__file__).parent / "data" / "sonnets.txt"

# --- the model: nanoGPT in miniature ------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)  # fused [Q; K; V]: HessianMonitor splits it into 3 blocks
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, dim),
                wpe=nn.Embedding(context, dim),
                h=nn.ModuleList([Block(dim, heads) for _ in range(depth)]),
                ln_f=nn.LayerNorm(dim),
            )
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one parameter, one block

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # logits (batch, time, vocab)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 0.8) -> torch.Tensor:
        for _ in range(new_tokens):
            logits = self(idx[:, -self.context :])[:, -1] / temperature
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx


# --- data and the Lightning module --------------------------------------------------------------------


class Chunks(Dataset):
    """Random windows of ``context + 1`` characters: the first ``context`` as input, the last as target."""

    def __init__(self, data: torch.Tensor, context: int, length: int) -> None:
        self.data, self.context, self.length = data, context, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(torch.randint(len(self.data) - self.context - 1, ()))
        chunk = self.data[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]


def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-character cross-entropy, returned with the logits for the Gauss-Newton / functional split."""
    idx, targets = batch
    logits = module(idx)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits


class CharGPT(L.LightningModule):
    def __init__(self, lr: float, max_steps: int, context: int = 32, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        text = TEXT.read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.stoi[c] for c in text])
        split = int(0.9 * len(data))  # the last 10% of the text (the last sonnets) for validation
        self.train_data, self.val_data = data[:split], data[split:]
        self.model = GPT(len(self.chars), context)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        loss, _ = loss_fn(self, batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _ = loss_fn(self, batch)
        self.log("val/loss", loss)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=(0.9, 0.99), weight_decay=0.1)
        warmup, total = max(1, hp.max_steps // 10), max(1, hp.max_steps)

        def schedule(step: int) -> float:  # linear warmup, then cosine decay to 10%
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        hp = self.hparams
        return DataLoader(Chunks(self.train_data, hp.context, hp.max_steps * hp.batch_size), hp.batch_size)

    def val_dataloader(self):
        return DataLoader(Chunks(self.val_data, self.hparams.context, 256), batch_size=64)

    def sample(self, prompt: str, new_tokens: int) -> str:
        idx = torch.tensor([[self.stoi[c] for c in prompt]])
        return "".join(self.chars[i] for i in self.model.generate(idx, new_tokens)[0].tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=2000, help="optimizer steps (default 2000)")
    parser.add_argument("--budget", type=float, default=0.05, help="monitor time / training time (0.05)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of AdamW (default 1e-2)")
    parser.add_argument("--logdir", default="runs/char_gpt", help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="smoke run (~20 s): 20 steps, one curvature pass")
    args = parser.parse_args(argv)
    if args.fast:
        args.max_steps = 20  # too short for the budget's tiers: the pass at the end of training
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    L.seed_everything(0, verbose=False)
    module = CharGPT(lr=args.lr, max_steps=args.max_steps)
    monitor = HessianMonitor(
        budget=args.budget,
        at_end=True,  # and one full pass at the end, with the split and the densities:
        loss_fn=loss_fn,  # returns (loss, logits): enables the Gauss-Newton / functional split
        split=True,
        density=True,  # spectral densities from 2 probes of 30 Lanczos steps per block
        density_probes=2,
        density_steps=30,
    )  # curvature batch: the first training batch (16 windows of 32 characters), reused at every pass
    logger = TensorBoardLogger(args.logdir, name="", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        logger=logger,
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        val_check_interval=min(250, args.max_steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start

    val_loss = trainer.validate(module, verbose=False)[0]["val/loss"]
    print(
        f"\ntrained {trainer.global_step} steps in {seconds:.0f} s ({monitor.passes} curvature measurements, "
        f"{monitor.tracker.planner.overhead:.1%} of the training time); "
        f"validation loss {val_loss:.3f} nats/char"
    )
    last = monitor.history[-1].scalars if monitor.history else {}
    if tags.SHARPNESS in last:
        print(
            f"sharpness λ_max {last[tags.SHARPNESS]:.4g} vs 2/lr = {last[tags.THRESHOLD]:.4g}; "
            f"alerts fired: {monitor.alerts.counts}"
        )
    torch.manual_seed(0)
    print("\nsample:\n" + module.sample("Shall I ", 200))
    print(
        f"\nTensorBoard logs in {logger.log_dir}; open them with:\n\n"
        f"    tensorboard --logdir {shlex.quote(args.logdir)}\n"
    )


if __name__ == "__main__":
    main()
