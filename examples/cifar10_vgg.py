"""CIFAR-10 with a VGG-style network: the paper's setting (needs internet for the download, and a GPU to be quick).

torchvision is used only to download and read the dataset (``pip install 'lightning-layca[vision]'``); the model and
the augmentation (4-pixel padded random crops and horizontal flips) are plain torch, so this module imports without
torchvision. Run it (from the repository root)::

    python -m examples.cli fit --config examples/configs/cifar10_layca.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from examples.common import POOL, ClassifierModule, InMemoryDataModule, conv_net, require

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

VGG_SPECS: dict[str, list[int | str]] = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg13": [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
    "vgg19": [64, 64, POOL, 128, 128, POOL, *[256] * 4, POOL, *[512] * 4, POOL, *[512] * 4, POOL],
}
"""Convolution widths of the VGG variants (``"M"``: 2x max pooling); five poolings take 32x32 images to 1x1.

As usual on CIFAR, one linear classifier replaces VGG's three fully connected layers: ``vggN`` has ``N - 3``
convolutions and one linear layer.
"""


class Normalize:
    """Turn a uint8 image ``(3, H, W)`` into float32 in [0, 1] standardised per channel.

    Example:
        >>> Normalize()(torch.full((3, 2, 2), 0, dtype=torch.uint8))[:, 0, 0]
        tensor([-1.9895, -1.9803, -1.7068])
    """

    def __init__(self, mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / 255.0 - self.mean) / self.std


class RandomCropFlip(Normalize):
    """The standard CIFAR augmentation, then :class:`Normalize`: zero-pad, crop back at random, flip half the images.

    Args:
        padding: Pixels of zero padding on each side before the random crop.

    Example:
        >>> RandomCropFlip()(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, padding: int = 4) -> None:
        super().__init__()
        self.padding = padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        padded = F.pad(image, (self.padding,) * 4)
        top, left = (int(v) for v in torch.randint(0, 2 * self.padding + 1, (2,)))
        crop = padded[:, top : top + h, left : left + w]
        if bool(torch.rand(()) < 0.5):
            crop = crop.flip(-1)
        return super().__call__(crop)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """uint8 images ``(N, 3, H, W)`` and integer labels, with a transform applied per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Normalize) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10, downloaded by torchvision into ``data_dir``; the test set serves as validation set (as in the paper).

    Args:
        data_dir: Where the dataset is downloaded to (about 170 MB).
        batch_size: Batch size of the training loader (the paper uses 128).
        seed: Seed of the training shuffle.
        num_workers: Worker processes of the loaders (augmentation runs in them).
        augment: Random crops and flips on the training set.

    Example:
        >>> dm = CIFAR10DataModule()
        >>> dm.dims, dm.num_classes
        ((3, 32, 32), 10)
    """

    dims = IMAGE_SHAPE
    num_classes = NUM_CLASSES

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 4,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_transform: Normalize = RandomCropFlip() if augment else Normalize()
        self.eval_transform = Normalize()

    def prepare_data(self) -> None:
        datasets = require("torchvision.datasets", "The CIFAR-10 example").CIFAR10
        for train in (True, False):
            datasets(str(self.data_dir), train=train, download=True)

    def load(self) -> tuple[Dataset[Any], Dataset[Any]]:
        cifar10 = require("torchvision.datasets", "The CIFAR-10 example").CIFAR10
        sets = []
        for train, transform in ((True, self.train_transform), (False, self.eval_transform)):
            raw = cifar10(str(self.data_dir), train=train, download=False)
            images = torch.as_tensor(raw.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
            sets.append(ImageDataset(images, torch.as_tensor(raw.targets), transform))
        return sets[0], sets[1]


class CIFAR10VGG(ClassifierModule):
    """A VGG network for 32x32 images in the paper's style: no biases, batch norm without affine parameters.

    Args:
        variant: Which VGG: ``"vgg11"``, ``"vgg13"``, ``"vgg16"`` or ``"vgg19"``.

    Example:
        >>> CIFAR10VGG("vgg11")(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, variant: Literal["vgg11", "vgg13", "vgg16", "vgg19"] = "vgg11") -> None:
        if variant not in VGG_SPECS:
            raise ValueError(f"CIFAR10VGG: unknown `variant` {variant!r}; choose one of {', '.join(VGG_SPECS)}.")
        super().__init__(conv_net(VGG_SPECS[variant], 2, 3, NUM_CLASSES), NUM_CLASSES)
        self.save_hyperparameters()
