"""The closed-loop controller of rotation targets: the rates that make each layer follow its target curve.

A :class:`~lightning_layca.targets.RotationTarget` gives each layer a target curve of its cosine distance to the
initial weights; a :class:`TargetController` sets each layer's rate so that the measured distance follows the curve.

The law. Each Layca step turns a layer by ``atan(rho)``; the angle to the initial weights, ``theta = acos(1 - d)``,
grows by a fraction ``e`` of that (``e = 1`` along a great circle, less when successive steps point different ways).
Every ``interval`` steps the controller measures ``d`` (:func:`lightning_layca.sums.float64_sums` of the weights and
the initial weights, float64; sharded layers through the one seam :func:`lightning_layca.distributed.reduce_sums`),
updates its estimate of ``e`` (the angle gained over the effort spent, ``sum(atan(rho))``, both averaged with weight
:data:`MEMORY` per interval), and chooses the rate of the next interval so that the expected gain,
``e * N * atan(rho_bar)``, equals the target's increase over the interval plus :data:`CORRECTION` times the current
shortfall (a feed-forward term from the learning-rate profile and a proportional correction; the estimate of ``e``
acts as the integral term). The rate changes by at most a factor :data:`MAX_CHANGE` per interval and stays within
``[min_rate, max_rate]`` (anti-windup); a layer that did not move at all over an interval although its rate was
positive (a zero gradient) keeps its rate rather than raising it. Both situations the loop cannot fix are warned about
once: layers that cannot move, and targets beyond what the steps left can reach even along a great circle at
``max_rate``.

A rate cannot take a layer further than its gradient lets it: late in training a layer whose steps keep pointing
back into a basin turns in place, and a faster rate only makes it jitter further out. With ``steer=True`` the
controller also **steers** such layers: at each measurement, a layer that moved over the interval but whose
efficiency fell below :data:`STEER_EFFICIENCY` (or whose rate is at ``max_rate``) is rotated in the plane of its
weights and its initial weights (norm kept) by :data:`CORRECTION` times its angle error plus the pull-back its steps
are estimated to make (:func:`steering_turn`), then measured again; its rate assumes that efficiency at least. The
steered angle is counted apart from the steps' turning, so the estimate of ``e`` stays the steps' own.

The rate of layer ``l`` at step ``t`` is ``rho_l(t) = g_l * lr_g(t) / lr_ref``: the controller chooses ``g_l``; the
learning-rate schedule still shapes the rate within an interval.

Example:
    >>> from lightning_layca.targets import RotationTarget
    >>> controller = TargetController(RotationTarget(0.6, total_steps=100), ["conv1", "fc"])
    >>> controller.target_distance(1, group=0, step=100)
    0.6
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from lightning_layca.start_weights import StartWeights, distances_of
from lightning_layca.target_curve import TargetCurve
from lightning_layca.targets import RotationTarget

__all__ = ["CORRECTION", "MAX_CHANGE", "MEMORY", "TargetController", "steering_turn"]

CORRECTION = 0.5
"""Fraction of the current shortfall (target angle minus measured angle) the next interval is asked to make up."""

MAX_CHANGE = 4.0
"""The most a layer's rate changes (up or down) from one control interval to the next."""

MEMORY = 0.7
"""Weight of the past in the estimate of how much of the turning becomes distance from the initial weights."""

STEER_EFFICIENCY = 0.1
"""With ``steer=True``: the efficiency below which a layer is steered, and the least the rate law then assumes. A layer
whose turning no longer becomes distance is not turned faster than a layer of this efficiency would need (a faster
rate only makes it jitter around a basin); steering makes up the rest. Layers above it are left to their rate."""

MIN_EFFICIENCY = 0.02
"""The least fraction of the turning assumed to become distance (a layer walking in circles is not chased forever)."""


def _angle(distance: float) -> float:
    return math.acos(min(1.0, max(-1.0, 1.0 - distance)))


