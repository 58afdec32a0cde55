"""The rise of a rotation target over training: its horizon, the learning rates it follows, what the steps left can do.

A :class:`~lightning_layca.RotationTarget` asks each layer to be at ``final_l * s(t)`` after ``t`` steps; a
:class:`TargetCurve` is ``s``: from the length of training and, per param group, the learning rate at every step of
it (the *profile*, found by :func:`scheduled_lrs` stepping the LR schedulers ahead). The controller of
:mod:`lightning_layca.targets` reads it.

Example:
    >>> from lightning_layca import RotationTarget
    >>> curve = TargetCurve(RotationTarget(0.4, shape="linear"))
    >>> curve.set_horizon(100)
    >>> curve.fraction(0, 25)
    0.25
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

from lightning_layca.argument_types import check_positive_int

__all__ = ["CurveSettings", "TargetCurve", "scheduled_lrs"]


class CurveSettings(Protocol):
    """What a curve reads of its target (a :class:`~lightning_layca.RotationTarget`)."""

    @property
    def shape(self) -> str:
        """``"lr_integral"`` or ``"linear"``."""

    @property
    def max_rate(self) -> float:
        """The largest rate the controller sets."""

    @property
    def total_steps(self) -> int | None:
        """The number of optimizer steps of training, if the target knows it."""


class TargetCurve:
    """How far along its rise from 0 to its final value a :class:`~lightning_layca.RotationTarget` is at every step.

    ``s(t)`` follows the target's ``shape``: the integral of a param group's learning rate so far over its total
    (``"lr_integral"``, from the learning rate at every step of training, the *profile*) or steps so far over the
    total (``"linear"``, and ``"lr_integral"`` without a profile). The curve also knows what the steps left can turn a
    layer by at most, which tells a :class:`~lightning_layca.target_controller.TargetController` whether a target is
    in reach.

    Args:
        target: The target (its ``shape``, ``max_rate`` and, if given, ``total_steps``).
    """

    def __init__(self, target: CurveSettings) -> None:
        self.target = target
        self.total_steps: int | None = target.total_steps
        """The number of optimizer steps of training (``None``: not known yet)."""
        self.lr_profile: list[list[float]] | None = None
        """Per param group, its learning rate at every step of training (``None``: constant)."""
        self._cumulative: list[list[float]] | None = None
        self._suffix: dict[tuple[int, float], list[float]] = {}

    def set_horizon(self, total_steps: int, lr_profile: Sequence[Sequence[float]] | None = None) -> None:
        """Set the length of training and, per param group, its learning rate at every step (``None``: constant)."""
        check_positive_int("TargetController.set_horizon", "total_steps", total_steps)
        if lr_profile is not None:
            profile = [[float(x) for x in group] for group in lr_profile]
            if any(
                len(group) != total_steps or not all(math.isfinite(x) and x >= 0 for x in group) for group in profile
            ):
                raise ValueError(
                    f"TargetController.set_horizon: `lr_profile` must hold, per param group, {total_steps} finite "
                    "non-negative learning rates."
                )
            self.restore(int(total_steps), profile)
        else:
            self.restore(int(total_steps), None)

    def restore(self, total_steps: int | None, lr_profile: list[list[float]] | None) -> None:
        """Take a horizon saved by a controller's ``state`` (checked when it was set)."""
        self.total_steps = total_steps
        self.lr_profile = lr_profile
        self._cumulative, self._suffix = None, {}

    def total(self) -> int:
        """The number of optimizer steps of training (``ValueError`` while it is not known)."""
        if self.total_steps is None:
            raise ValueError(
                "Layca: a RotationTarget needs the length of training: give `total_steps` to the RotationTarget or "
                "call `layca.targets.set_horizon(total_steps)` before the first step (LaycaCallback does it)."
            )
        return self.total_steps

    def lr(self, group: int, step: int, current: float) -> float:
        """The learning rate of param group ``group`` at ``step`` (``current`` without a profile for it)."""
        profile = self.lr_profile
        if profile is None or group >= len(profile) or not 0 <= step < len(profile[group]):
            return current
        return profile[group][step]

    def fraction(self, group: int, step: int) -> float:
        """``s(t)``: how far along its curve the target is after ``step`` steps (0 to 1)."""
        total = self.total()
        if step >= total:
            return 1.0
        if self.target.shape == "linear" or self.lr_profile is None or group >= len(self.lr_profile):
            return step / total
        if self._cumulative is None:
            self._cumulative = []
            for group_lrs in self.lr_profile:
                sums, running = [0.0], 0.0
                for lr in group_lrs:
                    running += lr
                    sums.append(running)
                self._cumulative.append(sums)
        cumulative = self._cumulative[group]
        return cumulative[step] / cumulative[-1] if cumulative[-1] > 0 else step / total

    def remaining_turn(self, group: int, step: int, lr: float, reference: float) -> float:
        """The angle the steps left turn a layer by at ``max_rate``: ``sum(atan(max_rate * lr_g(s) / lr_ref))``."""
        rate, total = self.target.max_rate, self.total()
        profile = self.lr_profile
        if profile is None or group >= len(profile):
            return (total - step) * math.atan(rate * lr / reference)
        key = (group, reference)
        if key not in self._suffix:
            suffix = [0.0] * (total + 1)
            for s in range(total - 1, -1, -1):
                suffix[s] = suffix[s + 1] + math.atan(rate * profile[group][s] / reference)
            self._suffix[key] = suffix
        return self._suffix[key][min(step, total)]


def scheduled_lrs(
    param_groups: list[dict[str, Any]],
    schedulers: Sequence[tuple[Any, bool, int]],
    total_steps: int,
    steps_per_epoch: int,
) -> list[list[float]]:
    """Per param group, its learning rate at every step of training, found by stepping the schedulers ahead.

    The schedulers and the learning rates are put back as they were afterwards (``state_dict`` and the groups'
    ``lr``).

    Args:
        param_groups: The optimizer's param groups (the schedulers write their ``lr``).
        schedulers: ``(scheduler, per_step, frequency)``: stepped every ``frequency`` steps (``per_step``) or epochs.
        total_steps: Steps of training.
        steps_per_epoch: Optimizer steps per epoch.
    """
    saved_lrs = [group["lr"] for group in param_groups]
    saved = [scheduler.state_dict() for scheduler, _, _ in schedulers]
    profile: list[list[float]] = [[] for _ in param_groups]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(total_steps):
                for g, group in enumerate(param_groups):
                    profile[g].append(float(group["lr"]))
                for scheduler, per_step, frequency in schedulers:
                    if (per_step and (step + 1) % frequency == 0) or (
                        not per_step
                        and (step + 1) % steps_per_epoch == 0
                        and ((step + 1) // steps_per_epoch) % frequency == 0
                    ):
                        scheduler.step()
    finally:
        for (scheduler, _, _), state in zip(schedulers, saved, strict=True):
            scheduler.load_state_dict(state)
        for group, lr in zip(param_groups, saved_lrs, strict=True):
            group["lr"] = lr
    return profile
