"""Lightning helpers shared by the tests that train with a real Trainer: a tiny Transformer, ``fit``, and
readers of what a run logged.

The tiny model has dropout and BatchNorm, so a measurement that touched the RNG streams, the train/eval
flags or the running statistics would change its training: ``assert_same_training`` compares two runs
bitwise.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianMonitor

SEQ, VOCAB, D = 6, 13, 16


class TinyTransformer(L.LightningModule):
    """Tokens -> Transformer layer (with dropout) -> mean pool -> BatchNorm -> 3 classes."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2, return_dict: bool = False) -> None:
        super().__init__()
        self.optimizer, self.lr, self.return_dict = optimizer, lr, return_dict
        self.embed = nn.Embedding(VOCAB, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.1, batch_first=True)
        self.bn = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.layer(self.embed(tokens)).mean(1)))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits, labels)
        self.log("train_loss", loss)
        self.log_dict({"train_acc": (logits.argmax(-1) == labels).float().mean()})
        return {"loss": loss} if self.return_dict else loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.8, 0.99))

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(VOCAB, (96, SEQ), generator=g)
        labels = (tokens[:, 0] % 3).long()
        return DataLoader(TensorDataset(tokens, labels), batch_size=8, shuffle=True)


def fit(tmp_path: Path, callbacks=(), *, max_steps=8, logger="csv", accumulate=1, module=None, **kwargs):
    """Train ``module`` (a fresh :class:`TinyTransformer`) on CPU, seeded: ``(trainer, module)``.

    ``logger``: ``"csv"``, ``"tb"`` (TensorBoard) or a logger (``False`` for none).
    """
    L.seed_everything(0, verbose=False)
    module = module or TinyTransformer()
    if logger == "csv":
        logger = CSVLogger(tmp_path, name="csv")
    elif logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=logger,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        enable_model_summary=False,
        log_every_n_steps=1,
        **{"enable_checkpointing": False, "enable_progress_bar": False, **kwargs},
    )
    trainer.fit(module)
    return trainer, module


def pass_steps(monitor: HessianMonitor) -> list[int]:
    """The optimizer steps of the monitor's measurements."""
    return [record.step for record in monitor.history]


def logged_metrics(logger: CSVLogger, keys: tuple[str, ...]) -> list[dict[str, str]]:
    """The CSV rows that have any of ``keys``: ``step`` and those keys (empty string where missing)."""
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return [
            {k: row.get(k, "") for k in ("step", *keys)}
            for row in csv.DictReader(f)
            if any(row.get(k) for k in keys)
        ]


def assert_same_training(plain: tuple, watched: tuple) -> None:
    """Two ``fit`` results trained bitwise alike: weights, buffers, logged metrics, optimizer state."""
    (plain_trainer, plain_module), (watched_trainer, watched_module) = plain, watched
    for (name, a), (_, b) in zip(plain_module.state_dict().items(), watched_module.state_dict().items()):
        assert torch.equal(a, b), name
    keys = ("train_loss", "train_acc")
    assert logged_metrics(plain_trainer.logger, keys) == logged_metrics(watched_trainer.logger, keys)
    plain_opt = plain_trainer.optimizers[0].state_dict()
    watched_opt = watched_trainer.optimizers[0].state_dict()
    for index, state in plain_opt["state"].items():
        assert all(torch.equal(v, watched_opt["state"][index][k]) for k, v in state.items())
