"""Number types of the configurable arguments: range-checked while LightningCLI parses a configuration.

To a type checker these are plain ``float`` and ``int``. At run time they are jsonargparse's restricted number types,
so a value out of range in a YAML file or on the command line is a parse error that names the argument and the
accepted range, before anything is built. The constructors check the same ranges for calls from Python.

Example:
    >>> SignedOpenUnitInterval(-0.6)
    -0.6
    >>> SignedOpenUnitInterval(1.5)
    Traceback (most recent call last):
    ...
    ValueError: 1.5 is not in the open interval (-1, 1)
    >>> RotationRate(0)
    Traceback (most recent call last):
    ...
    ValueError: 0 is not in (0, 1000]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

__all__ = [
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "RotationRate",
    "SignedOpenUnitInterval",
]

if TYPE_CHECKING:
    NonNegativeFloat = float
    NonNegativeInt = int
    PositiveFloat = float
    PositiveInt = int
    RotationRate = float
    SignedOpenUnitInterval = float
else:
    from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, extend_base_type

    def _check_signed_open_unit_interval(cls: type, value: Any) -> None:
        number = float(value)  # a string that is not a number fails here, with Python's message
        if isinstance(value, bool) or not (math.isfinite(number) and -1.0 < number < 1.0):
            raise ValueError(f"{value} is not in the open interval (-1, 1)")

    def _check_rotation_rate(cls: type, value: Any) -> None:
        from lightning_layca.layca import MAX_ROTATION_RATE  # here: importing the optimizer imports this module

        number = float(value)
        if isinstance(value, bool) or not (math.isfinite(number) and 0.0 < number <= MAX_ROTATION_RATE):
            raise ValueError(f"{value} is not in (0, {MAX_ROTATION_RATE:g}]")

    SignedOpenUnitInterval = extend_base_type(
        "SignedOpenUnitInterval",
        float,
        _check_signed_open_unit_interval,
        docstring="float restricted to the open interval (-1, 1)",
    )
    RotationRate = extend_base_type(
        "RotationRate",
        float,
        _check_rotation_rate,
        docstring="float restricted to (0, MAX_ROTATION_RATE]: a layer turns by atan(rate) radians per step",
    )
    # Found by pickle under this module's names.
    SignedOpenUnitInterval.__module__ = RotationRate.__module__ = __name__
