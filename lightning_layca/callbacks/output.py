"""What a rotation monitor writes beside its scalars: the TensorBoard layout, the histograms and the figure.

:class:`RotationOutput` is the monitor's writer, by composition: the monitor decides what is measured and when, this
class turns it into TensorBoard histograms, the ``Layer_rotation_curves`` image and its PNG copy, and says once what
it cannot write (no TensorBoard logger, no matplotlib, a layer whose weights are not finite). Everything here runs on
global rank 0 and issues no collective.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_layca.figures import PLOT_EXTRA_HINT, render_rgb, rotation_curves_figure, write_png
from lightning_layca.loggers import add_histograms, add_image, add_multiline_layout, log_directory, tensorboard_writers
from lightning_layca.rotation import angle_histograms

__all__ = ["FIGURE_FILENAME", "LAYOUT", "RotationOutput"]

FIGURE_FILENAME = "layer_rotation_curves.png"
"""Name of the PNG copy of the rotation figure in the log directory."""

LAYOUT = {
    "cosine distance to initialisation, every layer": r"Layer_rotation/.*",
    "cosine distance to initialisation, mean / min / max": r"Layer_rotation_summary/.*",
    "rotation per step (tan of the angle), every layer": r"layer_rotation_rate/.*",
    "L2 norm, every layer": r"layer_norm/.*",
}
"""The ``layer rotation`` section of TensorBoard's custom-scalars page: chart title -> tag pattern."""


class RotationOutput:
    """The histograms, figure and layout of one monitor, with the warnings each may need (each said once).

    Args:
        owner: The name warnings start with (the callback's class name).
        histogram_bins: Bins of every histogram.
    """

    def __init__(self, owner: str, histogram_bins: int) -> None:
        self.owner = owner
        self.histogram_bins = histogram_bins
        self._warned: set[str] = set()  # what was warned about: "tensorboard", "matplotlib", layers not finite
        self._layouts_written: set[int] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{self.owner}: {message}")

    def start(self, trainer: pl.Trainer, wants_tensorboard: bool) -> None:
        """At fit start, on rank 0: the custom-scalars layout of every new TensorBoard logger, or a warning.

        Args:
            trainer: The Trainer.
            wants_tensorboard: Whether histograms or the figure are asked for: warn if loggers are attached but none
                is TensorBoard (with no logger at all nothing is expected there).
        """
        writers = tensorboard_writers(trainer)
        if not writers and trainer.loggers and wants_tensorboard:
            self._warn_once(
                "tensorboard",
                "no TensorBoardLogger is attached, so the `layer_angles` histograms and the `Layer_rotation_curves` "
                "image are not written to TensorBoard. Rotation scalars still go to the attached loggers "
                f"({len(trainer.loggers)}) and to the callback's `history`.",
            )
        new_writers = [w for w in writers if id(w) not in self._layouts_written]
        add_multiline_layout(new_writers, "layer rotation", LAYOUT)
        self._layouts_written.update(id(w) for w in new_writers)

    def histograms(
        self, trainer: pl.Trainer, step: int, angles: dict[str, torch.Tensor], unit_rates: dict[str, torch.Tensor]
    ) -> None:
        """Write ``layer_angles/<layer>`` and ``layer_unit_rotation_rate/<layer>`` histograms to TensorBoard.

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
                        f"layer {name!r} holds non-finite weights (inf or NaN): its `layer_rotation` is logged as "
                        "NaN and its `layer_angles` histogram is skipped. Training diverged; look for its cause "
                        "(learning rate, loss scale, data). Warned once per layer.",
                    )
            kept = {f"layer_angles/{n}": a for (n, a), ok in zip(angles.items(), finite, strict=True) if ok}
            self._write(writers, kept, step)
        finite_rates = {n: r for n, r in unit_rates.items() if bool(r.isfinite().all())}
        self._write(writers, {f"layer_unit_rotation_rate/{n}": r for n, r in finite_rates.items()}, step)

    def _write(self, writers: list[Any], values: dict[str, torch.Tensor], step: int) -> None:
        histograms = angle_histograms(list(values.values()), bins=self.histogram_bins)
        add_histograms(writers, dict(zip(values, histograms, strict=True)), step)

    def figure(
        self,
        trainer: pl.Trainer,
        step: int,
        epochs: list[int],
        curves: dict[str, list[float]],
        targets: dict[str, list[float]] | None = None,
    ) -> None:
        """Draw the ``Layer_rotation_curves`` figure: a TensorBoard image and :data:`FIGURE_FILENAME` in the log dir.

        Args:
            trainer: The Trainer.
            step: The step the image is written at.
            epochs: The x axis (epochs completed).
            curves: Layer display name -> cosine distance at each of ``epochs``, in depth order.
            targets: Layer display name -> its rotation target at each of ``epochs``, drawn dashed (optional).
        """
        if not curves:  # every layer still frozen
            return
        try:
            fig = rotation_curves_figure(epochs, curves, targets=targets)
        except ModuleNotFoundError:
            self._warn_once(
                "matplotlib",
                "matplotlib is not installed, so the `Layer_rotation_curves` figure is skipped "
                f"({PLOT_EXTRA_HINT}, or pass `figure=False`).",
            )
            return
        image = render_rgb(fig)  # rendered once, for TensorBoard and for the PNG
        add_image(tensorboard_writers(trainer), "Layer_rotation_curves", image, step)
        write_png(image, log_directory(trainer) / FIGURE_FILENAME)
