"""Which Lightning strategies the callbacks support: the weights must be visible layer by layer.

Supported: single-device strategies, DDP and its variants (full copies on every process) and
``ModelParallelStrategy`` (FSDP2 and tensor parallelism: ``DTensor`` parameters, whose sums are combined through
:func:`lightning_layca.distributed.full_sums`). Refused, with the reason: DeepSpeed (ZeRO partitions are flat buffers
with no layer boundaries) and FSDP1 (each wrapped module's parameters are flattened into one buffer).

Example:
    >>> from lightning.pytorch.strategies import SingleDeviceStrategy
    >>> check_strategy(SingleDeviceStrategy("cpu"), "LayerRotationMonitor")
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

__all__ = ["MULTI_GPU_DOCS", "check_strategy"]

MULTI_GPU_DOCS = "docs/multi-gpu.md#sharded-training-fsdp2"
"""Where the documentation explains sharded training; the refusals point there."""


def _strategy_names(strategy: Strategy) -> list[str]:
    return [cls.__name__.lower() for cls in type(strategy).__mro__]


def check_strategy(strategy: Strategy, callback_name: str) -> None:
    """Raise ``MisconfigurationException`` for a strategy whose weights the callbacks cannot see layer by layer.

    Supported: single-device strategies, DDP and its variants (full copies) and ``ModelParallelStrategy`` (FSDP2 and
    tensor parallelism: ``DTensor`` parameters, combined through :func:`full_sums`).

    Args:
        strategy: The Trainer's strategy (``trainer.strategy``).
        callback_name: The callback asking, named in the error.

    Raises:
        MisconfigurationException: For DeepSpeed, FSDP1 (``FSDPStrategy``) and other sharded strategies.
    """
    if isinstance(strategy, ModelParallelStrategy):
        return
    if isinstance(strategy, DeepSpeedStrategy) or any("deepspeed" in name for name in _strategy_names(strategy)):
        raise MisconfigurationException(
            f"{callback_name} does not support the `{type(strategy).__name__}` strategy: DeepSpeed's ZeRO keeps the "
            "weights as flat partitions that cut across layers, with no layer boundaries to measure or rotate. Use "
            "Lightning's `ModelParallelStrategy` (FSDP2, sharding every layer along its rows) or DDP; see "
            f"{MULTI_GPU_DOCS}."
        )
    if isinstance(strategy, FSDPStrategy) or any(
        key in name for name in _strategy_names(strategy) for key in ("fsdp", "sharded", "modelparallel")
    ):
        raise MisconfigurationException(
            f"{callback_name} does not support the `{type(strategy).__name__}` strategy: FSDP1 flattens each "
            "wrapped module's parameters into one buffer, so its parameters are 1-D slices that hide the layers' "
            "shapes and rows. Use Lightning's `ModelParallelStrategy` (FSDP2: apply `fully_shard` in "
            f"`configure_model`), which the callbacks support with one collective per step; see {MULTI_GPU_DOCS}."
        )
