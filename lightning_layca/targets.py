"""Rotation targets: every layer ends at the cosine distance to its initial weights that the user chooses.

Layca sets how fast each layer turns; where a layer *ends* depends on how consistently its steps point the same way,
which differs from layer to layer. A :class:`RotationTarget` gives each layer a target curve of its cosine distance to
the initial weights, ``d*_l(t) = final_l * s(t)``, where ``s`` rises from 0 to 1 over training (``"lr_integral"``: the
integral of the learning rate so far over its total, so a warm-up or a decay shapes the target as it shapes the
rotation; ``"linear"``: steps so far over the total). The controller of
:mod:`lightning_layca.target_controller` then sets each layer's rate so that the measured distance follows the curve.

Example:
    >>> target = RotationTarget(0.6, last_layer=0.2)
    >>> target.finals(["conv1", "conv2", "fc"])
    [0.6, 0.4, 0.2]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

from lightning_layca.argument_types import (
    PositiveInt,
    TargetShape,
    check_positive_int,
    check_target_distance,
    check_target_rate,
    check_target_shape,
)
from lightning_layca.target_curve import TargetCurve, scheduled_lrs

__all__ = ["RotationTarget", "TargetCurve", "check_target", "scheduled_lrs"]


class RotationTarget:
    """Where each layer's rotation (cosine distance to its initial weights) should be at the end of training.

    Args:
        final: The final cosine distance, in ``(0, 2)``: one value for every layer, or a mapping from ``fnmatch``
            patterns to values (the first matching pattern wins, like :class:`~lightning_layca.ByName`).
        last_layer: With a number ``final``: the final distance of the last layer; the layers in between are
            interpolated linearly in depth from ``final`` (first layer) to ``last_layer``.
        default: With a mapping ``final``: the value of layers no pattern matches (``None``: every layer must match).
        shape: How the target rises from 0 to ``final``: ``"lr_integral"`` (default, the integral of the learning
            rate so far over its total) or ``"linear"`` in steps.
        interval: Optimizer steps between two measurements and rate updates (default 10).
        total_steps: The number of optimizer steps of training. :class:`~lightning_layca.LaycaCallback` fills it from
            the Trainer; with :class:`~lightning_layca.Layca` alone give it here or through
            :meth:`~lightning_layca.target_controller.TargetController.set_horizon`
            (``Layca(...).targets.set_horizon``).
        max_rate: The largest rate ``g_l`` the controller sets (default 1: 45 degrees per step at relative lr 1).
        min_rate: The smallest (default ``1e-4``).
        steer: Whether the controller also turns a layer directly towards its target at a measurement (in the
            plane of its weights and its initial weights) when its rate no longer gets it there: its turning has
            stopped becoming distance, or its rate is at ``max_rate`` (default ``False``: the controller only sets
            rates). A layer that did not move over the interval (a zero gradient) is never steered.

    Example:
        >>> RotationTarget({"head*": 0.2}, default=0.5).finals(["body.0", "head.fc"])
        [0.5, 0.2]
    """

    def __init__(
        self,
        final: float | Mapping[str, float] = 0.4,
        *,
        last_layer: float | None = None,
        default: float | None = None,
        shape: TargetShape = "lr_integral",
        interval: PositiveInt = 10,
        total_steps: PositiveInt | None = None,
        max_rate: float = 1.0,
        min_rate: float = 1e-4,
        steer: bool = False,
    ) -> None:
        owner = "RotationTarget"
        if isinstance(final, Mapping):
            if not final:
                raise ValueError(
                    f"{owner}: `final` must be a number or a non-empty mapping of pattern -> value, got {{}}."
                )
            for pattern, value in final.items():
                check_target_distance(f"{owner}: the `final` value of pattern {pattern!r}", value)
            if last_layer is not None:
                raise ValueError(
                    f"{owner}: `last_layer` goes with a number `final`, not a mapping; got {last_layer!r}."
                )
            if default is not None:
                check_target_distance(f"{owner}: `default`", default)
            self.final: float | dict[str, float] = {str(k): float(v) for k, v in final.items()}
        else:
            check_target_distance(f"{owner}: `final`", final)
            if default is not None:
                raise ValueError(f"{owner}: `default` goes with a mapping `final`, not a number; got {default!r}.")
            if last_layer is not None:
                check_target_distance(f"{owner}: `last_layer`", last_layer)
            self.final = float(final)
        check_target_shape(owner, shape)
        check_positive_int(owner, "interval", interval)
        check_positive_int(owner, "total_steps", total_steps, allow_none=True)
        check_target_rate(owner, "max_rate", max_rate)
        check_target_rate(owner, "min_rate", min_rate)
        if not isinstance(steer, bool):
            raise TypeError(f"{owner}: `steer` must be True or False, got {steer!r}.")
        if min_rate > max_rate:
            raise ValueError(f"{owner}: `min_rate` ({min_rate!r}) must not exceed `max_rate` ({max_rate!r}).")
        self.last_layer = None if last_layer is None else float(last_layer)
        self.default = None if default is None else float(default)
        self.shape: TargetShape = shape
        self.interval = int(interval)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.max_rate = float(max_rate)
        self.min_rate = float(min_rate)
        self.steer = steer

    def validate(self, layers: Sequence[str]) -> None:
        """Raise ``ValueError`` when a pattern matches no layer, or a layer no pattern matches and no ``default``."""
        if not isinstance(self.final, dict):
            return
        for pattern in self.final:
            if not fnmatch.filter(layers, pattern):
                raise ValueError(
                    f"RotationTarget: pattern {pattern!r} matches no layer. Available layers: {', '.join(layers)}."
                )
        if self.default is None:
            missed = [n for n in layers if not any(fnmatch.fnmatchcase(n, p) for p in self.final)]
            if missed:
                raise ValueError(
                    f"RotationTarget: no pattern of `final` matches layers {missed} and no `default` is given."
                )

    def finals(self, layers: Sequence[str]) -> list[float]:
        """The final target distance of every layer, in the order of ``layers`` (input to output)."""
        if isinstance(self.final, dict):
            out = []
            for name in layers:
                value = self.default
                for pattern, v in self.final.items():
                    if fnmatch.fnmatchcase(name, pattern):
                        value = v
                        break
                out.append(math.nan if value is None else value)
            return out
        n = len(layers)
        if self.last_layer is None or n <= 1:
            return [self.final] * n
        return [self.final + (self.last_layer - self.final) * i / (n - 1) for i in range(n)]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def check_target(owner: str, target: object, schedule: object, rotation_rate: object) -> None:
    """Raise unless ``target`` is ``None`` or a :class:`RotationTarget` that goes with the other arguments.

    A target replaces ``schedule`` and ``rotation_rate``: no schedule, no ``"equilibrium"``.
    """
    if target is None:
        return
    if not isinstance(target, RotationTarget):
        raise TypeError(f"{owner}: `target` must be a RotationTarget instance or None, got {target!r}.")
    if schedule is not None:
        raise ValueError(
            f"{owner}: a rotation target chooses every layer's rate itself; `schedule` must be None with a target, "
            f"got {schedule!r}."
        )
    if rotation_rate == "equilibrium":
        raise ValueError(
            f"{owner}: a rotation target chooses every layer's rate itself; it does not go with "
            "rotation_rate='equilibrium'."
        )
