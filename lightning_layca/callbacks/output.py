"""What a rotation monitor writes: the scalars of a logging step, the TensorBoard layout, histograms and figures.

:func:`step_scalars` turns per-layer measurements into the scalars of a logging step (a summary over the layers, and
each layer's value where asked; :func:`rotation_scalars` for the rotation, :func:`per_step_by_layer` for what one
optimizer step did). :class:`RotationOutput` is the monitor's writer, by composition: the monitor decides
what is measured and when, this class turns it into the custom-scalars layout, TensorBoard histograms, the
``Rotation_curves`` and ``Update_ratio_curves`` images and their PNG copies, and says once what it cannot write (no
TensorBoard logger, no matplotlib, a layer whose weights are not finite). Everything here runs on global rank 0 and
issues no collective. Every name comes from :mod:`lightning_layca.tags`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_layca import tags
from lightning_layca.callbacks.records import RotationRecords
from lightning_layca.figures import (
    PLOT_EXTRA_HINT,
    render_rgb,
    rotation_curves_figure,
    update_ratio_figure,
    write_png,
)
from lightning_layca.loggers import add_histograms, add_image, add_layout, log_directory, tensorboard_writers
from lightning_layca.rotation import Measured, angle_histograms
from lightning_layca.selection import layer_display_name

__all__ = [
    "FIGURE_FILENAME",
    "LAYERS_PER_CHART",
    "PER_STEP_QUANTITIES",
    "UPDATE_RATIO_FILENAME",
    "RotationOutput",
    "layout",
    "per_step_by_layer",
    "per_step_values",
    "rotation_scalars",
    "step_scalars",
    "update_ratio_parts",
]

FIGURE_FILENAME = "layer_rotation_curves.png"
"""Name of the PNG copy of the rotation figure in the log directory."""

UPDATE_RATIO_FILENAME = "update_ratio_curves.png"
"""Name of the PNG copy of the update-ratio figure in the log directory."""

LAYERS_PER_CHART = 6
"""Layers per custom-scalars chart: TensorBoard draws every curve of one chart in one colour, so a chart holds a few
neighbouring layers (its title names the first and the last), and the charts follow the depth."""

_CHART_TITLES = {
    tags.ROTATION: "cosine distance to initialisation",
    tags.ROTATION_RATE: "rate set by Layca (tan of the angle)",
    tags.ROTATION_STEERED: "angle turned by steering so far (degrees)",
    tags.STEP_ROTATION: "rotation of the latest step (tan of the angle)",
    tags.UPDATE_RATIO: "log10 ||dW|| / ||W|| (reference -3)",
    tags.UPDATE_RATIO_TANGENTIAL: "log10 ||dW|| / ||W||, tangential part",
    tags.UPDATE_RATIO_RADIAL: "log10 ||dW|| / ||W||, radial part",
    tags.WEIGHT_NORM: "L2 norm",
}


PER_STEP_QUANTITIES = (
    tags.STEP_ROTATION,
    tags.UPDATE_RATIO,
    tags.UPDATE_RATIO_TANGENTIAL,
    tags.UPDATE_RATIO_RADIAL,
    tags.WEIGHT_NORM,
)
"""What a monitor logs of the latest optimizer step on a logging step, in the order of its charts."""


def per_step_values(measured: Measured) -> dict[str, list[float]]:
    """The values of :data:`PER_STEP_QUANTITIES` in one measurement, one per measured layer, by quantity."""
    values = (measured.tans, measured.update_ratios, measured.tangential_ratios, measured.radial_ratios, measured.norms)
    return dict(zip(PER_STEP_QUANTITIES, values, strict=True))


def per_step_by_layer(measured: Measured, layers: Sequence[str]) -> dict[str, dict[str, float]]:
    """:func:`per_step_values` by quantity, then by layer display name (``layers``: those whose step was measured)."""
    return {quantity: dict(zip(layers, v, strict=True)) for quantity, v in per_step_values(measured).items()}


def update_ratio_parts(per_step: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[float, float, float]]:
    """Layer display name -> ``(total, tangential, radial)`` update ratio, from :func:`per_step_by_layer`."""
    total, tangential, radial = (
        per_step[q] for q in (tags.UPDATE_RATIO, tags.UPDATE_RATIO_TANGENTIAL, tags.UPDATE_RATIO_RADIAL)
    )
    return {name: (value, tangential[name], radial[name]) for name, value in total.items()}


def rotation_scalars(
    rotation: Mapping[str, float], magnitude_changes: Mapping[str, float], label: str | None = None
) -> dict[str, float]:
    """The rotation scalars of a logging step: every layer's and their summary, and each DoRA layer's magnitude change.

    Args:
        rotation: Layer display name -> cosine distance to its initial weights.
        magnitude_changes: Adapted layer parameter name -> the change of its magnitude vector (DoRA).
        label: The monitor's label (several monitors on one Trainer), or ``None``.
    """
    metrics = step_scalars(tags.ROTATION, rotation, label)
    changes = magnitude_changes.items()
    metrics.update({tags.layer_tag(tags.MAGNITUDE_CHANGE, layer_display_name(name)): v for name, v in changes})
    return metrics


def step_scalars(
    quantity: str, values: Mapping[str, float], label: str | None = None, per_layer: bool = True
) -> dict[str, float]:
    """The scalars of ``quantity`` on a logging step: mean, min and max over the finite values, and each layer's.

    Args:
        quantity: The quantity's name (:mod:`lightning_layca.tags`).
        values: Layer display name -> value.
        label: The monitor's label (several monitors on one Trainer), or ``None``.
        per_layer: Whether to write ``<Quantity>/<layer>`` too.

    Example:
        >>> step_scalars("Rotation", {"a": 0.1, "b": 0.3}, per_layer=False)
        {'Rotation_summary/mean': 0.2, 'Rotation_summary/min': 0.1, 'Rotation_summary/max': 0.3}
    """
    metrics = {tags.layer_tag(quantity, name): value for name, value in values.items()} if per_layer else {}
    finite = [v for v in values.values() if v == v and abs(v) != float("inf")]
    if finite:
        summary = (sum(finite) / len(finite), min(finite), max(finite))
        for statistic, value in zip(tags.SUMMARY_STATISTICS, summary, strict=True):
            metrics[tags.summary_tag(quantity, statistic, label)] = value
    return metrics


def _exact(tag_list: Sequence[str]) -> str:
    return "|".join(f"^{re.escape(tag)}$" for tag in tag_list)


def layout(
    layers: Sequence[str], per_step: Sequence[str], per_layer: bool, label: str | None = None
) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars categories of one monitor: category -> chart title -> ``[kind, [tag regexes]]``.

    The first category has one summary chart per quantity (the mean over the layers, with a band from the min to the
    max): the rotation, then ``per_step``; the second the rotation of the layers, :data:`LAYERS_PER_CHART` to a chart
    by depth; with ``per_layer`` every per-step quantity also has its category of per-layer charts.

    Args:
        layers: Display names of every layer the monitor may measure, in depth order.
        per_step: The per-step quantities the monitor logs (:mod:`lightning_layca.tags` names).
        per_layer: Whether the per-step quantities are logged for every layer too.
        label: The monitor's label, or ``None``.
    """
    suffix = "" if label is None else f" ({label})"
    quantities = [tags.ROTATION, *per_step]

    def summary_chart(quantity: str) -> list[Any]:
        # A margin chart names its three tags exactly (value, lower, upper), not by regex.
        return ["Margin", [tags.summary_tag(quantity, s, label) for s in tags.SUMMARY_STATISTICS]]

    def layer_charts(quantity: str) -> dict[str, list[Any]]:
        charts = {}
        for start in range(0, len(layers), LAYERS_PER_CHART):
            chunk = layers[start : start + LAYERS_PER_CHART]
            span = chunk[0] if len(chunk) == 1 else f"{chunk[0]} … {chunk[-1]}"
            title = f"{quantity}, layers {start + 1}-{start + len(chunk)} of {len(layers)}: {span}"
            charts[title] = ["Multiline", [_exact([tags.layer_tag(quantity, name) for name in chunk])]]
        return charts

    summaries = {
        f"{quantity}: {_CHART_TITLES.get(quantity, quantity)}": summary_chart(quantity) for quantity in quantities
    }
    categories = {
        f"Mean over layers, band from min to max{suffix}": summaries,
        f"{tags.ROTATION}: {_CHART_TITLES[tags.ROTATION]}, {LAYERS_PER_CHART} layers per chart{suffix}": layer_charts(
            tags.ROTATION
        ),
    }
    if per_layer:
        for quantity in per_step:
            title = f"{quantity}: {_CHART_TITLES.get(quantity, quantity)}, {LAYERS_PER_CHART} layers per chart{suffix}"
            categories[title] = layer_charts(quantity)
    return categories


