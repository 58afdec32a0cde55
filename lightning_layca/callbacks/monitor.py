"""Monitor layer rotation, the cosine distance of each layer's weights to their initialisation, with any optimizer.

Carbonnelle and De Vleeschouwer (arXiv:1806.01603) found that the larger and the more uniform across layers the final
rotation, the better a network generalises: every training run can afford to watch it. The monitor snapshots the
layers when training first starts and, on logging steps only, measures every layer with multi-tensor reductions
(two reads of the weights, one of the snapshot) and one transfer to the host:

* ``Layer_rotation/<layer>`` and ``Layer_rotation_summary/{mean,min,max}``: scalars, through every logger;
* ``layer_angles/<layer>``: at epoch end, a TensorBoard histogram of the angle (degrees) each output unit turned;
* ``Layer_rotation_curves``: at epoch end, the paper's figure (one line per layer coloured by depth) as a
  TensorBoard image, also written as ``layer_rotation_curves.png`` into the first logger's directory (the
  Trainer's ``default_root_dir`` without a logger). The figure needs matplotlib (``pip install
  'lightning-layca[plot]'``); without it the monitor warns once and skips the figure.

What was measured stays available on the callback (``history``, ``last_rotation``, ``epoch_rotation``), loggers or
not, and survives checkpointing together with the initial weights, so a resumed run still measures from the true
initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_layca.argument_types import PositiveInt
from lightning_layca.distributed import check_strategy
from lightning_layca.figures import PLOT_EXTRA_HINT, render_rgb, rotation_curves_figure, write_png
from lightning_layca.loggers import (
    add_histograms,
    add_image,
    add_multiline_layout,
    is_logging_step,
    log_directory,
    log_scalars,
    logging_step,
    tensorboard_writers,
    trainer_log_every_n_steps,
)
from lightning_layca.rotation import accumulation_dtype, angle_histograms, cosine_distances, unit_angles
from lightning_layca.selection import as_patterns, layer_display_name, select_layers

__all__ = ["FIGURE_FILENAME", "LayerRotationMonitor"]

FIGURE_FILENAME = "layer_rotation_curves.png"
"""Name of the PNG copy of the rotation figure in the log directory."""


def _check_positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {accepted}, got {value!r}.")


class LayerRotationMonitor(Callback):
    r"""Measure and log the rotation of every layer (cosine distance to its initial weights), with any optimizer.

    Args:
        log_every_n_steps: Log the rotation scalars every this many optimizer steps, on the batches where Lightning
            writes the ``LightningModule.log`` metrics of training steps (default: the Trainer's
            ``log_every_n_steps``).
        include: ``fnmatch`` patterns of parameter names to monitor (default: every trainable parameter with
            ``ndim >= 2``, as :func:`~lightning_layca.select_layers`).
        exclude: ``fnmatch`` patterns of parameter names not to monitor.
        every_n_epochs: Write the angle histograms and the figure at the end of every this many training epochs.
        angle_histograms: Whether to write ``layer_angles/<layer>`` histograms (TensorBoard only).
        histogram_bins: Number of bins of those histograms.
        figure: Whether to draw the ``Layer_rotation_curves`` figure (TensorBoard image and PNG).

    Attributes:
        layer_names: Parameter names of the monitored layers, in depth order (set when the first fit starts).
        history: Layer display name -> ``[(step, cosine distance), ...]`` at every logging step, on the step axis of
            ``LightningModule.log``.
        last_rotation: Layer display name -> the latest measured cosine distance.
        epoch_rotation: Layer display name -> ``[(epochs completed, cosine distance), ...]``, starting at ``(0, 0.0)``
            and measured at the end of every training epoch (the figure's data).

    Raises:
        ValueError: For a bad argument (at construction) or, when the fit starts, a pattern that matches no
            parameter or a model whose layers differ from those of the checkpoint or the previous fit.
        MisconfigurationException: When the Trainer's strategy shards weights (FSDP, DeepSpeed).

    Example:
        >>> import lightning as L
        >>> import lightning_layca as ll
        >>> monitor = ll.LayerRotationMonitor(log_every_n_steps=10)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[monitor], logger=False)
    """

    def __init__(
        self,
        log_every_n_steps: PositiveInt | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        *,
        every_n_epochs: PositiveInt = 1,
        angle_histograms: bool = True,
        histogram_bins: PositiveInt = 30,
        figure: bool = True,
    ) -> None:
        name = type(self).__name__
        _check_positive_int(name, "log_every_n_steps", log_every_n_steps, allow_none=True)
        _check_positive_int(name, "every_n_epochs", every_n_epochs)
        _check_positive_int(name, "histogram_bins", histogram_bins)
        as_patterns(f"{name}: `include`", include)
        as_patterns(f"{name}: `exclude`", exclude)
        self.log_every_n_steps = None if log_every_n_steps is None else int(log_every_n_steps)
        self.include = include
        self.exclude = exclude
        self.every_n_epochs = int(every_n_epochs)
        self.angle_histograms = bool(angle_histograms)
        self.histogram_bins = int(histogram_bins)
        self.figure = bool(figure)

        self.layer_names: list[str] = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_rotation: dict[str, float] = {}
        self.epoch_rotation: dict[str, list[tuple[int, float]]] = {}

        self._initial: list[torch.Tensor] | None = None
        self._initial_norms: list[torch.Tensor] = []
        self._layers: list[torch.Tensor] = []
        self._last_global_step = -1
        self._warned_no_tensorboard = False
        self._warned_no_matplotlib = False
        self._layouts_written: set[int] = set()

    @property
    def display_names(self) -> list[str]:
        """The monitored layers' names as logged: parameter names without a trailing ``.weight``."""
        return [layer_display_name(name) for name in self.layer_names]

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__)
        if stage == "fit":
            # The earliest hook: a pattern that matches no parameter stops the fit before anything is logged.
            select_layers(
                pl_module.named_parameters(), include=self.include, exclude=self.exclude, trainable_only=False
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resumed checkpoint has restored the loops, so the step counter is the restored one.
        self._last_global_step = trainer.global_step

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy setup: the model is on its device and DDP has broadcast rank 0's weights.
        self._bind_layers(pl_module)
        if trainer.is_global_zero:
            writers = tensorboard_writers(trainer)
            # Said when loggers are attached but none is TensorBoard; with no logger at all nothing is expected there.
            if (
                not writers
                and trainer.loggers
                and (self.angle_histograms or self.figure)
                and not self._warned_no_tensorboard
            ):
                self._warned_no_tensorboard = True
                rank_zero_warn(
                    f"{type(self).__name__}: no TensorBoardLogger is attached, so the `layer_angles` histograms and "
                    "the `Layer_rotation_curves` image are not written to TensorBoard. Rotation scalars still go to "
                    f"the attached loggers ({len(trainer.loggers)}) and to the callback's `history`."
                )
            new_writers = [w for w in writers if id(w) not in self._layouts_written]
            add_multiline_layout(
                new_writers,
                "layer rotation",
                {
                    "cosine distance to initialisation, every layer": r"Layer_rotation/.*",
                    "cosine distance to initialisation, mean / min / max": r"Layer_rotation_summary/.*",
                },
            )
            self._layouts_written.update(id(w) for w in new_writers)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_global_step:  # no optimizer step on this batch (accumulation)
            return
        self._last_global_step = trainer.global_step
        if not is_logging_step(trainer, self.log_every_n_steps or trainer_log_every_n_steps(trainer)):
            return
        step = logging_step(trainer)
        values = self.measure()
        for name, value in values.items():
            self.history.setdefault(name, []).append((step, value))
        self.last_rotation = values
        log_scalars(trainer, self._scalar_metrics(values), step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self.measure()
        epochs_done = trainer.current_epoch + 1
        for name, value in values.items():
            self.epoch_rotation.setdefault(name, []).append((epochs_done, value))
        if epochs_done % self.every_n_epochs != 0 or not trainer.is_global_zero:
            return
        # Rank 0 only, and nothing below is a collective.
        step = logging_step(trainer)
        writers = tensorboard_writers(trainer)
        if writers and self.angle_histograms:
            angles = [unit_angles(w, w0) for w, w0 in zip(self._layers, self._initial or [], strict=True)]
            histograms = angle_histograms(angles, bins=self.histogram_bins)
            add_histograms(
                writers, {f"layer_angles/{n}": h for n, h in zip(self.display_names, histograms, strict=True)}, step
            )
        if self.figure:
            self._draw_figure(trainer, writers, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "initial": [t.detach().cpu() for t in self._initial] if self._initial is not None else None,
            "history": {k: list(v) for k, v in self.history.items()},
            "epoch_rotation": {k: list(v) for k, v in self.epoch_rotation.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before `on_fit_start`, which moves the snapshot to the layers' device.
        self.layer_names = list(state_dict["layer_names"])
        initial = state_dict["initial"]
        self._initial = None if initial is None else [t.detach() for t in initial]
        self.history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state_dict["history"].items()}
        self.epoch_rotation = {
            k: [(int(e), float(v)) for e, v in pts] for k, pts in state_dict["epoch_rotation"].items()
        }
        self.last_rotation = {k: pts[-1][1] for k, pts in self.history.items() if pts}

    # ------------------------------------------------------------------ measuring
    def measure(self) -> dict[str, float]:
        """Return the current cosine distance of every monitored layer to its initial weights (one host sync).

        Raises:
            RuntimeError: Before the first fit has started (no initial snapshot yet).
        """
        if self._initial is None or not self._layers:
            raise RuntimeError(f"{type(self).__name__}: nothing to measure before the first `Trainer.fit` starts.")
        distances = cosine_distances(self._layers, self._initial, self._initial_norms).tolist()
        return dict(zip(self.display_names, distances, strict=True))

    def _bind_layers(self, pl_module: pl.LightningModule) -> None:
        layers = select_layers(pl_module.named_parameters(), include=self.include, exclude=self.exclude)
        if not layers:
            raise ValueError(
                f"{type(self).__name__}: no parameter of {type(pl_module).__name__} selected as a layer (default: "
                "trainable parameters with ndim >= 2; see `include`/`exclude`)."
            )
        names = [name for name, _ in layers]
        params = [p for _, p in layers]
        if self._initial is None:
            self.layer_names = names
            self._initial = [p.detach().clone() for p in params]
            self.epoch_rotation = {layer_display_name(n): [(0, 0.0)] for n in names}
        else:
            if names != self.layer_names:
                raise ValueError(
                    f"{type(self).__name__}: the initial weights were recorded for layers {self.layer_names}, but the "
                    f"model now has layers {names}. Use a new callback for a different model."
                )
            for name, p, w0 in zip(names, params, self._initial, strict=True):
                if w0.shape != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}: layer {name!r} has shape {tuple(p.shape)}, but its initial weights "
                        f"were recorded with shape {tuple(w0.shape)}."
                    )
            self._initial = [w0.to(device=p.device, dtype=p.dtype) for p, w0 in zip(params, self._initial, strict=True)]
        self._layers = params
        self._initial_norms = [torch.linalg.vector_norm(w0, dtype=accumulation_dtype(w0.dtype)) for w0 in self._initial]

    @staticmethod
    def _scalar_metrics(values: dict[str, float]) -> dict[str, float]:
        metrics = {f"Layer_rotation/{name}": value for name, value in values.items()}
        finite = [v for v in values.values() if v == v]
        if finite:
            metrics["Layer_rotation_summary/mean"] = sum(finite) / len(finite)
            metrics["Layer_rotation_summary/min"] = min(finite)
            metrics["Layer_rotation_summary/max"] = max(finite)
        return metrics

    def _draw_figure(self, trainer: pl.Trainer, writers: list[Any], step: int) -> None:
        first = next(iter(self.epoch_rotation.values()), [])
        epochs = [e for e, _ in first]
        curves = {name: [v for _, v in points] for name, points in self.epoch_rotation.items()}
        try:
            fig = rotation_curves_figure(epochs, curves)
        except ModuleNotFoundError:
            if not self._warned_no_matplotlib:
                self._warned_no_matplotlib = True
                rank_zero_warn(
                    f"{type(self).__name__}: matplotlib is not installed, so the `Layer_rotation_curves` figure is "
                    f"skipped ({PLOT_EXTRA_HINT}, or pass `figure=False`)."
                )
            return
        image = render_rgb(fig)  # rendered once, for TensorBoard and for the PNG
        add_image(writers, "Layer_rotation_curves", image, step)
        write_png(image, log_directory(trainer) / FIGURE_FILENAME)