def steering_turn(phi: float, want: float, measured: float, moved: bool, gained: float, at_max_rate: bool) -> float:
    """The angle a steering target turns one loop by at a measurement (positive: away from its initial weights).

    :data:`CORRECTION` times the angle error ``want - phi``, plus the pull-back its steps are estimated to make
    (``-gained`` when negative), but only where the rate falls short: the loop's measured efficiency is below
    :data:`STEER_EFFICIENCY` or its rate is at ``max_rate``. A loop that did not move (a zero gradient), or at
    ``phi = 0`` (no plane to turn in yet), is not steered. The angle stays within ``[0, pi]``.

    Example:
        >>> round(steering_turn(0.5, 0.9, measured=0.01, moved=True, gained=-0.1, at_max_rate=False), 6)
        0.3
    """
    if not moved or math.sin(phi) <= 1e-6 or (measured >= STEER_EFFICIENCY and not at_max_rate):
        return 0.0
    turn = CORRECTION * (want - phi) + max(0.0, -gained)
    return min(math.pi, max(0.0, phi + turn)) - phi


STUCK = (
    "did not move over the last control interval although their rate was positive (a zero gradient, or no gradient); "
    "their rate is held, not raised, and they will not follow their rotation target while this lasts"
)
UNREACHABLE = (
    "cannot reach their final rotation target in the {} steps left: not even along a great circle at max_rate={:g}, "
    "or, for a layer already at max_rate, not at the fraction of its turning that has become distance so far (a "
    "RotationTarget with steer=True turns such layers there)"
)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=5)  # the Layca step (through Rates.after_step)


