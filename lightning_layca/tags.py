"""Every name the library writes to a logger, in one scheme: ``<quantity>/<layer>``.

A quantity is a lowercase snake_case noun; ``<layer>`` is the parameter's name without a trailing ``.weight``
(:func:`lightning_layca.selection.layer_display_name`). One
example is enough to guess the rest: ``rotation/net.conv1`` is the cosine distance of ``net.conv1`` to its initial
weights, ``weight_norm/net.conv1`` its L2 norm, ``rotation_rate/net.conv1`` the rate Layca set for it (the
constructor's argument of that name). The rotation comes first in TensorBoard, which orders sections by name:
every other section sorts after ``rotation``.

Example:
    >>> layer_tag(ROTATION, "net.conv1")
    'rotation/net.conv1'
"""

from __future__ import annotations

__all__ = [
    "MAGNITUDE_CHANGE",
    "ROTATION",
    "ROTATION_CURVES",
    "ROTATION_RATE",
    "ROTATION_SUMMARY",
    "ROTATION_TARGET",
    "STEP_ROTATION",
    "UNIT_ANGLE",
    "UNIT_STEP_ROTATION",
    "UPDATE_RATIO",
    "UPDATE_RATIO_RADIAL",
    "UPDATE_RATIO_TANGENTIAL",
    "WEIGHT_NORM",
    "layer_tag",
]

ROTATION = "rotation"
"""Scalar: cosine distance of a layer's weights to its initial weights, in [0, 2]."""

ROTATION_SUMMARY = "rotation_summary"
"""Scalars ``mean``, ``min`` and ``max`` of :data:`ROTATION` over the monitored layers."""

ROTATION_RATE = "rotation_rate"
"""Scalar: the rate Layca set for a layer on that step (tan of the angle it turns it by)."""

ROTATION_TARGET = "rotation_target"
"""Scalar: the closed-loop target of :data:`ROTATION` for a layer on that step."""

STEP_ROTATION = "step_rotation"
"""Scalar: tan of the angle the latest optimizer step turned a layer (any optimizer)."""

UPDATE_RATIO = "update_ratio"
"""Scalar: log10 of ``||dW|| / ||W||`` of the latest optimizer step."""

UPDATE_RATIO_TANGENTIAL = "update_ratio_tangential"
"""Scalar: log10 of the part of :data:`UPDATE_RATIO` orthogonal to the weights."""

UPDATE_RATIO_RADIAL = "update_ratio_radial"
"""Scalar: log10 of the part of :data:`UPDATE_RATIO` along the weights."""

WEIGHT_NORM = "weight_norm"
"""Scalar: L2 norm of a layer's weights."""

UNIT_ANGLE = "unit_angle"
"""Histogram: the angle (degrees) each output unit of a layer turned since its initial weights."""

UNIT_STEP_ROTATION = "unit_step_rotation"
"""Histogram: tan of the angle the latest optimizer step turned each output unit of a layer."""

MAGNITUDE_CHANGE = "magnitude_change"
"""Scalar: DoRA's relative change of an adapted layer's magnitudes, ``||m - m0|| / ||m0||``."""

ROTATION_CURVES = "rotation_curves"
"""Image: the rotation curves of every layer, coloured by depth (the paper's figure)."""


def layer_tag(quantity: str, layer: str) -> str:
    """The tag of ``quantity`` for ``layer``: ``<quantity>/<layer>``."""
    return f"{quantity}/{layer}"
