"""Per-layer rotation schedules: how fast each layer rotates relative to the base ``rotation_rate``.

A schedule maps the selected layers (in depth order, input to output), the optimizer step and the epoch to one
multiplier per layer, ``m_l(t)`` in ``rho_l(t) = rotation_rate * m_l(t) * lr_g(t) / lr_g(0)``. Schedules are evaluated
on the host, and only when :meth:`RotationSchedule.cache_key` says their output may have changed, so a constant
schedule costs nothing per step.

Every schedule is a small class with plain constructor arguments, so it can be written in a LightningCLI YAML file
with ``class_path``/``init_args``.

Example:
    >>> [round(m, 4) for m in DepthDecay(alpha=0.5).multipliers(["a", "b", "c"], step=0, epoch=0)]
    [0.0312, 0.1768, 1.0]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Hashable, Mapping, Sequence

from lightning_layca.argument_types import (
    NonNegativeFloat,
    PositiveInt,
    SignedOpenUnitInterval,
    check_multiplier,
    check_patterns_match,
    check_positive_int,
)

__all__ = ["ByName", "DepthDecay", "EpochSwitch", "LayerWarmup", "RotationSchedule", "Uniform"]


class RotationSchedule:
    """Base class of rotation schedules.

    Subclasses implement :meth:`multipliers`; a time-varying schedule also overrides :meth:`cache_key` so that it
    is re-evaluated exactly when its output can change. :meth:`validate` is called once with the layer names when
    the optimizer is built, so configuration mistakes surface before training starts.

    Example:
        >>> class Frozen(RotationSchedule):
        ...     '''Freeze the first layer, train the others at the base rate.'''
        ...     def multipliers(self, layers, step, epoch):
        ...         return [0.0] + [1.0] * (len(layers) - 1)
        >>> Frozen().multipliers(["conv", "fc"], step=0, epoch=0)
        [0.0, 1.0]
    """

    def multipliers(self, layers: Sequence[str], step: int, epoch: int) -> list[float]:
        """Return one non-negative multiplier per layer, in the order of ``layers``."""
        raise NotImplementedError

    def cache_key(self, step: int, epoch: int) -> Hashable:
        """Return a value that changes whenever :meth:`multipliers` may return something new.

        The default (a constant) declares the schedule time-invariant: it is evaluated once.
        """
        return None

    def validate(self, layers: Sequence[str]) -> None:
        """Check the schedule against the layer names; raise ``ValueError`` on a mistake."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Uniform(RotationSchedule):
    """Every layer rotates at the base rate (the paper's ``alpha = 0``, its best configuration).

    Example:
        >>> Uniform().multipliers(["a", "b"], step=0, epoch=0)
        [1.0, 1.0]
    """

    def multipliers(self, layers: Sequence[str], step: int, epoch: int) -> list[float]:
        """Return 1.0 for every layer."""
        return [1.0] * len(layers)


class DepthDecay(RotationSchedule):
    """The paper's per-layer schedule, parameterised by ``alpha`` in (-1, 1).

    For ``L`` layers indexed ``i = 0 .. L-1`` from input to output:

    * ``alpha > 0``: ``m_i = (1 - alpha) ** (5 * (L - 1 - i) / (L - 1))`` (first layers slowed),
    * ``alpha <= 0``: ``m_i = (1 + alpha) ** (5 * i / (L - 1))`` (last layers slowed).

    ``alpha = 0`` is uniform. A single layer always gets multiplier 1.

    Args:
        alpha: The decay parameter, strictly between -1 and 1.

    Example:
        >>> [round(m, 4) for m in DepthDecay(alpha=-0.5).multipliers(["a", "b", "c"], step=0, epoch=0)]
        [1.0, 0.1768, 0.0312]
    """

    def __init__(self, alpha: SignedOpenUnitInterval = 0.0) -> None:
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and -1.0 < alpha < 1.0):
            raise ValueError(f"DepthDecay: `alpha` must be a number in the open interval (-1, 1), got {alpha!r}.")
        self.alpha = float(alpha)

    def multipliers(self, layers: Sequence[str], step: int, epoch: int) -> list[float]:
        """Return the paper's depth-dependent multipliers."""
        n = len(layers)
        if n <= 1:
            return [1.0] * n
        if self.alpha > 0:
            return [(1.0 - self.alpha) ** (5.0 * (n - 1 - i) / (n - 1)) for i in range(n)]
        return [(1.0 + self.alpha) ** (5.0 * i / (n - 1)) for i in range(n)]


class ByName(RotationSchedule):
    """Multipliers chosen by ``fnmatch`` patterns on layer names; the first matching pattern wins.

    Args:
        patterns: Mapping from a pattern (``"features.*"``) to a non-negative multiplier.
        default: Multiplier of the layers no pattern matches.

    Raises:
        ValueError: At validation, when a pattern matches no layer (the message lists the layer names).

    Example:
        >>> ByName({"head*": 0.5}, default=1.0).multipliers(["body.0", "head.fc"], step=0, epoch=0)
        [1.0, 0.5]
    """

    def __init__(self, patterns: Mapping[str, NonNegativeFloat], default: NonNegativeFloat = 1.0) -> None:
        if not isinstance(patterns, Mapping) or not patterns:
            raise ValueError(
                f"ByName: `patterns` must be a non-empty mapping of pattern -> multiplier, got {patterns!r}."
            )
        for pattern, value in patterns.items():
            check_multiplier(f"ByName: multiplier of pattern {pattern!r}", value)
        check_multiplier("ByName: `default`", default)
        self.patterns = {str(k): float(v) for k, v in patterns.items()}
        self.default = float(default)

    def validate(self, layers: Sequence[str]) -> None:
        """Raise ``ValueError`` if a pattern matches no layer."""
        check_patterns_match("ByName:", list(self.patterns), layers, "layer")

    def multipliers(self, layers: Sequence[str], step: int, epoch: int) -> list[float]:
        """Return the multiplier of the first pattern that matches each layer, else ``default``."""
        out = []
        for name in layers:
            value = self.default
            for pattern, multiplier in self.patterns.items():
                if fnmatch.fnmatchcase(name, pattern):
                    value = multiplier
                    break
            out.append(value)
        return out