class TargetController:
    """The rates that make each layer's rotation follow a :class:`RotationTarget`.

    Every ``interval`` steps it measures each layer's cosine distance ``d`` to its initial weights (float64 sums;
    sharded layers through ``lightning_layca.distributed.reduce_sums``, one ``all_reduce``), estimates the fraction
    ``e`` of the layer's turning ``sum(atan(rho))`` that became angle ``theta = acos(1 - d)`` (averaged with weight
    :data:`MEMORY` on the past), and sets the next interval's rate so that ``e * N * atan(rho_bar)`` equals the
    target's increase over the interval plus :data:`CORRECTION` times the current shortfall in angle, changed by at
    most :data:`MAX_CHANGE` and kept within ``[min_rate, max_rate]``. A layer that did not move although its rate was
    positive keeps its rate (anti-windup); it, and a target out of reach, are warned about once.

    Works on the host with numbers it measures every ``interval`` steps; between two measurements the rates do not
    change, so the step uploads them only then.

    Under ``granularity="unit"`` (``per_unit``) every output unit (row of
    ``lightning_layca.sums.row_view``) is a loop of its own: its distance to its initial weights is measured from
    the same sums per row, and it gets a rate of its own, so every unit follows its layer's target curve. The step
    then takes per-row rates, which the eager step reads; the compiled kernels take one rate per layer, so these
    layers take the eager step (see :meth:`lightning_layca.Layca.describe`).

    Args:
        target: The target.
        names: The candidate layers' names, in depth order.
        per_unit: Whether every unit of a layer is controlled by itself.
    """

    def __init__(self, target: RotationTarget, names: Sequence[str], per_unit: bool = False) -> None:
        self.target = target
        self.per_unit = per_unit
        self.curve = TargetCurve(target)
        """The target's rise over training: its horizon and the learning-rate profile it follows."""
        self.start = StartWeights(per_unit)
        """The layers' initial weights (shared with a monitor or owned), and the distance from them."""
        self.resize(names)

    def resize(self, names: Sequence[str]) -> None:
        """Take the candidate layers (again): their finals; per-layer state kept for the names seen before."""
        old = getattr(self, "names", [])
        keep = {n: i for i, n in enumerate(old)}
        self.target.validate(list(names))
        self.finals = self.target.finals(list(names))

        def carry(values: list[Any], fill: Any) -> list[Any]:
            return [values[keep[n]] if n in keep else fill for n in names]

        self.gains: list[list[float] | None] = carry(getattr(self, "gains", []), None)
        """Per candidate layer, the rate ``g`` of each unit (one entry per layer unless ``per_unit``)."""
        self.unit_distances: list[list[float]] = carry(getattr(self, "unit_distances", []), [])
        """Per candidate layer, each unit's distance at the latest measurement (one entry unless ``per_unit``)."""
        self.targets: list[float] = carry(getattr(self, "targets", []), 0.0)
        self.steered: list[float] = carry(getattr(self, "steered", []), 0.0)
        """Per candidate layer, the total angle (degrees) steering turned it by (the mean over its units)."""
        self._progress: list[list[float]] = carry(getattr(self, "_progress", []), [])
        self._spent: list[list[float]] = carry(getattr(self, "_spent", []), [])
        self._effort: list[list[float]] = carry(getattr(self, "_effort", []), [])
        self._warned: set[str] = getattr(self, "_warned", set())
        self.start.reindex(old, names)
        self.names = list(names)

    @property
    def distances(self) -> list[float]:
        """Per candidate layer, its distance at the latest measurement (the mean over its units with ``per_unit``)."""
        return [sum(d) / len(d) if d else 0.0 for d in self.unit_distances]

    def layer_gains(self) -> list[float]:
        """Per candidate layer, its rate ``g`` (the mean over its units with ``per_unit``; 0 before its first step)."""
        return [sum(g) / len(g) if g else 0.0 for g in self.gains]

    # ------------------------------------------------------------------ horizon
    @property
    def total_steps(self) -> int | None:
        """The number of optimizer steps of training (``None``: not known yet)."""
        return self.curve.total_steps

    @property
    def lr_profile(self) -> list[list[float]] | None:
        """Per param group, its learning rate at every step of training (``None``: constant)."""
        return self.curve.lr_profile

    def set_horizon(self, total_steps: int, lr_profile: Sequence[Sequence[float]] | None = None) -> None:
        """Set the length of training and, per param group, its learning rate at every step (``None``: constant)."""
        self.curve.set_horizon(total_steps, lr_profile)

    def target_distance(self, i: int, group: int, step: int) -> float:
        """``d*_l`` of candidate ``i`` (in param group ``group``) after ``step`` steps."""
        return self.finals[i] * self.curve.fraction(group, step)

    # ------------------------------------------------------------------ initial weights
    @property
    def initial(self) -> dict[int, torch.Tensor]:
        """Candidate index -> its initial weights (this process's shard), shared or owned."""
        return self.start.tensors

    def share_initial_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Use these initial weights (by layer name; a monitor's snapshots) instead of copies of its own."""
        self.start.share(self.names, weights)

    # ------------------------------------------------------------------ the loop
    @staticmethod
    def _arguments(layca: Any) -> tuple[list[int], list[torch.Tensor], dict[int, int], list[float], float]:
        """What the loop reads of a ``Layca``.

        Its controlled layers, parameters, their param groups, the groups' learning rates, the reference lr.
        """
        layers, rates = layca.layers, layca.rates
        holding = list(layers.param_group_of.values())
        reference = rates.reference_lr
        if reference is None:
            reference = rates.default_reference_lr(layca.param_groups, holding) if holding else 1.0
        lrs = [float(group["lr"]) for group in layca.param_groups]
        return list(layers.controlled), list(layers.params), dict(layers.param_group_of), lrs, float(reference)

    def prepare(self, layca: Any) -> None:
        """Before a step of ``layca``: snapshot the layers controlled for the first time, give them their first rate.

        The first rate assumes a great circle: the angle the target asks for by the first measurement, in as many
        equal turns.
        """
        self.curve.total()
        controlled, params, group_of, group_lrs, reference = self._arguments(layca)
        new = [i for i in controlled if self.gains[i] is None]
        self.start.snapshot(controlled, params)
        for i in new:
            g, units = group_of[i], self.start.units(params[i])
            gain = self._next_gain(i, g, layca.step_count, 0.0, 1.0, group_lrs[g], reference, previous=None)
            self.gains[i] = [gain] * units
            self.unit_distances[i] = [0.0] * units
            self._progress[i], self._spent[i], self._effort[i] = [0.0] * units, [0.0] * units, [0.0] * units

    def targets_now(self, layca: Any) -> dict[str, float]:
        """``d*_l`` of every layer ``layca`` controls, after the steps it has taken, by parameter name."""
        group_of = layca.layers.param_group_of
        return {self.names[i]: self.target_distance(i, group_of[i], layca.step_count) for i in layca.layers.controlled}

    def _next_gain(
        self,
        i: int,
        group: int,
        step: int,
        angle: float,
        efficiency: float,
        lr: float,
        reference: float,
        previous: float | None,
    ) -> float:
        target = self.target
        total = self.curve.total()
        end = min(total, (step // target.interval + 1) * target.interval)
        if end <= step:
            return previous if previous is not None else target.min_rate
        lrs = [self.curve.lr(group, s, lr) / reference for s in range(step, end)]
        mean_lr = sum(lrs) / len(lrs)
        now, later = _angle(self.target_distance(i, group, step)), _angle(self.target_distance(i, group, end))
        want = (later - now) + CORRECTION * (now - angle)
        if want <= 0 or mean_lr <= 0:
            gain = target.min_rate
        else:
            per_step = min(want / (efficiency * len(lrs)), 0.49 * math.pi)
            gain = math.tan(per_step) / mean_lr
        if previous is not None:
            gain = min(max(gain, previous / MAX_CHANGE), previous * MAX_CHANGE)
        return min(max(gain, target.min_rate), target.max_rate)

    def after_step(self, layca: Any, rates: Sequence[float]) -> bool:
        """After a step of ``layca`` taken at ``rates``: count the turning; every ``interval`` steps, measure.

        Returns whether new rates were chosen.
        """
        step = layca.step_count  # counted from 1 after the first step
        controlled, params, group_of, group_lrs, reference = self._arguments(layca)
        relative_lrs = layca.rates.relative_lrs
        for i in controlled:
            gains, effort, relative = self.gains[i] or [], self._effort[i], relative_lrs[i]
            for u, gain in enumerate(gains):
                effort[u] += math.atan(gain * relative)
        if step % self.target.interval != 0 and step != self.curve.total():
            return False
        sums = self.start.sums(controlled, params)
        distances = [distances_of(layer) for layer in sums]
        estimates = {
            i: [self._estimate(i, u, d) for u, d in enumerate(unit_distances)]
            for i, unit_distances in zip(controlled, distances, strict=True)
        }
        if self.target.steer:
            distances = self._steer(controlled, params, sums, distances, estimates, group_of, step)
        stuck: list[tuple[str, str]] = []
        unreachable: list[tuple[str, str]] = []
        for i, unit_distances in zip(controlled, distances, strict=True):
            g, name = group_of[i], self.names[i]
            turn = self.curve.remaining_turn(g, step, group_lrs[g], reference)
            stuck_units, reaches = [], []
            for u, d in enumerate(unit_distances):
                efficiency, measured, moved, _ = estimates[i][u]
                gain, reach = self._control(
                    i, u, g, step, d, efficiency, measured, moved, group_lrs[g], reference, turn
                )
                if not moved:
                    stuck_units.append(u)
                if step < self.curve.total() and self.finals[i] > reach and not self.target.steer:
                    reaches.append(reach)
                cast(list[float], self.gains[i])[u] = gain
            self.targets[i] = self.target_distance(i, g, step)
            if stuck_units:
                units = f" (units {', '.join(map(str, stuck_units))})" if self.per_unit else ""
                stuck.append((name, name + units))
            if reaches:
                what = "its units " if self.per_unit else ""
                unreachable.append((name, f"{name} (target {self.finals[i]:.3g}, {what}reachable {min(reaches):.3g})"))
        self._warn_once("stuck", stuck, STUCK)
        self._warn_once("unreachable", unreachable, UNREACHABLE.format(self.curve.total() - step, self.target.max_rate))
        return True

    def _estimate(self, i: int, u: int, d: float) -> tuple[float, float, bool, float]:
        """One loop (layer ``i``, unit ``u``) measured at ``d``.

        Returns its efficiency (clamped, and as measured), whether it moved, and the angle its steps are estimated to
        have gained since the last measurement (the measured efficiency times the turning spent: negative for a layer
        whose gradient pulls it back towards its initial weights).
        """
        spent, last = self._effort[i][u], self.unit_distances[i][u]
        moved = d != last
        if spent > 0 and moved:
            self._progress[i][u] = MEMORY * self._progress[i][u] + (_angle(d) - _angle(last))
            self._spent[i][u] = MEMORY * self._spent[i][u] + spent
        measured = 1.0 if self._spent[i][u] <= 0 else self._progress[i][u] / self._spent[i][u]
        floor = STEER_EFFICIENCY if self.target.steer else MIN_EFFICIENCY
        return min(1.0, max(floor, measured)), measured, not (spent > 0 and not moved), measured * spent

    def _control(
        self,
        i: int,
        u: int,
        group: int,
        step: int,
        d: float,
        efficiency: float,
        measured: float,
        moved: bool,
        lr: float,
        reference: float,
        turn: float,
    ) -> tuple[float, float]:
        """One loop at a measurement (after steering, at distance ``d``): its next rate, its reachable end."""
        previous_gain = cast(list[float], self.gains[i])[u]
        angle = _angle(d)
        gain = self._next_gain(i, group, step, angle, efficiency, lr, reference, previous_gain)
        if not moved:  # anti-windup: a loop that cannot move keeps its rate
            gain = min(gain, previous_gain)
        self.unit_distances[i][u], self._effort[i][u] = d, 0.0
        # Certain: along a great circle at max_rate. Once at max_rate: at the efficiency measured so far.
        reach = 1.0 - math.cos(
            min(math.pi, angle + (turn if gain < self.target.max_rate else max(0.0, measured) * turn))
        )
        return gain, reach

    def _steer(
        self,
        indices: Sequence[int],
        params: Sequence[torch.Tensor],
        sums: Sequence[torch.Tensor],
        distances: list[list[float]],
        estimates: Mapping[int, Sequence[tuple[float, float, bool, float]]],
        group_of: Mapping[int, int],
        step: int,
    ) -> list[list[float]]:
        """Turn every loop by :func:`steering_turn` (:meth:`StartWeights.rotate`); return the distances after.

        The steered layers are measured again (one more collective when sharded), so that the next interval's
        estimate sees the steps' turning only.
        """
        steered = []
        layer_sums = dict(zip(indices, sums, strict=True))
        for i, unit_distances in zip(indices, distances, strict=True):
            want = _angle(self.target_distance(i, group_of[i], step))
            gains = cast(list[float], self.gains[i])
            deltas = [
                steering_turn(_angle(d), want, *estimates[i][u][1:], at_max_rate=gains[u] >= self.target.max_rate)
                for u, d in enumerate(unit_distances)
            ]
            if any(deltas):
                steered.append((i, deltas))
        if not steered:
            return distances
        for i, deltas in steered:
            self.start.rotate(i, params[i], deltas, layer_sums[i])
            self.steered[i] += math.degrees(sum(abs(x) for x in deltas) / len(deltas))
        turned = [i for i, _ in steered]
        after = dict(zip(turned, self.start.distances(turned, params), strict=True))
        return [after.get(i, d) for i, d in zip(indices, distances, strict=True)]

    def _warn_once(self, kind: str, layers: list[tuple[str, str]], what: str) -> None:
        """Warn about the ``(name, description)`` of layers not warned about for ``kind`` yet."""
        fresh = [(name, text) for name, text in layers if f"{kind}:{name}" not in self._warned]
        if fresh:
            self._warned.update(f"{kind}:{name}" for name, _ in fresh)
            _warn(f"Layca: layers {', '.join(text for _, text in fresh)} {what}.")

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """The controller's state: rates, estimates, horizon, and the initial weights it owns."""
        return {
            "names": list(self.names),
            "per_unit": self.per_unit,
            "gains": [None if g is None else list(g) for g in self.gains],
            "distances": [list(d) for d in self.unit_distances],
            "targets": list(self.targets),
            "steered": list(self.steered),
            "progress": [list(x) for x in self._progress],
            "spent": [list(x) for x in self._spent],
            "effort": [list(x) for x in self._effort],
            "warned": sorted(self._warned),
            "total_steps": self.total_steps,
            "lr_profile": self.lr_profile,
            "initial": self.start.state(self.names),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (for the same layers)."""
        if list(state["names"]) != self.names:
            raise ValueError(
                f"Layca: the rotation target's state was saved for layers {state['names']!r}, but this optimizer "
                f"controls {self.names!r}."
            )
        if bool(state.get("per_unit", False)) != self.per_unit:
            raise ValueError(
                f"Layca: the rotation target's state was saved with per_unit={state.get('per_unit', False)!r}, but "
                f"this optimizer's controller has per_unit={self.per_unit!r} (granularity must match)."
            )

        def floats(rows: Sequence[Sequence[float]]) -> list[list[float]]:
            return [[float(x) for x in row] for row in rows]

        self.gains = [None if g is None else [float(x) for x in g] for g in state["gains"]]
        self.unit_distances = floats(state["distances"])
        self.targets = [float(x) for x in state["targets"]]
        self.steered = [float(x) for x in state.get("steered", [0.0] * len(self.names))]
        self._progress, self._spent = floats(state["progress"]), floats(state["spent"])
        self._effort = floats(state["effort"])
        self._warned = set(state["warned"])
        self.curve.restore(state["total_steps"], state["lr_profile"])
        self.start.load(self.names, state["initial"])
