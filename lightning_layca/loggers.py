"""Writing what the callbacks measure: scalars through every logger, the rest to TensorBoard.

* Scalars go through every logger attached to the Trainer (TensorBoard, CSV, anything with ``log_metrics``), on the
  step axis ``LightningModule.log`` uses, so the curves line up with the user's own metrics. Lightning's loggers
  only write on global rank 0.
* Histograms (``add_histogram_raw``), images and the custom-scalars layout go to every TensorBoard logger. Callers
  call these functions on global rank 0 only: they involve no collective, so the guard is safe.

Every tag is written with a plain ``add_scalar``/``log_metrics`` per layer, never ``add_scalars``, which would create
one TensorBoard run per key.

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(logger=False)
    >>> tensorboard_writers(trainer), logging_step(trainer)
    ([], 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_layca.rotation import AngleHistogram

__all__ = [
    "add_histograms",
    "add_image",
    "add_layout",
    "has_tensorboard",
    "is_logging_step",
    "log_directory",
    "log_scalars",
    "logging_step",
    "tensorboard_writers",
    "trainer_log_every_n_steps",
]


def logging_step(trainer: pl.Trainer) -> int:
    """Return the step ``LightningModule.log`` writes at now: the number of training batches that stepped."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def trainer_log_every_n_steps(trainer: pl.Trainer) -> int:
    """Return the Trainer's ``log_every_n_steps`` (set on the Trainer by its logger connector)."""
    return int(trainer.log_every_n_steps)  # type: ignore[attr-defined]


def is_logging_step(trainer: pl.Trainer, every_n_steps: int) -> bool:
    """Whether Lightning's own training-step metrics are written on the current batch, for ``every_n_steps``."""
    return every_n_steps > 0 and (logging_step(trainer) + 1) % every_n_steps == 0


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write ``metrics`` through every logger of ``trainer`` at ``step``."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def has_tensorboard(trainer: pl.Trainer) -> bool:
    """Whether a TensorBoard logger is attached: the same answer on every process (unlike the writers)."""
    return any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """Return the ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (call on global rank 0 only)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def add_histograms(writers: list[Any], histograms: Mapping[str, AngleHistogram], step: int) -> None:
    """Write each histogram under its tag with ``add_histogram_raw``."""
    for writer in writers:
        for tag, h in histograms.items():
            writer.add_histogram_raw(
                tag,
                min=h.min,
                max=h.max,
                num=h.num,
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limits=h.bucket_limits,
                bucket_counts=h.bucket_counts,
                global_step=step,
            )


def add_image(writers: list[Any], tag: str, image: Any, step: int) -> None:
    """Write an ``(height, width, 3)`` uint8 image (for example a rendered figure) under ``tag``."""
    for writer in writers:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")


def add_layout(writers: list[Any], layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """Add a custom-scalars layout: category -> chart title -> ``[kind, tags]``.

    ``kind`` is ``"Multiline"`` (``tags``: regexes, every matching tag on one chart) or ``"Margin"`` (``tags``: the
    value, lower and upper tags, exactly). TensorBoard shows a category's multiline charts before its margin charts.
    """
    if not layout:
        return
    # TensorBoard's Custom Scalars page (2.21) shows a category's multiline charts in the order written, then its margin
    # charts last first: write the margin charts reversed, so that every chart appears in the order given.
    shown = {
        category: {
            **{title: chart for title, chart in charts.items() if chart[0] != "Margin"},
            **{title: chart for title, chart in reversed(list(charts.items())) if chart[0] == "Margin"},
        }
        for category, charts in layout.items()
    }
    for writer in writers:
        writer.add_custom_scalars(shown)


def log_directory(trainer: pl.Trainer) -> Path:
    """Return the log directory of the first logger, whatever its type, or the Trainer's ``default_root_dir``.

    Unlike ``Trainer.log_dir`` this does not broadcast, so it may be called on global rank 0 alone.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory is not None:
            return Path(directory)
    return Path(trainer.default_root_dir)
