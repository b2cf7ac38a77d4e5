"""Train a small Vision Transformer on scikit-learn's digits with Lightning, and watch its curvature live.

The 8x8 digit images (real scans, shipped with scikit-learn: no download) are cut into four 4x4 patches,
so each image is a class token plus 4 patch tokens. A 2-layer ViT written below (fused ``qkv``
projection as in timm, pre-norm blocks) learns to classify them with AdamW, a learning rate warmed up to
a peak of 3e-2 (large enough to reach Adam's edge of stability) and decayed along a cosine.
``HessianMonitor`` measures the Hessian of the loss per block (query, key, value, attention output, norms,
MLP of every layer, embeddings, head) and for the whole model every ``--every-n-steps`` steps, and writes
TensorBoard dashboards:

    python examples/train_vit_digits.py                 # about 1.5-2 minutes on 2 CPU cores
    tensorboard --logdir runs/vit_digits                # then open http://localhost:6006

    python examples/train_vit_digits.py --fast          # a ~20 s smoke run (used by the tests)

Options: --max-steps, --every-n-steps, --lr, --logdir, --fast. See docs/dashboards.md for how to read the
charts.
"""

from __future__ import annotations

import argparse
import math
import shlex
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianMonitor, tags

# --- the model: a minimal ViT -------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection, as in timm's ViT."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [Q; K; V]: HessianMonitor splits them into 3 blocks
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()  # named fc1 / fc2 like timm's Mlp
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """8x8 image -> ``patch`` x ``patch`` patches -> [CLS] + patch tokens -> blocks -> head on [CLS]."""

    def __init__(self, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, p = images.shape[0], self.patch
        # (b, 8, 8) -> (b, rows, p, cols, p) -> (b, rows * cols, p * p): one token per patch
        patches = images.reshape(b, 8 // p, p, 8 // p, p).transpose(2, 3).reshape(b, -1, p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# --- the Lightning module -----------------------------------------------------------------------------


def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy, returned with the logits so that HessianMonitor can split off the Gauss-Newton part."""
    images, labels = batch
    logits = module(images)
    return F.cross_entropy(logits, labels), logits


class DigitsViT(L.LightningModule):
    def __init__(self, lr: float, max_steps: int, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ViT()
        self.warmup = max(1, max_steps // 8)  # steps of linear learning-rate warmup
        digits = load_digits()  # 1797 images, 8x8, grey levels 0..16
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        self.train_set = TensorDataset(images[order[:1500]], labels[order[:1500]])
        self.val_set = TensorDataset(images[order[1500:]], labels[order[1500:]])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        loss, logits = loss_fn(self, batch)
        self.log("train/loss", loss)
        self.log("train/acc", (logits.argmax(-1) == batch[1]).float().mean())
        return loss

    def validation_step(self, batch, batch_idx):
        loss, logits = loss_fn(self, batch)
        self.log("val/loss", loss)
        self.log("val/acc", (logits.argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        total, warmup = max(1, self.hparams.max_steps), self.warmup

        def schedule(step: int) -> float:  # linear warmup to the peak lr, then cosine decay to 10% of it
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=len(self.val_set))


def summary(monitor: HessianMonitor) -> str:
    """The curvature in a few lines: the closest approach to instability, then every block at the end."""
    history = monitor.history  # one PassRecord(step, scalars) per curvature pass
    if not history:
        return "no curvature pass ran"
    lines = [f"{monitor.passes} curvature passes; alerts fired: {monitor.alerts.counts}"]
    peak = max(history, key=lambda record: record.scalars.get(tags.PRECONDITIONED_RATIO, 0.0))
    s = peak.scalars
    if tags.PRECONDITIONED_RATIO in s:
        lines.append(
            f"closest to the edge of stability at step {peak.step} (lr {s[tags.LEARNING_RATE]:.3g}): Adam's "
            f"preconditioned sharpness {s[tags.PRECONDITIONED_SHARPNESS]:.4g} = "
            f"{s[tags.PRECONDITIONED_RATIO]:.2f} x its threshold; sharpness λ_max {s[tags.SHARPNESS]:.4g} = "
            f"{s[tags.SHARPNESS_RATIO]:.2f} x 2/lr"
        )
    last = history[-1].scalars
    lines.append(f"\nlast pass (step {history[-1].step}):")
    lines.append(f"  {'block':<20} {'λ_max':>9} {'λ_min':>10} {'trace':>9}")
    for tag, top in last.items():
        block, stat = tags.parse_block_tag(tag) or ("", "")
        if stat == "top_eigenvalue":
            low, trace = (last.get(tags.block_tag(block, x), math.nan) for x in ("min_eigenvalue", "trace"))
            lines.append(f"  {block.removeprefix('model.'):<20} {top:>9.3g} {low:>10.3g} {trace:>9.3g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps (default 600)")
    parser.add_argument("--every-n-steps", type=int, default=50, help="curvature pass every N steps (50)")
    parser.add_argument("--lr", type=float, default=3e-2, help="peak learning rate of AdamW (default 3e-2)")
    parser.add_argument("--logdir", default="runs/vit_digits", help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="smoke run (~20 s): 20 steps, one curvature pass")
    args = parser.parse_args(argv)
    if args.fast:
        args.max_steps, args.every_n_steps = 20, 0  # 0: only the pass at the end of training
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    L.seed_everything(0, verbose=False)
    module = DigitsViT(lr=args.lr, max_steps=args.max_steps)
    monitor = HessianMonitor(
        every_n_steps=args.every_n_steps,
        # Curvature changes fastest at the start; the warmup's last step has the peak learning rate.
        early_steps=[] if args.fast else [10, 25, module.warmup],
        loss_fn=loss_fn,  # returns (loss, logits): enables the Gauss-Newton / functional split
        split=True,
        trace=True,  # Hutch++ trace of every block
        density=True,  # spectral density of every block (stochastic Lanczos quadrature) ...
        density_probes=2,  # ... from 2 probes of 30 Lanczos steps: half the cost of the analyze() default
        density_steps=30,
    )  # curvature batch: the first training batch (64 digits), reused at every pass
    logger = TensorBoardLogger(args.logdir, name="", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        logger=logger,
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        val_check_interval=min(100, args.max_steps),  # validation accuracy every 100 steps
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start

    accuracy = trainer.validate(module, verbose=False)[0]["val/acc"]
    print(
        f"\ntrained {trainer.global_step} steps in {seconds:.0f} s; validation accuracy {accuracy:.1%} "
        f"on {len(module.val_set)} held-out digits\n"
    )
    print(summary(monitor))
    print(
        f"\nTensorBoard logs in {logger.log_dir}; open them with:\n\n"
        f"    tensorboard --logdir {shlex.quote(args.logdir)}\n"
    )


if __name__ == "__main__":
    main()
