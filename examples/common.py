"""What every example shares: clear errors for optional dependencies and a classifier with logged accuracy."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

EXTRA_OF_MODULE = {
    "mnist1d": "examples",
    "sklearn": "examples",
    "torchvision": "vision",
}
"""The ``lightning-layca`` extra that installs each optional module the examples use."""

PACKAGE_OF_MODULE = {"sklearn": "scikit-learn"}


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or fail with a message that says which extra installs it.

    Example:
        >>> require("torch", "the examples").__name__
        'torch'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top_level = module.partition(".")[0]
        extra = EXTRA_OF_MODULE.get(top_level)
        package = PACKAGE_OF_MODULE.get(top_level, top_level)
        how = f"pip install 'lightning-layca[{extra}]'" if extra else f"pip install {package}"
        raise ModuleNotFoundError(
            f"{purpose} needs the optional package {package!r}, which is not installed. Install it with: {how} "
            f"(from a checkout: pip install -e '.[{extra or package}]')."
        ) from error


class InMemoryDataModule(L.LightningDataModule):
    """A data module whose train and validation sets fit in memory; subclasses implement :meth:`load`.

    :meth:`setup` calls :meth:`load` once; the training loader shuffles with its own generator seeded by ``seed``,
    so the order of batches does not depend on anything else that draws random numbers.

    Args:
        batch_size: Batch size of the training loader (validation uses 512).
        seed: Seed of the training shuffle (and of whatever random split :meth:`load` makes).
        num_workers: Worker processes of the loaders.
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"{type(self).__name__}: `batch_size` must be a positive int, got {batch_size!r}.")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    def load(self) -> tuple[Dataset[Any], Dataset[Any]]:
        """Return the training and validation sets."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.load()

    def train_dataloader(self) -> DataLoader[Any]:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader.")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        if self.val_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader.")
        return DataLoader(
            self.val_set, batch_size=512, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )


class ClassifierModule(L.LightningModule):
    """A classifier around ``self.net``: cross-entropy loss, accuracy through torchmetrics, logged per epoch.

    The optimizer is not chosen here: LightningCLI's ``optimizer:`` and ``lr_scheduler:`` sections configure it, and
    ``LaycaCallback`` wraps whatever they built.

    Logged: ``train/loss`` (per step and epoch), ``train/acc``, ``val/loss`` and ``val/acc`` (per epoch).
    """

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)


POOL = "M"
"""In a :func:`conv_net` spec, a 2x max pooling (the VGG papers' notation)."""


def pool_every_second(channels: Sequence[int]) -> list[int | str]:
    """Return a :func:`conv_net` spec with a 2x max pooling after every second convolution.

    Example:
        >>> pool_every_second([16, 32, 32])
        [16, 32, 'M', 32]
    """
    if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in channels):
        raise ValueError(f"`channels` must be a non-empty list of positive ints, got {channels!r}.")
    spec: list[int | str] = []
    for i, c in enumerate(channels, start=1):
        spec.append(c)
        if i % 2 == 0:
            spec.append(POOL)
    return spec


def conv_net(spec: Sequence[int | str], dims: int, in_channels: int, num_classes: int) -> nn.Sequential:
    """A plain CNN in the paper's style: convolutions, global average pooling, one linear classifier.

    Every convolution is 3 wide, without bias, followed by batch norm without affine parameters and a ReLU; the
    classifier has no bias either. Every trainable parameter is then a layer's kernel, so the layers' rotation
    describes all of training. Modules are named ``conv1``, ``bn1``, ``relu1``, ``pool2``, ..., ``fc``, which makes
    readable TensorBoard tags (``net.conv1``).

    Args:
        spec: Output channels of each convolution, with ``"M"`` for a 2x max pooling.
        dims: 1 for signals ``(N, C, L)``, 2 for images ``(N, C, H, W)``.
        in_channels: Channels of the input.
        num_classes: Outputs of the classifier.

    Example:
        >>> conv_net([8, "M", 16], dims=2, in_channels=3, num_classes=10)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    if dims not in (1, 2):
        raise ValueError(f"conv_net: `dims` must be 1 or 2, got {dims!r}.")
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
    gap = nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d
    layers: list[tuple[str, nn.Module]] = []
    c_in, index = in_channels, 0
    for item in spec:
        if item == POOL:
            layers.append((f"pool{index}", pool(2)))
            continue
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise ValueError(f"conv_net: spec entries must be positive ints or {POOL!r}, got {item!r} in {spec!r}.")
        index += 1
        layers += [
            (f"conv{index}", conv(c_in, item, kernel_size=3, padding=1, bias=False)),
            (f"bn{index}", norm(item, affine=False)),
            (f"relu{index}", nn.ReLU(inplace=True)),
        ]
        c_in = item
    layers += [("gap", gap(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c_in, num_classes, bias=False))]
    return nn.Sequential(OrderedDict(layers))
