"""Layca and layer-rotation monitoring under FSDP2: Lightning's ``ModelParallelStrategy``, ``fully_shard`` per block.

Two CPU processes over gloo, so that it runs anywhere; on a GPU machine use ``accelerator="gpu"`` and the number of
GPUs as ``devices``. Lightning starts one copy of this script per extra process, so run it as a script::

    python -m examples.fsdp2
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_layca as ll
from examples.cli import print_where_the_logs_are


class Block(nn.Module):
    """A residual MLP block: ``x + fc2(relu(fc1(norm(x))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class Classifier(L.LightningModule):
    def __init__(self, width: int = 64, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.width, self.depth, self.classes = width, depth, classes

        self.model: nn.Sequential | None = None

    def configure_model(self) -> None:
        if self.model is not None:  # called again by a later fit or test: already built and sharded
            return
        # Built here, on every process, then sharded: each process keeps a slice of the rows of every layer.
        blocks = [Block(self.width) for _ in range(self.depth)]
        self.model = nn.Sequential(nn.Linear(32, self.width), *blocks, nn.Linear(self.width, self.classes))
        mesh = self.device_mesh["data_parallel"]
        for block in blocks:
            fully_shard(block, mesh=mesh)  # one all-gather per block in forward and backward
        fully_shard(self.model, mesh=mesh)  # the rest (first and last layer) as one more unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Created after `configure_model`: the optimizer sees the sharded parameters (DTensors).
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(512, 32, generator=g), torch.randint(0, self.classes, (512,), generator=g))
        # Lightning gives each data-parallel rank its own part of the data (a DistributedSampler over the
        # data-parallel mesh); 32 is the batch per data-parallel rank.
        return DataLoader(data, batch_size=32, shuffle=True)


def main(max_steps: int = 32) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        log_every_n_steps=8,
        callbacks=[ll.LaycaCallback(rotation_rate=3**-3)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier())
    print_where_the_logs_are(trainer)  # as `make demo` does: the log folder, the figure, the TensorBoard command


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=32)
    main(parser.parse_args().max_steps)
