"""MNIST-1D classification with a small 1-D CNN: the demo's default example.

MNIST-1D (Greydanus, 2020) is generated on the fly by the ``mnist1d`` package (no download): 1-D signals of length 40
made from ten digit templates, padded, shifted, scaled, sheared and noised. The network follows the paper's models:
convolutions without biases, batch normalisation without affine parameters, one linear classifier.

Run it (from the repository root)::

    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from examples.common import ClassifierModule, InMemoryDataModule, conv_net, pool_every_second, require

SIGNAL_LENGTH = 40
NUM_CLASSES = 10


def make_mnist1d(num_samples: int, train_split: float, seed: int) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with ``mnist1d.data.make_dataset``, leaving the global random state as it was.

    Returns a dict with ``x``, ``y`` (train) and ``x_test``, ``y_test``.
    """
    data = require("mnist1d.data", "The MNIST-1D example")
    args = data.get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = seed
    # make_dataset reseeds the global NumPy and Python generators; keep the caller's seeding intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        dataset: dict[str, np.ndarray] = data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return dataset


class MNIST1DDataModule(InMemoryDataModule):
    """MNIST-1D, generated offline and deterministically from ``seed``.

    Args:
        num_samples: Number of signals in total (train and validation); the package's default is 5000.
        train_split: Fraction of the signals used for training; the rest is the validation set.
        batch_size: Batch size of the training loader.
        seed: Seed of the generator (the same seed gives the same signals) and of the training shuffle.
        num_workers: Worker processes of the loaders (the data is small and in memory: 0 is fastest).

    Example:
        >>> dm = MNIST1DDataModule(num_samples=100)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape[1:]), x.dtype, y.dtype
        ((40,), torch.float32, torch.int64)
    """

    def __init__(
        self,
        num_samples: int = 5000,
        train_split: float = 0.8,
        batch_size: int = 128,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if num_samples < NUM_CLASSES or not 0.0 < train_split < 1.0:
            raise ValueError(
                f"MNIST1DDataModule: needs num_samples >= {NUM_CLASSES} and 0 < train_split < 1, got "
                f"num_samples={num_samples!r}, train_split={train_split!r}."
            )
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.train_split = train_split

    def prepare_data(self) -> None:
        require("mnist1d.data", "The MNIST-1D example")  # fail before training when the package is missing

    def load(self) -> tuple[Dataset[Any], Dataset[Any]]:
        data = make_mnist1d(self.num_samples, self.train_split, self.seed)
        return _tensors(data["x"], data["y"]), _tensors(data["x_test"], data["y_test"])


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


class MNIST1DCNN(ClassifierModule):
    """A 1-D CNN for MNIST-1D: 3-tap convolutions, 2x max pooling after every second one, a linear head.

    Every convolution and the head have no bias; batch norm has no affine parameters (as in the paper's models).

    Args:
        channels: Output channels of the convolutions.

    Example:
        >>> MNIST1DCNN()(torch.randn(8, 40)).shape
        torch.Size([8, 10])
    """

    def __init__(self, channels: Sequence[int] = (32, 32, 64, 64)) -> None:
        super().__init__(conv_net(pool_every_second(channels), 1, 1, NUM_CLASSES), NUM_CLASSES)
        self.save_hyperparameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(1))  # (N, 40) signals -> (N, 1, 40)
