"""The Trainer's side of rotation targets: how long training is, and the learning rate at every step of it.

A :class:`~lightning_layca.RotationTarget` rises over training along the learning rate (or the steps) of the whole
fit, which a ``Layca`` step alone cannot know. When the fit starts, :func:`start_targets` gives every wrapper's
controller (:class:`~lightning_layca.target_controller.TargetController`) the monitor's initial weights (no copy of its
own) and, unless a checkpoint restored it, its horizon: the length of training from the Trainer
(``estimated_stepping_batches``) and each param group's learning rate at every step, found by stepping the wrapper's
LR schedulers ahead (:func:`lightning_layca.target_curve.scheduled_lrs`; ``ReduceLROnPlateau`` cannot be: the
current lr is assumed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lightning_layca.layca import Layca
from lightning_layca.monitored import MonitoredLayers
from lightning_layca.selection import layer_display_name
from lightning_layca.target_curve import scheduled_lrs

__all__ = ["start_targets", "steered_now", "targets_now", "training_length"]


def start_targets(trainer: pl.Trainer, laycas: Iterable[Layca], layers: MonitoredLayers) -> None:
    """Give every wrapper's target controller the initial weights and, unless restored, the horizon of the fit.

    Called when training starts, after every restore: the initial weights are final then.

    Args:
        trainer: The Trainer of the fit.
        laycas: The wrappers; those without a target are left alone.
        layers: The monitor's layers, whose initial weights (this process's shard) the controllers share.

    Raises:
        MisconfigurationException: When training has no end and the target no ``total_steps``.
    """
    for layca in laycas:
        if layca.targets is None:
            continue
        layca.targets.share_initial_weights(dict(zip(layers.names, layers.initial, strict=True)))
        if layca.targets.lr_profile is not None:  # restored from a checkpoint
            continue
        total, per_epoch = training_length(trainer)
        configs = [
            (c.scheduler, c.interval == "step", c.frequency)
            for c in trainer.lr_scheduler_configs
            if getattr(c.scheduler, "optimizer", None) is layca.optimizer
            and not isinstance(c.scheduler, ReduceLROnPlateau)
        ]
        total = layca.targets.total_steps or total
        layca.targets.set_horizon(total, scheduled_lrs(layca.param_groups, configs, total, per_epoch))


def targets_now(laycas: Iterable[Layca]) -> dict[str, float]:
    """Layer display name -> its rotation target after the steps taken, for every layer of the wrappers."""
    return {layer_display_name(name): value for layca in laycas for name, value in layca.rotation_targets().items()}


def steered_now(laycas: Iterable[Layca]) -> dict[str, float]:
    """Layer display name -> the angle (degrees) steering has turned it by so far, for wrappers whose target steers."""
    return {
        layer_display_name(layca.layer_names[i]): layca.targets.steered[i]
        for layca in laycas
        if layca.targets is not None and layca.targets.target.steer
        for i in layca.layers.controlled
    }


def training_length(trainer: pl.Trainer) -> tuple[int, int]:
    """Optimizer steps of the fit, and per epoch (``MisconfigurationException`` when training has no end)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise MisconfigurationException(
            "LaycaCallback: a RotationTarget needs a finite training length; set `max_epochs` or `max_steps`, or "
            "give the RotationTarget `total_steps`."
        )
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else int(total)
    return int(total), max(1, per_epoch)
