"""Handwritten digits (scikit-learn's bundled ``load_digits``, 8x8 images) with a small 2-D CNN.

The 1797 images ship with scikit-learn, so this example runs offline. Run it (from the repository root)::

    python -m examples.cli fit --config examples/configs/digits_layca.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from examples.common import ClassifierModule, InMemoryDataModule, conv_net, pool_every_second, require

NUM_CLASSES = 10


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's 8x8 digits as (1, 8, 8) float images in [0, 1], split at random (seeded) into train/validation.

    Args:
        val_fraction: Fraction of the 1797 images held out for validation.
        batch_size: Batch size of the training loader.
        seed: Seed of the split and of the training shuffle.
        limit: Use only ``limit`` images (drawn at random with ``seed``), for quick checks; ``None`` uses all.

    Example:
        >>> dm = DigitsDataModule(limit=100)
        >>> dm.setup("fit")
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape[1:])
        (1, 8, 8)
    """

    def __init__(
        self, val_fraction: float = 0.2, batch_size: int = 64, seed: int = 0, limit: int | None = None
    ) -> None:
        super().__init__(batch_size, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"DigitsDataModule: `val_fraction` must be in (0, 1), got {val_fraction!r}.")
        if limit is not None and limit < 2:
            raise ValueError(f"DigitsDataModule: `limit` must be None or at least 2, got {limit!r}.")
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.limit = limit

    def prepare_data(self) -> None:
        require("sklearn.datasets", "The digits example")

    def load(self) -> tuple[Dataset[Any], Dataset[Any]]:
        digits = require("sklearn.datasets", "The digits example").load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))[: self.limit]
        x, y = x[order], y[order]
        n_val = max(1, round(self.val_fraction * len(y)))
        return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])


class DigitsCNN(ClassifierModule):
    """A small 2-D CNN for 8x8 digits: 3x3 convolutions, 2x2 max pooling after every second one, a linear head.

    No biases, batch norm without affine parameters (as in the paper's models).

    Args:
        channels: Output channels of the convolutions.

    Example:
        >>> DigitsCNN()(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32)) -> None:
        super().__init__(conv_net(pool_every_second(channels), 2, 1, NUM_CLASSES), NUM_CLASSES)
        self.save_hyperparameters()
