"""Where the callbacks meet distributed training: which strategies are supported, and the rules they follow.

Supported: single-device strategies and data-parallel strategies that keep a full copy of every weight on every
process (DDP and its spawn/fork variants). There every rank computes the same Layca step and the same rotation from
the same all-reduced gradients, so the callbacks need no collective of their own; the initial-weight snapshot is
taken in ``on_fit_start``, after DDP has broadcast rank 0's weights, and only global rank 0 writes logs and figures.

Not supported yet: strategies that shard weights across processes (FSDP, DeepSpeed, model parallelism), where a
layer's inner products would need one all-reduce per step. They are refused before training starts.

Example:
    >>> from lightning.pytorch.strategies import SingleDeviceStrategy
    >>> check_strategy(SingleDeviceStrategy("cpu"), "LayerRotationMonitor")
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

__all__ = ["check_strategy"]

_SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)


def _is_sharded(strategy: Strategy) -> bool:
    if isinstance(strategy, _SHARDED_STRATEGIES):
        return True
    # Strategies of other packages (for example XLA's FSDP) follow the same naming.
    names = [cls.__name__.lower() for cls in type(strategy).__mro__]
    return any(key in name for name in names for key in ("fsdp", "deepspeed", "sharded", "modelparallel"))


def check_strategy(strategy: Strategy, callback_name: str) -> None:
    """Raise ``MisconfigurationException`` when ``strategy`` shards weights across processes.

    Args:
        strategy: The Trainer's strategy (``trainer.strategy``).
        callback_name: The callback asking, named in the error.

    Raises:
        MisconfigurationException: For DeepSpeed, FSDP, model-parallel and other sharded strategies.
    """
    if _is_sharded(strategy):
        raise MisconfigurationException(
            f"{callback_name} does not support the `{type(strategy).__name__}` strategy yet: it shards weights across "
            "processes, so a layer's rotation cannot be computed locally. Supported: single-device strategies and "
            "DDP (`strategy='ddp'`, 'ddp_spawn', 'ddp_fork', 'ddp_notebook')."
        )
