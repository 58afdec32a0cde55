"""Monitor layer rotation, the cosine distance of each layer's weights to their initialisation, with any optimizer.

Carbonnelle and De Vleeschouwer (arXiv:1806.01603) found that the larger and the more uniform across layers the final
rotation, the better a network generalises: every training run can afford to watch it. The monitor snapshots the
layers when training first starts and, on logging steps only, measures every layer with multi-tensor reductions
(two reads of the weights, one of the snapshot) and one transfer to the host:

* ``Rotation/<layer>`` and ``Rotation_summary/{mean,min,max}``: scalars, through every logger;
* on the same steps, what the latest optimizer step did to each layer: ``Step_rotation`` (tan of its angle),
  ``Update_ratio`` (log10 of ``||dW|| / ||W||``) and its exact ``Update_ratio_tangential`` and ``Update_ratio_radial``
  parts, and ``Weight_norm``, as ``<Quantity>_summary/{mean,min,max}`` over the layers, and per layer
  (``<Quantity>/<layer>``) with ``per_layer_detail=True``: the first screen stays readable at hundreds of layers;
* ``Unit_angle/<layer>``: at epoch end, a TensorBoard histogram of the angle (degrees) each output unit turned;
* ``Rotation_curves`` and ``Update_ratio_curves``: at epoch end, the paper's figure (one line per layer coloured by
  depth) and the update ratio of every layer with its -3 reference, as TensorBoard images, also written as
  ``layer_rotation_curves.png`` and ``update_ratio_curves.png`` into the first logger's directory (the Trainer's
  ``default_root_dir`` without a logger). Figures need matplotlib (``pip install 'lightning-layca[plot]'``);
  without it the monitor warns once and skips them.

Every name comes from :mod:`lightning_layca.tags`. Several rotation callbacks on one Trainer measure each layer once:
a ``LaycaCallback`` measures its layers, a monitor leaves them out (and says so), and monitors with different layers
label their summaries and figures (:func:`lightning_layca.monitored.share_layers`).

What was measured stays available on the callback (``history``, ``last_rotation``, ``epoch_rotation``), loggers or
not, and survives checkpointing together with the initial weights, so a resumed run still measures from the true
initialisation.

Under sharded training (``ModelParallelStrategy``: FSDP2, tensor parallelism) each process keeps the snapshot of its
own shard of every layer; the measurements are float64 sums over the local shards combined with one ``all_reduce``
(:func:`lightning_layca.distributed.full_sums`): one per logging step for the scalars, one per histogram epoch for
the unit angles. The callback's ``state_dict`` gathers the full initial weights (a collective: Lightning calls it on
every process) and keeps them on global rank 0, whose state Lightning writes.

Layers frozen when the fit starts and trained later (fine-tuning callbacks flip ``requires_grad`` and add parameter
groups) join the monitored layers before their first optimizer step. A frozen layer does not change, so the snapshot
taken then is its weights at the first fit start; layers that stay frozen cost no snapshot memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_layca import tags
from lightning_layca.argument_types import (
    Implementation,
    PositiveInt,
    as_patterns,
    check_implementation,
    check_positive_int,
)
from lightning_layca.callbacks.output import (
    FIGURE_FILENAME,
    PER_STEP_QUANTITIES,
    RotationOutput,
    layout,
    per_step_by_layer,
    rotation_scalars,
    step_scalars,
    update_ratio_parts,
)
from lightning_layca.callbacks.records import RotationRecords
from lightning_layca.callbacks.strategies import check_strategy
from lightning_layca.loggers import (
    has_tensorboard,
    is_logging_step,
    log_scalars,
    logging_step,
    trainer_log_every_n_steps,
)
from lightning_layca.measurement import MeasurementSums
from lightning_layca.monitored import MonitoredLayers, MonitorSpec, share_layers
from lightning_layca.schedule_free import evaluation_weights
from lightning_layca.selection import layer_display_name, select_layers

__all__ = ["FIGURE_FILENAME", "LayerRotationMonitor"]


class LayerRotationMonitor(Callback):
    r"""Measure and log the rotation of every layer (cosine distance to its initial weights), with any optimizer.

    Args:
        log_every_n_steps: Log the rotation scalars every this many optimizer steps, on the batches where Lightning
            writes the ``LightningModule.log`` metrics of training steps (default: the Trainer's
            ``log_every_n_steps``).
        include: ``fnmatch`` patterns of parameter names to monitor (default: every real floating-point parameter
            with ``ndim >= 2``, as :func:`~lightning_layca.select_layers`). Patterns may name parameters that are
            frozen when the fit starts: they are monitored from their first optimizer step on.
        exclude: ``fnmatch`` patterns of parameter names not to monitor.
        every_n_epochs: Write the angle histograms and the figures at the end of every this many training epochs.
        angle_histograms: Whether to write ``Unit_angle/<layer>`` histograms (TensorBoard only).
        histogram_bins: Number of bins of those histograms.
        figure: Whether to draw the ``Rotation_curves`` and ``Update_ratio_curves`` figures (TensorBoard images and
            PNGs).
        per_layer_detail: Whether to log the per-step quantities (``Step_rotation``, ``Update_ratio`` and its parts,
            ``Weight_norm``) of every layer as scalars (``<Quantity>/<layer>``) besides their summaries over the
            layers. Off by default: with it, each layer has five more charts.
        unmoved_adapter_steps: Adapted layers (LoRA, DoRA) are measured by their effective weight ``W0 + s B A``
            (``Magnitude_change/<layer>`` for DoRA); after this many optimizer steps, warn once naming those whose
            effective weight has not moved (``None``: never).
        implementation: How a logging step's sums are formed (``lightning_layca.measurement``): ``"auto"``
            (default): eagerly, then on CPU in compiled passes once that pays, by the rule of
            :class:`~lightning_layca.Layca`'s ``implementation``; ``"eager"``; ``"compiled"``: compiled from the first
            logging step. The numbers differ only by the order of float64 additions.

    Extending: a subclass changes what is measured through the hooks :attr:`measures_unit_steps`,
    :attr:`measures_first`, :meth:`copy_weights_before_step`, :meth:`weights_before_step`,
    :meth:`logging_step_scalars`, :meth:`per_step_quantities` and :meth:`state_key_fields`
    (:class:`~lightning_layca.LaycaCallback` uses them to measure from Layca's own snapshot and to log the rates), and
    reads :attr:`layers`, :meth:`is_logging_batch` and :meth:`step_scalars`; the measurement itself is
    :class:`lightning_layca.rotation.RotationMeter`.

    Raises:
        ValueError: For a bad argument (at construction) or, when the fit starts, a pattern that matches no
            parameter or a model whose layers differ from those of the checkpoint or the previous fit.
        MisconfigurationException: For FSDP1 (``FSDPStrategy``) and DeepSpeed, whose flat parameter buffers hide the
            layers (``ModelParallelStrategy``, FSDP2, is supported).

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
        per_layer_detail: bool = False,
        unmoved_adapter_steps: PositiveInt | None = 100,
        implementation: Implementation = "auto",
    ) -> None:
        name = type(self).__name__
        check_implementation(name, implementation)
        check_positive_int(name, "unmoved_adapter_steps", unmoved_adapter_steps, allow_none=True)
        check_positive_int(name, "log_every_n_steps", log_every_n_steps, allow_none=True)
        check_positive_int(name, "every_n_epochs", every_n_epochs)
        check_positive_int(name, "histogram_bins", histogram_bins)
        as_patterns(f"{name}: `include`", include)
        as_patterns(f"{name}: `exclude`", exclude)
        self.log_every_n_steps = None if log_every_n_steps is None else int(log_every_n_steps)
        self.include = include
        self.exclude = exclude
        self.every_n_epochs = int(every_n_epochs)
        self.angle_histograms = bool(angle_histograms)
        self.histogram_bins = int(histogram_bins)
        self.figure = bool(figure)
        self.per_layer_detail = bool(per_layer_detail)

        self.layers = MonitoredLayers(name, include, exclude, unmoved_adapter_steps, MeasurementSums(implementation))
        """The monitored layers and their initial weights (``layers.sums.in_use``: the latest measurement's sums)."""
        self._records = RotationRecords()  # `history`, `update_ratio_history`, `epoch_rotation`, checkpointed
        self.last_rotation: dict[str, float] = {}
        """Layer display name -> the latest measured cosine distance."""
        self.last_update_ratios: dict[str, tuple[float, float, float]] = {}
        """Layer display name -> ``(total, tangential, radial)``: log10 of the update-to-data ratio of the latest logged
        optimizer step and of its two parts (:func:`~lightning_layca.rotation.update_ratios_from_sums`)."""

        self._last_global_step = -1
        self._output = RotationOutput(name, self.histogram_bins)
        self._siblings: list[LayerRotationMonitor] = []  # every rotation monitor of the Trainer, self included
        # The monitored layers' weights before the optimizer step of a batch that measures the step (logging batches,
        # and the epoch's last batch when per-unit rates are histogrammed); freed at the batch end.
        self._pre_step: dict[str, torch.Tensor] | None = None
        self._unit_rates: dict[str, torch.Tensor] = {}
        self.last_step_rates: dict[str, float] = {}
        """Layer display name -> ``tan`` of the angle the layer turned in the latest logged optimizer step."""
        self.last_norms: dict[str, float] = {}
        """Layer display name -> the layer's L2 norm at the latest logging step."""

    @property
    def layer_names(self) -> list[str]:
        """Parameter names of the monitored layers, in depth order.

        The selected layers that are trainable when the first fit starts, joined by each frozen one when it first
        becomes trainable (a fine-tuning callback unfreezes it). Set when the first fit starts; grows as layers join.
        """
        return self.layers.names

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Layer display name -> ``[(step, cosine distance), ...]`` at every logging step since the layer joined."""
        return self._records.history

    @property
    def epoch_rotation(self) -> dict[str, list[tuple[int, float]]]:
        """Layer display name -> ``[(epochs completed, cosine distance), ...]`` from ``(0, 0.0)``, the figure's data.

        Measured at the end of every training epoch. A layer that joined later has 0 for the epochs before it joined,
        which is its true rotation: it was frozen.
        """
        return self._records.epoch_rotation

    @property
    def update_ratio_history(self) -> dict[str, list[tuple[int, float]]]:
        """Layer display name -> ``[(step, log10 ||dW|| / ||W||), ...]`` at every logging step (a figure's data)."""
        return self._records.update_ratio_history

    @property
    def display_names(self) -> list[str]:
        """The monitored layers' names as logged: parameter names without a trailing ``.weight``."""
        return [layer_display_name(name) for name in self.layer_names]

    @property
    @override
    def state_key(self) -> str:
        # What tells two instances apart, so that several can share a Trainer and each resumes its own state; the
        # bare class name when nothing does, which keeps the key of checkpoints written before keys had fields.
        fields = self.state_key_fields()
        return self._generate_state_key(**fields) if fields else type(self).__qualname__

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__)
        self.layers.unbind()  # a new fit: nothing bound until `on_fit_start` (even after a failed fit)
        if stage == "fit":
            # The earliest hook: a pattern that matches no parameter stops the fit before anything is logged.
            self.check_module(pl_module)
            monitors = [cb for cb in trainer.callbacks if isinstance(cb, LayerRotationMonitor)]  # type: ignore[attr-defined]
            # A callback's own `setup` called on a Trainer that does not hold it (as a test may) shares with nobody.
            self._siblings = monitors if self in monitors else [self]
            _share_layers(self, self._siblings, pl_module)

    def check_module(self, pl_module: pl.LightningModule) -> list[str]:
        """Raise on a mistake of the callback's arguments that the module shows before the fit (called in ``setup``).

        Here: an ``include`` or ``exclude`` pattern that matches no parameter (``ValueError`` listing the names).

        Returns:
            The names of the candidate layers: the layers monitored when trainable, frozen ones included.
        """
        layers = select_layers(
            pl_module.named_parameters(), include=self.include, exclude=self.exclude, trainable_only=False
        )
        return [name for name, _ in layers]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resumed checkpoint has restored the loops, so the step counter is the restored one.
        self._last_global_step = trainer.global_step

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy setup: the model is on its device and DDP has broadcast rank 0's weights.
        self._bind(pl_module)
        if trainer.is_global_zero:
            categories = {k: v for m in self._siblings or [self] for k, v in _layout_of(m).items()}
            self._output.start(trainer, self.angle_histograms or self.figure, categories)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers.unbind()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The last moment before a step can change a layer that has just been unfrozen (a fine-tuning callback, or
        # the module itself, flips `requires_grad` at any point before the step).
        if self.layers.has_pending:
            self._records.join(self.layers.join_trainable(), self.layer_names)
        if self._pre_step is None and self.layers.params and self._measures_step(trainer):
            self._pre_step = self.copy_weights_before_step()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_global_step:  # no optimizer step on this batch (accumulation)
            return
        self._last_global_step = trainer.global_step
        self.layers.adapted.check_unmoved(trainer.global_step)
        before = None if self._pre_step is None else self.weights_before_step(self._pre_step)
        self._pre_step = None
        unit_rates = before is not None and self._measures_unit_step(trainer)
        logging = self.is_logging_batch(trainer)
        if not (logging or unit_rates):
            return
        names, measured = self.layers.measure_step(logging, unit_rates, before, trainer.optimizers)
        if unit_rates:
            self._unit_rates = self.layers.unit_step_tans(names, measured)
        if not logging:
            return
        step = logging_step(trainer)
        self.last_rotation = dict(zip(self.display_names, measured.distances, strict=True))
        per_step = per_step_by_layer(measured, [layer_display_name(n) for n in names]) if names else {}
        self._records.add_step(step, self.last_rotation, per_step.get(tags.UPDATE_RATIO, {}))
        if per_step:
            self.last_step_rates, self.last_norms = per_step[tags.STEP_ROTATION], per_step[tags.WEIGHT_NORM]
            self.last_update_ratios = update_ratio_parts(per_step)
        metrics = rotation_scalars(self.last_rotation, self.layers.magnitude_changes, self._output.label)
        metrics.update(self.logging_step_scalars())
        for quantity, values in per_step.items():
            metrics.update(self.step_scalars(quantity, values))
        log_scalars(trainer, metrics, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with evaluation_weights(trainer.optimizers):
            values = self.measure()
        epochs_done = trainer.current_epoch + 1
        self._records.add_epoch(epochs_done, values)
        if epochs_done % self.every_n_epochs != 0:
            return
        # Every process measures the angles (a collective under sharding), whether or not it writes.
        with evaluation_weights(trainer.optimizers):
            angles = (
                self.layers.unit_angles()
                if self.angle_histograms and self.layers.names and has_tensorboard(trainer)
                else None
            )
        unit_rates, self._unit_rates = self._unit_rates, {}
        if not trainer.is_global_zero:
            return
        # Rank 0 only, and nothing below is a collective.
        by_name = {} if angles is None else dict(zip(self.display_names, angles, strict=True))
        figure = (self._records, self.figure_targets()) if self.figure else None
        self._output.epoch_end(trainer, logging_step(trainer), by_name, unit_rates, figure)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.layers.state(), **self._records.state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before `on_fit_start`, which moves the snapshot to the layers' device (after it, under
        # `ModelParallelStrategy`).
        self.layers.load(state_dict)
        self._records.load(state_dict)
        self.last_rotation = self._records.last_rotation()
        if self.layers.module is not None:
            # Under `ModelParallelStrategy` Lightning restores the callbacks after `on_fit_start`: bind the restored
            # snapshot (each process keeps its own shard of it) to the layers of the fit in progress.
            self._bind(self.layers.module)

    # ------------------------------------------------------------------ measuring
    def measure(self) -> dict[str, float]:
        """Return the current cosine distance of every monitored layer to its initial weights (one host sync).

        Under sharded training this is a collective (one ``all_reduce``): call it on every process.

        Raises:
            RuntimeError: Before the first fit has started (no initial snapshot yet).
        """
        return self.layers.rotation()

    # ------------------------------------------------------------------ extension hooks (see the class docstring)
    def figure_targets(self) -> dict[str, list[float]]:
        """Layer display name -> the target of its rotation at every epoch of the figure, drawn dashed (none here)."""
        return {}

    @property
    def measures_unit_steps(self) -> bool:
        """Hook: whether the epoch's last step is measured per unit, for a histogram (default ``False``)."""
        return False

    def copy_weights_before_step(self) -> dict[str, torch.Tensor]:
        """Hook: the weights of the monitored layers just before a measured step, by parameter name.

        The default copies every layer (this process's shard under sharding): one transient copy, freed at the batch
        end. A subclass that finds some of them elsewhere after the step (:meth:`weights_before_step`) copies fewer.
        """
        return self.layers.local_weights(clone=True)

    def weights_before_step(self, copies: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook: after a measured step, the weights before it by parameter name (default: ``copies`` themselves).

        Args:
            copies: What :meth:`copy_weights_before_step` returned before the step.
        """
        return copies

    def logging_step_scalars(self) -> dict[str, float]:
        """Hook: more scalars to log on a logging step, beside the rotation (default: none)."""
        return {}

    @property
    def measures_first(self) -> bool:
        """Hook: whether this monitor measures its layers before plain monitors on the same Trainer (default ``False``).

        Plain monitors on the Trainer leave its layers out (:func:`~lightning_layca.monitored.share_layers`).
        """
        return False

    def per_step_quantities(self) -> list[str]:
        """Hook: the per-step quantities logged on logging steps (:mod:`lightning_layca.tags` names), for the layout."""
        return list(PER_STEP_QUANTITIES)

    def step_scalars(self, quantity: str, values: dict[str, float]) -> dict[str, float]:
        """The scalars of a per-step quantity (layer display name -> value): its summary, and per layer on request."""
        return step_scalars(quantity, values, self._output.label, per_layer=self.per_layer_detail)

    def state_key_fields(self) -> dict[str, Any]:
        """Hook: the arguments that tell two instances on one Trainer apart (here: the layers they monitor)."""
        name = type(self).__name__
        fields = {
            "include": as_patterns(f"{name}: `include`", self.include),
            "exclude": as_patterns(f"{name}: `exclude`", self.exclude),
        }
        return {key: value for key, value in fields.items() if value}

    def _measures_step(self, trainer: pl.Trainer) -> bool:
        """Whether the coming optimizer step is measured: on logging batches, and last batches for unit rates."""
        return self.is_logging_batch(trainer) or self._measures_unit_step(trainer)

    def _measures_unit_step(self, trainer: pl.Trainer) -> bool:
        """Whether the current batch's step is measured per unit: the epoch's last, with :attr:`measures_unit_steps`."""
        return self.measures_unit_steps and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def is_logging_batch(self, trainer: pl.Trainer) -> bool:
        """Whether the current batch logs the rotation scalars (``log_every_n_steps``, on Lightning's logging steps)."""
        return is_logging_step(trainer, self.log_every_n_steps or trainer_log_every_n_steps(trainer))

    def _bind(self, pl_module: torch.nn.Module) -> None:
        first = self.layers.candidate_names is None
        joined = self.layers.bind(pl_module)
        if first:  # the first fit: its weights are the initial ones
            self._records.restart_epochs()
        self._records.join(joined, self.layer_names)


def _share_layers(monitor: LayerRotationMonitor, siblings: list[LayerRotationMonitor], module: torch.nn.Module) -> None:
    """Leave out the layers another rotation monitor of the Trainer measures; label the summaries if needed."""
    specs = [MonitorSpec(type(m).__name__, m.include, m.exclude, m.measures_first) for m in siblings]
    try:
        share = share_layers(module.named_parameters(), specs)[siblings.index(monitor)]
    except ValueError as err:
        raise MisconfigurationException(str(err)) from err
    monitor.layers.left_out = set(share.left_out)
    monitor._output.label = share.label
    if share.left_out:
        rank_zero_warn(f"{type(monitor).__name__}: {share.explanation()}")


def _layout_of(monitor: LayerRotationMonitor) -> dict[str, Any]:
    """A monitor's custom-scalars categories: none before it is bound, or when others measure all its layers."""
    candidates = (monitor.layers.candidate_names or []) if monitor.layers.has_candidates else []
    if not candidates:
        return {}
    names = [layer_display_name(n) for n in candidates]
    return layout(names, monitor.per_step_quantities(), monitor.per_layer_detail, monitor._output.label)
