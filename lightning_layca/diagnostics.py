"""What Layca warns about while it steps, once per layer: steps that rounding blurs, and paths that do not apply.

The near-floor flags are set on the device by the rule (:func:`lightning_layca.step.rule.coefficients`) and read here:
every step on CPU (at no cost), every :data:`FLOOR_CHECK_EVERY` steps on accelerators (reading them synchronises).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from lightning_layca.argument_types import EQUILIBRIUM
from lightning_layca.step.rule import LOW_PRECISION, NEAR_FLOOR_FACTOR

__all__ = ["FLOOR_CHECK_EVERY", "Diagnostics"]

FLOOR_CHECK_EVERY = 100
"""On accelerators, the host reads the near-floor flags every this many steps (on CPU: every step, at no cost)."""


class Diagnostics:
    """The warnings of one :class:`~lightning_layca.Layca`, each given once (per layer where it names layers)."""

    def __init__(self) -> None:
        self._near_floor: set[str] = set()
        self._once: set[str] = set()

    def once(self, key: str, message: str, stacklevel: int = 4) -> None:
        """Warn ``message`` unless the warning ``key`` was given already."""
        if key not in self._once:
            self._once.add(key)
            warnings.warn(message, stacklevel=stacklevel)

    def near_floor(
        self,
        flags: Sequence[tuple[torch.Tensor, list[int]]],
        names: list[str],
        layers: list[torch.Tensor],
        step_count: int,
        rotation_rate: float | str,
    ) -> None:
        """Warn once for the layers whose steps came near the rounding floor.

        Args:
            flags: Per bucket, its near-floor flags (a bool tensor per layer) and the candidate index of each layer.
            names: The candidates' names.
            layers: The candidates.
            step_count: Layca's step count (on accelerators the flags are read every few steps only).
            rotation_rate: The base rate (the advice differs under ``"equilibrium"``).
        """
        flagged: list[int] = []
        for near, indices in flags:
            if near.device.type != "cpu" and step_count % FLOOR_CHECK_EVERY != 1:
                continue
            flagged += [i for i, flag in zip(indices, near.tolist(), strict=True) if flag]
        new = [i for i in flagged if names[i] not in self._near_floor]
        if not new:  # one warning for the layers flagged together, never twice for a layer
            return
        self._near_floor.update(names[i] for i in new)
        listed = ", ".join(repr(names[i]) for i in new)
        dtypes = sorted({str(layers[i].dtype).removeprefix("torch.") for i in new})
        if rotation_rate == EQUILIBRIUM:  # the learning rate also sets the rotation rate
            advice = (
                "Under rotation_rate='equilibrium' the learning rate also sets the rotation rate, so raising it "
                "changes the recipe: give the rotation rate as a number and raise the base learning rate instead."
            )
        else:
            advice = "Raise the base optimizer's learning rate: Layca's step does not depend on its magnitude."
        if any(layers[i].dtype in LOW_PRECISION for i in new):
            advice += " Or keep float32 weights (Lightning's precision='bf16-mixed' rather than 'bf16-true')."
        warnings.warn(
            f"Layca: the base optimizer's steps for layer(s) {listed} are within {NEAR_FLOOR_FACTOR:g}x of what "
            f"{'/'.join(dtypes)} rounding of `w + step` can resolve, so rounding blurs their direction by more than "
            f"about 1% (and a step below that floor does not move a layer at all). {advice}",
            stacklevel=4,
        )