class EpochSwitch(RotationSchedule):
    """Switch between schedules at given epochs (time-varying).

    ``schedules[0]`` is active from epoch 0, ``schedules[k]`` from epoch ``milestones[k - 1]`` on.

    Args:
        schedules: The schedules, one more than there are milestones.
        milestones: Strictly increasing positive epochs at which the next schedule takes over.

    Example:
        >>> s = EpochSwitch([DepthDecay(-0.5), Uniform()], milestones=[10])
        >>> s.multipliers(["a", "b"], step=0, epoch=3), s.multipliers(["a", "b"], step=0, epoch=10)
        ([1.0, 0.03125], [1.0, 1.0])
    """

    def __init__(self, schedules: Sequence[RotationSchedule], milestones: Sequence[PositiveInt]) -> None:
        schedules = list(schedules)
        milestones = list(milestones)
        if not schedules:
            raise ValueError("EpochSwitch: `schedules` must be a non-empty list of RotationSchedule, got [].")
        for schedule in schedules:
            as_schedule("EpochSwitch", schedule, what="every entry of `schedules`")
        if len(milestones) != len(schedules) - 1:
            raise ValueError(
                f"EpochSwitch: needs exactly one milestone fewer than schedules, got {len(schedules)} schedules and "
                f"milestones {milestones!r}."
            )
        if any(not isinstance(m, int) or m <= 0 for m in milestones) or sorted(set(milestones)) != milestones:
            raise ValueError(
                f"EpochSwitch: `milestones` must be strictly increasing positive epochs, got {milestones!r}."
            )
        self.schedules = schedules
        self.milestones = [int(m) for m in milestones]

    def _active(self, epoch: int) -> int:
        return sum(1 for m in self.milestones if epoch >= m)

    def cache_key(self, step: int, epoch: int) -> Hashable:
        """Change when the active schedule changes or the active schedule's own key changes."""
        index = self._active(epoch)
        return index, self.schedules[index].cache_key(step, epoch)

    def validate(self, layers: Sequence[str]) -> None:
        """Validate every inner schedule."""
        for schedule in self.schedules:
            schedule.validate(layers)

    def multipliers(self, layers: Sequence[str], step: int, epoch: int) -> list[float]:
        """Return the multipliers of the schedule active at ``epoch``."""
        return self.schedules[self._active(epoch)].multipliers(layers, step, epoch)


class LayerWarmup(RotationSchedule):
    """Linear warm-up of the rotation rate over the first optimizer steps (time-varying).

    The multiplier of every layer is ``min(1, (step + 1) / warmup_steps)`` times the multiplier of ``schedule``.
    The schedule is re-evaluated every step during the warm-up and never after it.

    Args:
        warmup_steps: Number of optimizer steps of the warm-up (positive).
        schedule: The schedule that is warmed up (default :class:`Uniform`).

    Example:
        >>> LayerWarmup(4).multipliers(["a"], step=1, epoch=0)
        [0.5]
    """

    def __init__(self, warmup_steps: PositiveInt, schedule: RotationSchedule | None = None) -> None:
        check_positive_int("LayerWarmup", "warmup_steps", warmup_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = as_schedule("LayerWarmup", schedule)

    def _factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)

    def cache_key(self, step: int, epoch: int) -> Hashable:
        """Change every step of the warm-up, then only when the inner schedule changes."""
        return min(step + 1, self.warmup_steps), self.schedule.cache_key(step, epoch)

    def validate(self, layers: Sequence[str]) -> None:
        """Validate the inner schedule."""
        self.schedule.validate(layers)

    def multipliers(self, layers: Sequence[str], step: int, epoch: int) -> list[float]:
        """Return the inner multipliers scaled by the warm-up factor."""
        factor = self._factor(step)
        return [factor * m for m in self.schedule.multipliers(layers, step, epoch)]


def as_schedule(owner: str, schedule: object, what: str = "`schedule`") -> RotationSchedule:
    """Return ``schedule`` (:class:`Uniform` for ``None``); ``TypeError`` naming ``owner`` unless it is a schedule.

    The one check of a schedule argument, for :class:`~lightning_layca.Layca`, the callbacks and the schedules that
    wrap others.
    """
    if schedule is None:
        return Uniform()
    if not isinstance(schedule, RotationSchedule):
        raise TypeError(
            f"{owner}: {what} must be a RotationSchedule instance, got {schedule!r} (Uniform, DepthDecay, ByName, "
            "EpochSwitch, LayerWarmup or a subclass of your own)."
        )
    return schedule
