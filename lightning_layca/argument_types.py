"""The bottom floor: constants and every check of a configurable argument, one function per rule.

Nothing here imports the rest of the package, so every module (the optimizer, the schedules, the callbacks) checks
its arguments with the same function and raises the same exception with the same words, whether the value came from
Python or from a LightningCLI YAML file.

To a type checker the number types below are plain ``float`` and ``int``. At run time they are jsonargparse's
restricted number types, so a value out of range in a YAML file or on the command line is a parse error that names the
argument and the accepted range, before anything is built.

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
    >>> check_positive_int("LayerWarmup", "warmup_steps", 0)
    Traceback (most recent call last):
    ...
    ValueError: LayerWarmup: `warmup_steps` must be a positive integer, got 0.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

__all__ = [
    "DEFAULT_ROTATION_RATE",
    "EQUILIBRIUM",
    "GRANULARITIES",
    "IMPLEMENTATIONS",
    "MAX_ROTATION_RATE",
    "TARGET_SHAPES",
    "Granularity",
    "Implementation",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "RotationRate",
    "SignedOpenUnitInterval",
    "TargetShape",
    "as_optimizer_indices",
    "as_patterns",
    "check_granularity",
    "check_implementation",
    "check_multiplier",
    "check_patterns_match",
    "check_positive_int",
    "check_reference_lr",
    "check_rotation_rate",
    "check_target_distance",
    "check_target_rate",
    "check_target_shape",
]

DEFAULT_ROTATION_RATE = 3**-3
"""The paper's best base rotation rate for SGD-based Layca."""

MAX_ROTATION_RATE = 1e3
"""The largest base rotation rate accepted: ``atan(1000)`` is 89.94 degrees, a quarter turn per step in all but name,
so a larger value is a mistake. Effective rates above it (large multipliers or learning-rate ratios) still compute
without overflow."""

EQUILIBRIUM = "equilibrium"
"""``rotation_rate=EQUILIBRIUM``: each param group's rate is the angular update its optimizer reaches at equilibrium."""

Implementation = Literal["auto", "eager", "compiled"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "eager", "compiled")
"""Accepted values of ``implementation``."""

TargetShape = Literal["lr_integral", "linear"]
TARGET_SHAPES: tuple[str, ...] = ("lr_integral", "linear")
"""Accepted values of a rotation target's ``shape``."""

Granularity = Literal["layer", "unit"]
GRANULARITIES: tuple[str, ...] = ("layer", "unit")
"""Accepted values of ``granularity``."""


def check_rotation_rate(owner: str, rotation_rate: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``0 < rotation_rate <= MAX_ROTATION_RATE``.

    The string ``"equilibrium"`` is accepted too.
    """
    if rotation_rate == EQUILIBRIUM:
        return
    if (
        isinstance(rotation_rate, bool)
        or not isinstance(rotation_rate, int | float)
        or not math.isfinite(rotation_rate)
        or not 0 < rotation_rate <= MAX_ROTATION_RATE
    ):
        raise ValueError(
            f"{owner}: `rotation_rate` must be a number in (0, {MAX_ROTATION_RATE:g}] (a layer turns by "
            f"atan(rotation_rate) per step; the paper's best is 3**-3 = {DEFAULT_ROTATION_RATE:.6g}) or "
            f"'{EQUILIBRIUM}', got {rotation_rate!r}."
        )


def check_reference_lr(owner: str, reference_lr: object, what: str = "`reference_lr`") -> None:
    """Raise ``ValueError`` unless ``reference_lr`` is ``None`` or a positive finite number.

    ``what`` names the value in the message (the argument, or the learning rates it was derived from).
    """
    if reference_lr is None:
        return
    if (
        isinstance(reference_lr, bool)
        or not isinstance(reference_lr, int | float)
        or not math.isfinite(reference_lr)
        or reference_lr <= 0
    ):
        raise ValueError(
            f"{owner}: {what} must be positive and finite to define relative rotation rates, got {reference_lr!r}. "
            "Only the param groups that hold layers need one; pass `reference_lr` to set it explicitly."
        )


def check_granularity(owner: str, granularity: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``granularity`` is ``"layer"`` or ``"unit"``."""
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"{owner}: `granularity` must be 'layer' or 'unit', got {granularity!r}.")


def check_implementation(owner: str, implementation: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``implementation`` is an accepted one."""
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{owner}: `implementation` must be one of {', '.join(repr(x) for x in IMPLEMENTATIONS)}, "
            f"got {implementation!r}."
        )


def check_target_distance(what: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a cosine distance a layer can be steered to: a number in ``(0, 2)``.

    ``what`` names the value in the message, for example ``"RotationTarget: `final`"``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value < 2:
        raise ValueError(
            f"{what} must be a cosine distance to the initial weights in the open interval (0, 2), got {value!r}."
        )


def check_target_shape(owner: str, shape: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``shape`` is an accepted target shape."""
    if not isinstance(shape, str) or shape not in TARGET_SHAPES:
        raise ValueError(f"{owner}: `shape` must be one of {', '.join(repr(x) for x in TARGET_SHAPES)}, got {shape!r}.")


def check_target_rate(owner: str, name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a rate a controller may set: a number in ``(0, MAX_ROTATION_RATE]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_ROTATION_RATE
    ):
        raise ValueError(f"{owner}: `{name}` must be a number in (0, {MAX_ROTATION_RATE:g}], got {value!r}.")


def check_positive_int(owner: str, name: str, value: object, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive ``int`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {accepted}, got {value!r}.")


def as_optimizer_indices(owner: str, optimizers: int | Sequence[int] | None) -> list[int] | None:
    """Return ``optimizers`` (``None``: all, one index or a non-empty sequence of them) as sorted distinct indices.

    Raises ``ValueError`` for anything else, a negative index or a ``bool`` among them.
    """
    indices = [optimizers] if isinstance(optimizers, int) else optimizers
    if indices is not None and (
        isinstance(indices, str)
        or not indices
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices)
    ):
        raise ValueError(
            f"{owner}: `optimizers` must be None (wrap all), a non-negative index or a non-empty list of them, got "
            f"{optimizers!r}."
        )
    return None if indices is None else sorted({int(i) for i in indices})


def check_multiplier(what: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite non-negative number (a rotation-rate multiplier)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}.")


def as_patterns(what: str, patterns: object) -> list[str]:
    """Return ``patterns`` (``None``, one pattern or a sequence of them) as a list; ``ValueError`` otherwise.

    ``what`` names the argument in the message, for example ``"LayerRotationMonitor: `include`"``.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{what} must be a string or a list of strings, got {patterns!r}.")
    return list(patterns)


def check_patterns_match(what: str, patterns: Sequence[str], names: Sequence[str], kind: str) -> None:
    """Raise ``ValueError`` listing ``names`` when one of the ``fnmatch`` ``patterns`` matches none of them.

    ``what`` names the patterns in the message (``"`include`"``, ``"ByName:"``), ``kind`` what the names are
    (``"parameter"``, ``"layer"``): the one check of every name pattern, the layer selection's and the schedules'.

    Example:
        >>> check_patterns_match("`include`", ["fc*"], ["conv.weight", "head.weight"], "parameter")
        Traceback (most recent call last):
        ...
        ValueError: `include` pattern 'fc*' matches no parameter. Available names: conv.weight, head.weight.
    """
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):  # as the selection matches
            raise ValueError(f"{what} pattern {pattern!r} matches no {kind}. Available names: {', '.join(names)}.")


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
