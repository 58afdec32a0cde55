"""Every name the library writes to a logger, in one scheme: ``<Quantity>/<layer>``.

A quantity is a snake_case noun with a capital first letter; ``<layer>`` is the parameter's name without a trailing
``.weight`` (:func:`lightning_layca.selection.layer_display_name`). One example is enough to guess the rest:
``Rotation/net.conv1`` is the cosine distance of ``net.conv1`` to its initial weights, ``Weight_norm/net.conv1`` its
L2 norm, ``Rotation_rate/net.conv1`` the rate Layca set for it (the constructor's argument of that name). A summary
over the layers is ``<Quantity>_summary/<statistic>`` (``Rotation_summary/mean``); a figure is named after its
quantity (``Rotation_curves``).

Why the capital: TensorBoard's Time Series dashboard opens on the tag group (the part of a tag before the first ``/``)
that sorts first by character code. Capitals sort before the lowercase names of Lightning (``epoch``) and of most
models (``train_loss``), and ``Rotation`` sorts first among the library's own names, so the first screen shows the
rotation of every layer.

Example:
    >>> layer_tag(ROTATION, "net.conv1")
    'Rotation/net.conv1'
    >>> summary_tag(ROTATION, "mean")
    'Rotation_summary/mean'
"""

from __future__ import annotations

__all__ = [
    "LEGACY_NAMES",
    "MAGNITUDE_CHANGE",
    "ROTATION",
    "ROTATION_CURVES",
    "ROTATION_RATE",
    "ROTATION_STEERED",
    "ROTATION_TARGET",
    "STEP_ROTATION",
    "SUMMARY_STATISTICS",
    "UNIT_ANGLE",
    "UNIT_STEP_ROTATION",
    "UPDATE_RATIO",
    "UPDATE_RATIO_CURVES",
    "UPDATE_RATIO_RADIAL",
    "UPDATE_RATIO_REFERENCE",
    "UPDATE_RATIO_TANGENTIAL",
    "WEIGHT_NORM",
    "figure_tag",
    "layer_tag",
    "summary_tag",
]

ROTATION = "Rotation"
"""Scalar: cosine distance of a layer's weights to its initial weights, in [0, 2]."""

ROTATION_RATE = "Rotation_rate"
"""Scalar: the rate Layca set for a layer on that step (tan of the angle it turns it by)."""

ROTATION_TARGET = "Rotation_target"
"""Scalar: the closed-loop target of :data:`ROTATION` for a layer on that step."""

ROTATION_STEERED = "Rotation_steered"
"""Scalar: the total angle (degrees) a steering rotation target has turned a layer by so far, beyond its steps."""

STEP_ROTATION = "Step_rotation"
"""Scalar: tan of the angle the latest optimizer step turned a layer (any optimizer)."""

UPDATE_RATIO = "Update_ratio"
"""Scalar: log10 of ``||dW|| / ||W||`` of the latest optimizer step (``W`` before the step)."""

UPDATE_RATIO_TANGENTIAL = "Update_ratio_tangential"
"""Scalar: log10 of the part of :data:`UPDATE_RATIO` orthogonal to the weights."""

UPDATE_RATIO_RADIAL = "Update_ratio_radial"
"""Scalar: log10 of the part of :data:`UPDATE_RATIO` along the weights."""

WEIGHT_NORM = "Weight_norm"
"""Scalar: L2 norm of a layer's weights."""

UNIT_ANGLE = "Unit_angle"
"""Histogram: the angle (degrees) each output unit of a layer turned since its initial weights."""

UNIT_STEP_ROTATION = "Unit_step_rotation"
"""Histogram: tan of the angle the latest optimizer step turned each output unit of a layer."""

MAGNITUDE_CHANGE = "Magnitude_change"
"""Scalar: DoRA's relative change of an adapted layer's magnitudes, ``||m - m0|| / ||m0||``."""

ROTATION_CURVES = "Rotation_curves"
"""Image: the rotation curves of every layer, coloured by depth (the paper's figure)."""

UPDATE_RATIO_CURVES = "Update_ratio_curves"
"""Image: :data:`UPDATE_RATIO` of every layer over the logging steps, coloured by depth, with the reference line."""

UPDATE_RATIO_REFERENCE = -3.0
"""The usual reference of :data:`UPDATE_RATIO`: a step of a thousandth of the weights' norm."""

SUMMARY_STATISTICS = ("mean", "min", "max")
"""The statistics of a summary over the layers, in the order they are written."""

LEGACY_NAMES = {
    "Layer_rotation/<layer>": "Rotation/<layer>",
    "Layer_rotation_summary/{mean,min,max}": "Rotation_summary/{mean,min,max}",
    "Layer_rotation_curves": "Rotation_curves",
    "layca/rate/<layer>": "Rotation_rate/<layer>",
    "layer_rotation_rate/<layer>": "Step_rotation/<layer>",
    "layer_norm/<layer>": "Weight_norm/<layer>",
    "layer_angles/<layer>": "Unit_angle/<layer>",
    "layer_unit_rotation_rate/<layer>": "Unit_step_rotation/<layer>",
}
"""The names of earlier versions and the names that replace them (the changelog's table)."""


def layer_tag(quantity: str, layer: str) -> str:
    """The tag of ``quantity`` for ``layer``: ``<Quantity>/<layer>``."""
    return f"{quantity}/{layer}"


def summary_tag(quantity: str, statistic: str, label: str | None = None) -> str:
    """The tag of a summary of ``quantity`` over the layers: ``<Quantity>_summary/<statistic>``.

    ``label`` names the monitor's subset of layers when several monitors share a Trainer:
    ``<Quantity>_summary/<label>/<statistic>``.

    Example:
        >>> summary_tag(UPDATE_RATIO, "max", label="head*")
        'Update_ratio_summary/head*/max'
    """
    return f"{quantity}_summary/{statistic}" if label is None else f"{quantity}_summary/{label}/{statistic}"


def figure_tag(figure: str, label: str | None = None) -> str:
    """The tag of a figure, ``<Quantity>_curves``, or ``<Quantity>_curves/<label>`` for a labelled monitor."""
    return figure if label is None else f"{figure}/{label}"
