"""Small LightningModules, deterministic data and event-file readers shared by the callback tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

LAYER_PARAMS = ["features.0.weight", "features.3.weight", "head.weight"]
LAYERS = ["features.0", "features.3", "head"]
UNITS = {"features.0": 4, "features.3": 8, "head": 3}


def loader(n: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyCNN(L.LightningModule):
    """Conv(1->4) -> Linear(64->8) -> Linear(8->3): three layers of different kinds and depths."""

    def __init__(
        self, lr: float = 0.1, momentum: float = 0.9, scheduler: bool = False, inf_loss_batches: Iterable[int] = ()
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.lr = lr
        self.momentum = momentum
        self.scheduler = scheduler
        self.inf_loss_batches = set(inf_loss_batches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        if batch_idx in self.inf_loss_batches:
            loss = loss * float("inf")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class TwoOptimizerCNN(TinyCNN):
    """Manual optimization with one optimizer for the features and one for the head."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features_opt, head_opt = self.optimizers()
        loss = self.loss(batch)
        features_opt.zero_grad()
        head_opt.zero_grad()
        self.manual_backward(loss)
        features_opt.step()
        head_opt.step()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.features.parameters(), lr=self.lr, momentum=self.momentum),
            torch.optim.Adam(self.head.parameters(), lr=1e-2),
        ]


def make_trainer(root: Path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def layer_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {name.removesuffix(".weight"): params[name].detach().clone() for name in LAYER_PARAMS}


def cosine_distance_fp64(w: torch.Tensor, w0: torch.Tensor) -> float:
    """Independent reference: 1 - cos computed in float64 on the flattened tensors."""
    a, b = w.double().flatten(), w0.double().flatten()
    return float(1.0 - torch.dot(a, b) / (a.norm() * b.norm()))


def read_events(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events