def _file_name(name: str, label: str | None) -> str:
    if label is None:
        return name
    stem, dot, extension = name.rpartition(".")
    return f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}{dot}{extension}"


class RotationOutput:
    """The histograms, figures and layout of one monitor, with the warnings each may need (each said once).

    Args:
        owner: The name warnings start with (the callback's class name).
        histogram_bins: Bins of every histogram.

    Attributes:
        label: The monitor's label when several monitors share the Trainer (in the tags of its summaries and figures
            and in its PNG file names), else ``None``.
    """

    def __init__(self, owner: str, histogram_bins: int) -> None:
        self.owner = owner
        self.histogram_bins = histogram_bins
        self.label: str | None = None
        self._warned: set[str] = set()  # what was warned about: "tensorboard", "matplotlib", layers not finite
        self._layouts_written: set[int] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{self.owner}: {message}")

    def start(self, trainer: pl.Trainer, wants_tensorboard: bool, categories: Mapping[str, Any]) -> None:
        """At fit start, on rank 0: the custom-scalars layout of every new TensorBoard logger, or a warning.

        Args:
            trainer: The Trainer.
            wants_tensorboard: Whether histograms or figures are asked for: warn if loggers are attached but none is
                TensorBoard (with no logger at all nothing is expected there).
            categories: The layout (:func:`layout`), of every monitor of the Trainer bound so far: TensorBoard keeps
                the layout written last, so the last monitor to start writes them all.
        """
        writers = tensorboard_writers(trainer)
        if not writers and trainer.loggers and wants_tensorboard:
            self._warn_once(
                "tensorboard",
                f"no TensorBoardLogger is attached, so the `{tags.UNIT_ANGLE}` histograms and the "
                f"`{tags.ROTATION_CURVES}` image are not written to TensorBoard. Scalars still go to the attached "
                f"loggers ({len(trainer.loggers)}) and to the callback's `history`.",
            )
        new_writers = [w for w in writers if id(w) not in self._layouts_written]
        add_layout(new_writers, categories)
        self._layouts_written.update(id(w) for w in new_writers)

    def epoch_end(
        self,
        trainer: pl.Trainer,
        step: int,
        angles: dict[str, torch.Tensor],
        unit_rates: dict[str, torch.Tensor],
        figure: tuple[RotationRecords, dict[str, list[float]]] | None,
    ) -> None:
        """At the end of an epoch that writes them: the :meth:`histograms`, and the :meth:`figures` if asked.

        Args:
            trainer: The Trainer.
            step: The step they are written at.
            angles: See :meth:`histograms`.
            unit_rates: See :meth:`histograms`.
            figure: The monitor's records and its targets (see :meth:`figures`), or ``None`` for no figure.
        """
        self.histograms(trainer, step, angles, unit_rates)
        if figure is not None:
            records, targets = figure
            curves, ratios = records.epoch_curves(), records.update_ratio_history
            self.figures(trainer, step, records.epochs, curves, ratios, targets)

    def histograms(
        self, trainer: pl.Trainer, step: int, angles: dict[str, torch.Tensor], unit_rates: dict[str, torch.Tensor]
    ) -> None:
        """Write ``Unit_angle/<layer>`` and ``Unit_step_rotation/<layer>`` histograms to TensorBoard.

        Args:
            trainer: The Trainer.
            step: The step they are written at.
            angles: Layer display name -> the angle (degrees) each unit turned from its initial weights. A layer
                with non-finite values is skipped, and warned about once.
            unit_rates: Layer display name -> ``tan`` of the angle each unit turned in the epoch's last step; layers
                with non-finite values are skipped.
        """
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        if angles:
            finite = torch.stack([torch.isfinite(a).all() for a in angles.values()]).tolist()  # one host transfer
            for name, ok in zip(angles, finite, strict=True):
                if not ok:
                    self._warn_once(
                        f"non-finite:{name}",
                        f"layer {name!r} holds non-finite weights (inf or NaN): its `{tags.ROTATION}` is logged as "
                        f"NaN and its `{tags.UNIT_ANGLE}` histogram is skipped. Training diverged; look for its cause "
                        "(learning rate, loss scale, data). Warned once per layer.",
                    )
            kept = {
                tags.layer_tag(tags.UNIT_ANGLE, n): a for (n, a), ok in zip(angles.items(), finite, strict=True) if ok
            }
            self._write(writers, kept, step)
        finite_rates = {n: r for n, r in unit_rates.items() if bool(r.isfinite().all())}
        self._write(writers, {tags.layer_tag(tags.UNIT_STEP_ROTATION, n): r for n, r in finite_rates.items()}, step)

    def _write(self, writers: list[Any], values: dict[str, torch.Tensor], step: int) -> None:
        histograms = angle_histograms(list(values.values()), bins=self.histogram_bins)
        add_histograms(writers, dict(zip(values, histograms, strict=True)), step)

    def figures(
        self,
        trainer: pl.Trainer,
        step: int,
        epochs: list[int],
        curves: dict[str, list[float]],
        update_ratios: dict[str, list[tuple[int, float]]] | None,
        targets: dict[str, list[float]] | None = None,
    ) -> None:
        """Draw the figures: TensorBoard images and PNG files in the log directory (each rendered once).

        Args:
            trainer: The Trainer.
            step: The step the images are written at.
            epochs: The x axis of the rotation figure (epochs completed).
            curves: Layer display name -> cosine distance at each of ``epochs``, in depth order.
            update_ratios: Layer display name -> ``[(step, log10 update ratio), ...]`` for the update-ratio figure
                (``None`` or empty: no such figure).
            targets: Layer display name -> its rotation target at each of ``epochs``, drawn dashed (optional).
        """
        if not curves:  # every layer still frozen
            return
        drawn = [
            (tags.ROTATION_CURVES, FIGURE_FILENAME, lambda: rotation_curves_figure(epochs, curves, targets=targets))
        ]
        if update_ratios:
            drawn.append(
                (
                    tags.UPDATE_RATIO_CURVES,
                    UPDATE_RATIO_FILENAME,
                    lambda: update_ratio_figure(update_ratios, tags.UPDATE_RATIO_REFERENCE),
                )
            )
        for tag, filename, draw in drawn:
            try:
                fig = draw()
            except ModuleNotFoundError:
                self._warn_once(
                    "matplotlib",
                    f"matplotlib is not installed, so the `{tags.ROTATION_CURVES}` and `{tags.UPDATE_RATIO_CURVES}` "
                    f"figures are skipped ({PLOT_EXTRA_HINT}, or pass `figure=False`).",
                )
                return
            image = render_rgb(fig)  # rendered once, for TensorBoard and for the PNG
            add_image(tensorboard_writers(trainer), tags.figure_tag(tag, self.label), image, step)
            write_png(image, log_directory(trainer) / _file_name(filename, self.label))
