"""Parameter shape sets of well-known networks, written out by hand (no torchvision or timm needed).

Each set is a list of ``(name, shape)`` pairs in ``named_parameters()`` order, with the names the reference
implementations use, so that layer selection and depth order behave as on the real model. Only parameters are
listed (BatchNorm running statistics are buffers, which no optimizer steps).

Totals (checked by ``tests/test_benchmarks_smoke.py`` against the published parameter counts)::

    set       parameters   tensors   layers (ndim >= 2)   published count from
    resnet18  11,689,512        62                   21   torchvision resnet18()
    resnet50  25,557,032       161                   54   torchvision resnet50()
    vitb16    86,567,656       152                   52   timm vit_base_patch16_224
    mlp200    13,158,400       400                  200   200 x Linear(256, 256)
"""

from __future__ import annotations

from collections.abc import Callable

Shape = tuple[int, ...]
ShapeSet = list[tuple[str, Shape]]


def _conv_bn(prefix: str, conv: str, bn: str, c_out: int, c_in: int, k: int) -> ShapeSet:
    return [
        (f"{prefix}{conv}.weight", (c_out, c_in, k, k)),
        (f"{prefix}{bn}.weight", (c_out,)),
        (f"{prefix}{bn}.bias", (c_out,)),
    ]


def _resnet(block: str, blocks: tuple[int, int, int, int]) -> ShapeSet:
    expansion = 4 if block == "bottleneck" else 1
    shapes = _conv_bn("", "conv1", "bn1", 64, 3, 7)
    c_in = 64
    for stage, (width, n_blocks) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        for b in range(n_blocks):
            prefix = f"layer{stage}.{b}."
            c_out = width * expansion
            if block == "bottleneck":
                shapes += _conv_bn(prefix, "conv1", "bn1", width, c_in, 1)
                shapes += _conv_bn(prefix, "conv2", "bn2", width, width, 3)
                shapes += _conv_bn(prefix, "conv3", "bn3", c_out, width, 1)
            else:
                shapes += _conv_bn(prefix, "conv1", "bn1", width, c_in, 3)
                shapes += _conv_bn(prefix, "conv2", "bn2", width, width, 3)
            if b == 0 and (stage > 1 or c_in != c_out):
                shapes += _conv_bn(prefix, "downsample.0", "downsample.1", c_out, c_in, 1)
            c_in = c_out
    shapes += [("fc.weight", (1000, c_in)), ("fc.bias", (1000,))]
    return shapes


def resnet18() -> ShapeSet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]), 1000 classes."""
    return _resnet("basic", (2, 2, 2, 2))


def resnet50() -> ShapeSet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]), 1000 classes."""
    return _resnet("bottleneck", (3, 4, 6, 3))


def vitb16() -> ShapeSet:
    """ViT-B/16 at 224x224 (768 wide, 12 blocks, 12 heads, MLP 3072), 1000 classes, timm's parameter layout."""
    dim, hidden, tokens = 768, 3072, 1 + (224 // 16) ** 2
    shapes: ShapeSet = [
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, tokens, dim)),
        ("patch_embed.proj.weight", (dim, 3, 16, 16)),
        ("patch_embed.proj.bias", (dim,)),
    ]
    for b in range(12):
        p = f"blocks.{b}."
        shapes += [
            (p + "norm1.weight", (dim,)),
            (p + "norm1.bias", (dim,)),
            (p + "attn.qkv.weight", (3 * dim, dim)),
            (p + "attn.qkv.bias", (3 * dim,)),
            (p + "attn.proj.weight", (dim, dim)),
            (p + "attn.proj.bias", (dim,)),
            (p + "norm2.weight", (dim,)),
            (p + "norm2.bias", (dim,)),
            (p + "mlp.fc1.weight", (hidden, dim)),
            (p + "mlp.fc1.bias", (hidden,)),
            (p + "mlp.fc2.weight", (dim, hidden)),
            (p + "mlp.fc2.bias", (dim,)),
        ]
    shapes += [("norm.weight", (dim,)), ("norm.bias", (dim,)), ("head.weight", (1000, dim)), ("head.bias", (1000,))]
    return shapes


def mlp(depth: int = 200, width: int = 256) -> ShapeSet:
    """``depth`` ``Linear(width, width)`` layers with biases (a deep, narrow network: many small tensors)."""
    return [s for i in range(depth) for s in ((f"{i}.weight", (width, width)), (f"{i}.bias", (width,)))]


SHAPE_SETS: dict[str, Callable[[], ShapeSet]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vitb16": vitb16,
    "mlp200": mlp,
}
"""The parameter sets the step-cost benchmark knows, by command-line name."""


def numel(shape: Shape) -> int:
    """Number of elements of a tensor of this shape."""
    n = 1
    for s in shape:
        n *= s
    return n
