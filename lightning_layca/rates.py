"""The rotation rate of every layer: ``rho_l(t) = rotation_rate * m_l(t) * lr_g(t) / lr_ref``.

* ``m_l(t)``: the schedule's multiplier, evaluated on the host only when its :meth:`cache_key
  <lightning_layca.RotationSchedule.cache_key>` changes;
* ``lr_g(t) / lr_ref``: the relative learning rate of the layer's param group, against the reference learning rate
  (by default the largest peak learning rate of the param groups holding layers, fixed at the first step);
* under a rotation target, ``rotation_rate * m_l(t)`` is replaced by the rate ``g_l`` its controller chose
  (:class:`lightning_layca.target_controller.TargetController`);
* under ``rotation_rate="equilibrium"`` each param group's base rate is its optimizer's equilibrium rate
  (:func:`lightning_layca.step.families.equilibrium_rate`), from its current lr.

The host values carry a :attr:`Rates.version` that increases when they change, so that a device copy is made only
then (never a host-to-device copy per step otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

from torch.optim import Optimizer

from lightning_layca.argument_types import EQUILIBRIUM, check_reference_lr
from lightning_layca.schedules import RotationSchedule
from lightning_layca.step.families import equilibrium_rate
from lightning_layca.target_controller import TargetController
from lightning_layca.targets import RotationTarget

__all__ = ["PER_UNIT_TARGET_EAGER", "Rates", "peak_lr"]

PER_UNIT_TARGET_EAGER = (
    "under a rotation target with granularity='unit' every unit has a rate of its own, which the eager step reads "
    "per row and the compiled kernels (one rate per layer) do not; these layers take the eager step"
)
"""Why a per-unit rotation target takes the eager step (``Layca.describe()`` shows ``"eager"``)."""


def peak_lr(group: dict[str, Any]) -> float:
    """Return the learning rate a param group peaks at, as far as the group records it.

    ``OneCycleLR`` records its peak as ``max_lr``; other schedulers record the lr they started from as
    ``initial_lr``; without a scheduler the group's ``lr`` is taken.
    """
    return float(group.get("max_lr", group.get("initial_lr", group.get("lr", 1.0))))


class Rates:
    """The schedule cache, the reference learning rate and the versioned host rates of one optimizer.

    Args:
        rotation_rate: The base rate, or ``"equilibrium"``.
        schedule: The rotation schedule.
        reference_lr: The reference learning rate, or ``None`` to fix it at the first step.
        target: A rotation target, whose controller then chooses the rates.
        names: The candidate layers' names, in depth order (the schedule and the target are checked against them).
        per_unit: Under ``granularity="unit"``: the target's controller gives every unit a rate of its own.
    """

    def __init__(
        self,
        rotation_rate: float | str,
        schedule: RotationSchedule,
        reference_lr: float | None,
        target: RotationTarget | None = None,
        names: Sequence[str] = (),
        per_unit: bool = False,
    ) -> None:
        schedule.validate(list(names))
        self.rotation_rate: float | str = EQUILIBRIUM if rotation_rate == EQUILIBRIUM else float(rotation_rate)
        self.schedule = schedule
        self.reference_lr = None if reference_lr is None else float(reference_lr)
        self.version = 0
        """Increases whenever :meth:`current` returns other values than before."""
        self._schedule_key: Hashable = object()
        self._multipliers: list[float] = []
        self.rates: list[float] = []
        """Per candidate layer, ``rho_l(t)`` as of the latest :meth:`current` (0 outside every param group)."""
        self.relative_lrs: list[float] = []
        """Per candidate layer, ``lr_g(t) / lr_ref`` likewise."""
        self.unit_rates: list[list[float]] | None = None
        """Under a per-unit target: per candidate layer, ``rho`` of each of its units (:attr:`rates` holds their mean,
        what is logged); else ``None``."""
        self.controller = None if target is None else TargetController(target, names, per_unit)
        """The controller of a rotation target, whose rates replace ``rotation_rate * m_l(t)``."""

    def default_reference_lr(self, param_groups: list[dict[str, Any]], holding: Sequence[int]) -> float:
        """The largest peak learning rate among the param groups at ``holding`` (``ValueError`` if not positive)."""
        peaks = [peak_lr(param_groups[g]) for g in sorted(set(holding))]
        lr = max(peaks, default=0.0)
        check_reference_lr("Layca", lr, f"the learning rates of the param groups holding layers ({peaks})")
        return lr

    def fix_reference_lr(self, param_groups: list[dict[str, Any]], holding: Sequence[int]) -> None:
        """Fix the reference learning rate now, if it is not set yet and some param group holds layers."""
        if self.reference_lr is None and holding:
            self.reference_lr = self.default_reference_lr(param_groups, holding)

    def check_equilibrium(self, optimizer: Optimizer, holding: Sequence[int]) -> None:
        """Under ``"equilibrium"``: raise ``ValueError`` now for a param group the formula cannot serve."""
        if self.rotation_rate == EQUILIBRIUM:
            for g in sorted(set(holding)):
                equilibrium_rate(optimizer, optimizer.param_groups[g])

    @property
    def eager_reason(self) -> str | None:
        """Why every layer must take the eager step (:data:`PER_UNIT_TARGET_EAGER`), or ``None``."""
        per_unit = self.controller is not None and self.controller.per_unit
        return PER_UNIT_TARGET_EAGER if per_unit else None

    def check(self, optimizer: Optimizer, layers: Any) -> None:
        """Raise ``ValueError`` now for learning rates unfit for the rates of ``layers`` (a layer registry).

        An unusable reference learning rate, or a param group the equilibrium formula cannot serve.
        """
        holding = list(layers.param_group_of.values())
        if layers.controlled and self.reference_lr is None:
            self.default_reference_lr(optimizer.param_groups, holding)
        self.check_equilibrium(optimizer, holding)

    def of(self, layca: Any) -> list[float]:
        """:meth:`current` for a ``Layca``: its candidate layers, param groups, optimizer, step and epoch."""
        layers = layca.layers
        return self.current(layers.names, layers.param_group_of, layca.optimizer, layca.step_count, layca.epoch)

    def resize(self, names: Sequence[str]) -> None:
        """Take the candidate layers again (a param group added layers): the schedule and the target checked."""
        self.schedule.validate(list(names))
        if self.controller is not None:
            self.controller.resize(names)
        self.invalidate()

    def prepare(self, layca: Any, fix_reference: bool = True) -> None:
        """Before a step of ``layca`` (a ``Layca``): fix the reference lr, let the controller take new layers."""
        if fix_reference:
            self.fix_reference_lr(layca.param_groups, list(layca.layers.param_group_of.values()))
        if self.controller is not None:
            self.controller.prepare(layca)

    def after_step(self, layca: Any, rates: Sequence[float]) -> None:
        """After a step of ``layca`` taken at ``rates``: the controller counts it (and measures every interval)."""
        if self.controller is not None:
            self.controller.after_step(layca, rates)

    def state(self) -> dict[str, Any]:
        """The part of Layca's state the rates keep: the controller's, under ``"target"`` (nothing without one)."""
        return {} if self.controller is None else {"target": self.controller.state()}

    def load(self, layca: dict[str, Any]) -> None:
        """Restore the reference lr and :meth:`state` from Layca's state; re-evaluate the rates at the next step."""
        reference_lr = layca["reference_lr"]
        self.reference_lr = None if reference_lr is None else float(reference_lr)
        if self.controller is not None and "target" in layca:
            self.controller.load(layca["target"])
        self.invalidate()

    def invalidate(self) -> None:
        """Re-evaluate the schedule and the rates at the next :meth:`current` (after a state was loaded)."""
        self._schedule_key = object()
        self.rates = []

    def current(
        self,
        names: list[str],
        param_group_of: dict[int, int],
        optimizer: Optimizer,
        step: int,
        epoch: int,
    ) -> list[float]:
        """Return the rates of every candidate layer (0 for those outside every param group); see the module.

        Args:
            names: The candidate layers' names, in depth order (what the schedule maps).
            param_group_of: Candidate index -> param group index, for the candidates in a param group.
            optimizer: The wrapped optimizer.
            step: Layca's step count (what step-based schedules read).
            epoch: The current epoch.

        Raises:
            ValueError: When the schedule returns other than one finite non-negative multiplier per layer.
        """
        key = self.schedule.cache_key(step, epoch)
        if key != self._schedule_key and self.controller is None:
            multipliers = [float(m) for m in self.schedule.multipliers(names, step, epoch)]
            if len(multipliers) != len(names) or not all(math.isfinite(m) and m >= 0 for m in multipliers):
                raise ValueError(
                    f"Layca: schedule {self.schedule!r} returned {multipliers!r}; expected "
                    f"{len(names)} finite non-negative multipliers."
                )
            self._multipliers = multipliers
            self._schedule_key = key
        groups = optimizer.param_groups
        if self.reference_lr is not None:
            reference = self.reference_lr
        elif param_group_of:
            reference = self.default_reference_lr(groups, list(param_group_of.values()))
        else:  # no layer in any param group yet (every layer frozen): nothing to rotate
            reference = 1.0
        relative_lrs = [0.0] * len(names)
        for i, g in param_group_of.items():
            relative_lrs[i] = float(groups[g]["lr"]) / reference
        unit_rates = None
        if self.controller is not None:
            gains = self.controller.layer_gains()
            rates = [g * r for g, r in zip(gains, relative_lrs, strict=True)]
            if self.controller.per_unit:
                units = self.controller.gains
                unit_rates = [[g * r for g in (u or [])] for u, r in zip(units, relative_lrs, strict=True)]
        elif self.rotation_rate == EQUILIBRIUM:
            base = [0.0] * len(names)
            group_rates = {g: equilibrium_rate(optimizer, groups[g]) for g in set(param_group_of.values())}
            for i, g in param_group_of.items():
                base[i] = group_rates[g]
            rates = [m * r for m, r in zip(self._multipliers, base, strict=True)]
        else:
            rate = float(self.rotation_rate)
            rates = [rate * m * r for m, r in zip(self._multipliers, relative_lrs, strict=True)]
        if rates != self.rates or relative_lrs != self.relative_lrs or unit_rates != self.unit_rates:
            self.rates, self.relative_lrs, self.unit_rates = rates, relative_lrs, unit_rates
            self.version += 1
        return rates
