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
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_layca.argument_types import PositiveInt
from lightning_layca.distributed import (
    ShardLayout,
    check_strategy,
    full_sums,
    gather_full,
    is_dtensor,
    local_shard,
    shard_layout,
    shard_of,
)
from lightning_layca.figures import PLOT_EXTRA_HINT, render_rgb, rotation_curves_figure, write_png
from lightning_layca.loggers import (
    add_histograms,
    add_image,
    add_multiline_layout,
    has_tensorboard,
    is_logging_step,
    log_directory,
    log_scalars,
    logging_step,
    tensorboard_writers,
    trainer_log_every_n_steps,
)
from lightning_layca.rotation import (
    AngleHistogram,
    accumulation_dtype,
    angle_histograms,
    angles_from_sums,
    cosine_distances,
    distances_from_sums,
    pair_sums,
    step_rotation,
    step_rotation_from_sums,
    unit_angles,
)
from lightning_layca.selection import as_patterns, layer_display_name, select_layers
from lightning_layca.step import step_sums

__all__ = ["FIGURE_FILENAME", "LayerRotationMonitor"]

FIGURE_FILENAME = "layer_rotation_curves.png"
"""Name of the PNG copy of the rotation figure in the log directory."""


def _check_positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {accepted}, got {value!r}.")


def _restored_shard(initial: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """This process's part of a restored initial snapshot, on the layer's device and dtype (all of it unsharded).

    A snapshot already bound to a sharded layer is a local shard (``to`` is then a no-op).
    """
    if is_dtensor(layer) and initial.shape == layer.shape:
        initial = shard_of(initial, layer)
    local = local_shard(layer)
    return initial.to(device=local.device, dtype=local.dtype)


@dataclass
class _Measured:
    """What one batch end measured (see ``LayerRotationMonitor._measure_batch``)."""

    distances: list[float] = field(default_factory=list)
    tans: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    unit_tans: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


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
        every_n_epochs: Write the angle histograms and the figure at the end of every this many training epochs.
        angle_histograms: Whether to write ``layer_angles/<layer>`` histograms (TensorBoard only).
        histogram_bins: Number of bins of those histograms.
        figure: Whether to draw the ``Layer_rotation_curves`` figure (TensorBoard image and PNG).

    Attributes:
        layer_names: Parameter names of the monitored layers, in depth order: the selected layers that are trainable
            when the first fit starts, joined by each frozen one when it first becomes trainable (a fine-tuning
            callback unfreezes it). Set when the first fit starts; it grows as layers join.
        history: Layer display name -> ``[(step, cosine distance), ...]`` at every logging step since the layer was
            monitored, on the step axis of ``LightningModule.log``.
        last_rotation: Layer display name -> the latest measured cosine distance.
        epoch_rotation: Layer display name -> ``[(epochs completed, cosine distance), ...]``, starting at ``(0, 0.0)``
            and measured at the end of every training epoch (the figure's data). A layer that joined later has 0 for
            the epochs before it joined, which is its true rotation: it was frozen.

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

        # Candidate layers (parameter names) of the model; None until the first fit starts.
        self._candidate_names: list[str] | None = None
        self._epochs: list[int] = []  # the x axis of `epoch_rotation`, kept apart for layers that join later
        # Aligned with `layer_names`: the snapshots, their norms and the live parameters of the current fit.
        self._initial: list[torch.Tensor] = []
        self._initial_norms: list[torch.Tensor] = []
        self._layers: list[torch.Tensor] = []
        self._candidates: list[tuple[str, torch.Tensor]] = []
        self._pending: list[tuple[str, torch.Tensor]] = []  # candidates still frozen, not snapshotted
        self._layout: ShardLayout | None = None  # how `_layers` lie over the processes, when they are sharded
        self._bound_module: torch.nn.Module | None = None  # the module of the fit in progress
        self._last_global_step = -1
        self._warned_no_tensorboard = False
        self._warned_no_matplotlib = False
        self._warned_non_finite: set[str] = set()
        # The monitored layers' weights before the optimizer step of a batch that measures the step (logging batches,
        # and the epoch's last batch when per-unit rates are histogrammed); freed at the batch end.
        self._pre_step: dict[str, torch.Tensor] | None = None
        self._unit_rates: dict[str, torch.Tensor] = {}
        self.last_step_rates: dict[str, float] = {}
        """Layer display name -> ``tan`` of the angle the layer turned in the latest logged optimizer step."""
        self.last_norms: dict[str, float] = {}
        """Layer display name -> the layer's L2 norm at the latest logging step."""
        self._layouts_written: set[int] = set()

    @property
    def display_names(self) -> list[str]:
        """The monitored layers' names as logged: parameter names without a trailing ``.weight``."""
        return [layer_display_name(name) for name in self.layer_names]

    @property
    @override
    def state_key(self) -> str:
        # What tells two instances apart, so that several can share a Trainer and each resumes its own state; the
        # bare class name when nothing does, which keeps the key of checkpoints written before keys had fields.
        fields = self._state_key_fields()
        return self._generate_state_key(**fields) if fields else type(self).__qualname__

    def _state_key_fields(self) -> dict[str, Any]:
        """The arguments that distinguish two instances on one Trainer (here: which layers they monitor)."""
        name = type(self).__name__
        fields = {
            "include": as_patterns(f"{name}: `include`", self.include),
            "exclude": as_patterns(f"{name}: `exclude`", self.exclude),
        }
        return {key: value for key, value in fields.items() if value}

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__)
        self._bound_module = None  # a new fit: nothing bound until `on_fit_start` (even after a failed fit)
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
                    "rotation per step (tan of the angle), every layer": r"layer_rotation_rate/.*",
                    "L2 norm, every layer": r"layer_norm/.*",
                },
            )
            self._layouts_written.update(id(w) for w in new_writers)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bound_module = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The last moment before a step can change a layer that has just been unfrozen (a fine-tuning callback, or
        # the module itself, flips `requires_grad` at any point before the step).
        if self._pending:
            self._join_trainable()
        if self._pre_step is None and self._layers and self._measures_step(trainer):
            self._pre_step = self._capture_pre_step()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_global_step:  # no optimizer step on this batch (accumulation)
            return
        self._last_global_step = trainer.global_step
        before = None if self._pre_step is None else self._pre_step_weights()
        self._pre_step = None
        unit_rates = (
            before is not None
            and self._unit_rate_histograms
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        logging = self._is_logging_batch(trainer)
        if not (logging or unit_rates):
            return
        names = [n for n in self.layer_names if before is not None and n in before]
        measured = self._measure_batch(
            distances=logging, steps=names if logging else [], unit_steps=names if unit_rates else [], before=before
        )
        if unit_rates:
            counts = [self._layer(n).shape[0] if self._layer(n).ndim >= 2 else 1 for n in names]
            unit_tans = measured.unit_tans.split(counts)
            self._unit_rates = dict(zip([layer_display_name(n) for n in names], unit_tans, strict=True))
        if not logging:
            return
        step = logging_step(trainer)
        values = dict(zip(self.display_names, measured.distances, strict=True))
        for name, value in values.items():
            self.history.setdefault(name, []).append((step, value))
        self.last_rotation = values
        metrics = self._logging_step_metrics(values)
        if before is not None:
            display = [layer_display_name(n) for n in names]
            self.last_step_rates = dict(zip(display, measured.tans, strict=True))
            self.last_norms = dict(zip(display, measured.norms, strict=True))
            metrics.update({f"layer_rotation_rate/{n}": v for n, v in self.last_step_rates.items()})
            metrics.update({f"layer_norm/{n}": v for n, v in self.last_norms.items()})
        log_scalars(trainer, metrics, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self.measure()
        epochs_done = trainer.current_epoch + 1
        self._epochs.append(epochs_done)
        for name, value in values.items():
            self.epoch_rotation.setdefault(name, []).append((epochs_done, value))
        if epochs_done % self.every_n_epochs != 0:
            return
        # Every process measures the angles (a collective under sharding), whether or not it writes.
        angles = self._unit_angles() if self.angle_histograms and self._layers and has_tensorboard(trainer) else None
        unit_rates, self._unit_rates = self._unit_rates, {}
        if not trainer.is_global_zero:
            return
        # Rank 0 only, and nothing below is a collective.
        step = logging_step(trainer)
        writers = tensorboard_writers(trainer)
        if writers and angles is not None:
            add_histograms(writers, self._angle_histograms(angles), step)
        if writers and unit_rates:
            finite = {n: r for n, r in unit_rates.items() if bool(r.isfinite().all())}
            histograms = angle_histograms(list(finite.values()), bins=self.histogram_bins)
            add_histograms(
                writers,
                {f"layer_unit_rotation_rate/{n}": h for n, h in zip(finite, histograms, strict=True)},
                step,
            )
        if self.figure:
            self._draw_figure(trainer, writers, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "candidate_names": None if self._candidate_names is None else list(self._candidate_names),
            "layer_names": list(self.layer_names),
            "initial": self._full_initial() if self._candidate_names is not None else None,
            "epochs": list(self._epochs),
            "history": {k: list(v) for k, v in self.history.items()},
            "epoch_rotation": {k: list(v) for k, v in self.epoch_rotation.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before `on_fit_start`, which moves the snapshot to the layers' device (after it, under
        # `ModelParallelStrategy`).
        self.layer_names = list(state_dict["layer_names"])
        initial = state_dict["initial"]
        self._initial = [] if initial is None else [t.detach() for t in initial]
        # Checkpoints written before candidates were saved: [] means "check the monitored layers only".
        candidates = state_dict.get("candidate_names", [] if initial is not None else None)
        self._candidate_names = None if candidates is None else list(candidates)
        self.history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state_dict["history"].items()}
        self.epoch_rotation = {
            k: [(int(e), float(v)) for e, v in pts] for k, pts in state_dict["epoch_rotation"].items()
        }
        first = next(iter(self.epoch_rotation.values()), [])
        self._epochs = [int(e) for e in state_dict.get("epochs", [e for e, _ in first])]
        self.last_rotation = {k: pts[-1][1] for k, pts in self.history.items() if pts}
        if self._bound_module is not None:
            # Under `ModelParallelStrategy` Lightning restores the callbacks after `on_fit_start`: bind the restored
            # snapshot (each process keeps its own shard of it) to the layers of the fit in progress.
            self._bind_layers(self._bound_module)

    # ------------------------------------------------------------------ measuring
    def measure(self) -> dict[str, float]:
        """Return the current cosine distance of every monitored layer to its initial weights (one host sync).

        Under sharded training this is a collective (one ``all_reduce``): call it on every process.

        Raises:
            RuntimeError: Before the first fit has started (no initial snapshot yet).
        """
        if self._candidate_names is None or not self._candidates:
            raise RuntimeError(f"{type(self).__name__}: nothing to measure before the first `Trainer.fit` starts.")
        if not self._layers:  # every candidate is still frozen
            return {}
        distances = self._measure_batch(distances=True).distances
        return dict(zip(self.display_names, distances, strict=True))

    def _measure_batch(
        self,
        distances: bool,
        steps: Sequence[str] = (),
        unit_steps: Sequence[str] = (),
        before: dict[str, torch.Tensor] | None = None,
    ) -> _Measured:
        """Measure what a batch end needs, with one host transfer and, under sharding, ONE all_reduce for all of it.

        Args:
            distances: Whether to measure every monitored layer's cosine distance to its initial weights.
            steps: Layers whose latest step to measure (``tan`` of its angle and the norm after it).
            unit_steps: Layers whose latest step to measure per unit (``tan`` per unit, rows concatenated).
            before: The weights before the step, by layer name, for ``steps`` and ``unit_steps``.
        """
        out = _Measured()
        if not (distances and self._layers) and not steps and not unit_steps:
            return out
        after = dict(zip(self.layer_names, self._layers, strict=True))
        before = before or {}
        if self._layout is None:  # full local copies: no sums to exchange
            if distances and self._layers:
                out.distances = cosine_distances(self._layers, self._initial, self._initial_norms).tolist()
            if steps:
                tans, norms = step_rotation([after[n] for n in steps], [before[n] for n in steps])
                out.tans, out.norms = tans.tolist(), norms.tolist()
            if unit_steps:
                out.unit_tans, _ = step_rotation(
                    [after[n] for n in unit_steps],
                    [before[n] for n in unit_steps],
                    units=True,
                )
            return out
        # Sharded: float64 sums over each process's shards, stacked, summed over the processes at once.
        layout = self._layout
        position = {name: k for k, name in enumerate(self.layer_names)}
        local = {name: local_shard(p) for name, p in after.items()}
        device = next(iter(local.values())).device
        parts: list[torch.Tensor] = []
        divisors: list[torch.Tensor] = []
        all_divisors = layout.divisors(device)
        assert all_divisors is not None
        if distances and self._layers:
            parts.append(pair_sums([local[n] for n in self.layer_names], self._initial))
            divisors.append(all_divisors)
        if steps:
            parts.append(step_sums([local[n] for n in steps], [before[n] for n in steps]))
            divisors.append(all_divisors[[position[n] for n in steps]])
        if unit_steps:
            sub = layout.subset([position[n] for n in unit_steps])
            rows = step_sums([local[n] for n in unit_steps], [before[n] for n in unit_steps], per_unit=True)
            parts.append(sub.scatter_rows(list(rows.split(list(sub.local_rows)))))
            divisors.append(sub.row_divisors(device))  # type: ignore[arg-type]
        full = full_sums(torch.cat([p.to(device) for p in parts]), torch.cat(divisors))
        counts = [len(part) for part in parts]
        pieces = iter(full.split(counts))
        if distances and self._layers:
            out.distances = distances_from_sums(next(pieces)).tolist()
        if steps:
            tans, norms = step_rotation_from_sums(next(pieces))
            out.tans, out.norms = tans.tolist(), norms.tolist()
        if unit_steps:
            out.unit_tans, _ = step_rotation_from_sums(next(pieces))
        return out

    def _layer(self, name: str) -> torch.Tensor:
        return self._layers[self.layer_names.index(name)]

    @property
    def _unit_rate_histograms(self) -> bool:
        """Whether the epoch's last step is measured per unit, for a histogram (with per-unit control)."""
        return False

    def _measures_step(self, trainer: pl.Trainer) -> bool:
        """Whether the coming optimizer step is measured: on logging batches, and last batches for unit rates."""
        return self._is_logging_batch(trainer) or (
            self._unit_rate_histograms and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )

    def _capture_pre_step(self) -> dict[str, torch.Tensor]:
        """The monitored layers' weights just before a measured step: one transient copy, freed at the batch end.

        Under sharding, this process's shards only.
        """
        return {name: local_shard(p.detach()).clone() for name, p in zip(self.layer_names, self._layers, strict=True)}

    def _pre_step_weights(self) -> dict[str, torch.Tensor]:
        """After the step: the weights :meth:`_capture_pre_step` kept (subclasses may find them elsewhere)."""
        return self._pre_step or {}

    def _unit_angles(self) -> list[torch.Tensor]:
        """Per layer, the angle in degrees each of its units turned (every unit of every layer, on every process).

        Under sharding, each process sums over its part of each unit; one all_reduce of three float64 numbers per
        unit gives every process the full sums.
        """
        if self._layout is None:
            return [unit_angles(w, w0) for w, w0 in zip(self._layers, self._initial, strict=True)]
        local = [local_shard(p) for p in self._layers]
        rows = pair_sums(local, self._initial, per_unit=True).split(list(self._layout.local_rows))
        full = full_sums(self._layout.scatter_rows(list(rows)), self._layout.row_divisors(local[0].device))
        return list(angles_from_sums(full).split(list(self._layout.rows)))

    def _full_initial(self) -> list[torch.Tensor | None]:
        """The snapshot for the checkpoint: full tensors on the CPU (under sharding: gathered, kept on rank 0)."""
        if self._layout is None:
            return [t.detach().cpu() for t in self._initial]
        keep = torch.distributed.get_rank() == 0
        full = []
        for w0, p in zip(self._initial, self._layers, strict=True):
            gathered = gather_full(w0, p)  # a collective, one layer at a time
            full.append(gathered.cpu() if keep else None)
        return full

    def _is_logging_batch(self, trainer: pl.Trainer) -> bool:
        return is_logging_step(trainer, self.log_every_n_steps or trainer_log_every_n_steps(trainer))

    def _logging_step_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """The scalars written on a logging step, from the layers' cosine distances ``values``."""
        return self._scalar_metrics(values)

    def _angle_histograms(self, angles: list[torch.Tensor] | None = None) -> dict[str, AngleHistogram]:
        """The ``layer_angles`` histograms of the monitored layers whose weights are finite (warns for the others).

        From ``angles`` (:meth:`_unit_angles`, measured here when not given). Layer by layer, so only one layer's
        temporaries are alive at a time (:func:`unit_angles` bounds them to a few MiB); the angles kept, one per unit,
        are small.
        """
        if angles is None:
            angles = self._unit_angles()
        finite = torch.stack([torch.isfinite(a).all() for a in angles]).tolist()  # one host transfer
        kept: dict[str, torch.Tensor] = {}
        for name, layer_angles, ok in zip(self.display_names, angles, finite, strict=True):
            if ok:
                kept[f"layer_angles/{name}"] = layer_angles
            elif name not in self._warned_non_finite:
                self._warned_non_finite.add(name)
                rank_zero_warn(
                    f"{type(self).__name__}: layer {name!r} holds non-finite weights (inf or NaN): its "
                    "`layer_rotation` is logged as NaN and its `layer_angles` histogram is skipped. Training "
                    "diverged; look for its cause (learning rate, loss scale, data). Warned once per layer."
                )
        return dict(zip(kept, angle_histograms(list(kept.values()), bins=self.histogram_bins), strict=True))

    def _bind_layers(self, pl_module: torch.nn.Module) -> None:
        self._bound_module = pl_module
        candidates = select_layers(
            pl_module.named_parameters(), include=self.include, exclude=self.exclude, trainable_only=False
        )
        if not candidates:
            raise ValueError(
                f"{type(self).__name__}: no parameter of {type(pl_module).__name__} selected as a layer (default: "
                "real floating-point parameters with ndim >= 2; see `include`/`exclude`)."
            )
        names = [name for name, _ in candidates]
        by_name = dict(candidates)
        if self._candidate_names is None:  # the first fit: its weights are the initial ones
            self._candidate_names = names
            self.layer_names, self._initial = [], []
            self.epoch_rotation, self._epochs = {}, [0]
        else:
            unknown = [name for name in self.layer_names if name not in by_name]
            if unknown or (self._candidate_names and names != self._candidate_names):
                raise ValueError(
                    f"{type(self).__name__}: the initial weights were recorded for layers {self._candidate_names}, "
                    f"but the model now has layers {names}. Use a new callback for a different model."
                )
            for name, w0 in zip(self.layer_names, self._initial, strict=True):
                p = by_name[name]
                # A snapshot is the full layer (restored from a checkpoint) or this process's shard of it.
                if w0.shape != p.shape and w0.shape != local_shard(p).shape:
                    raise ValueError(
                        f"{type(self).__name__}: layer {name!r} has shape {tuple(p.shape)}, but its initial weights "
                        f"were recorded with shape {tuple(w0.shape)}."
                    )
            # A restored snapshot is full; under sharding each process keeps its own shard of it.
            self._initial = [
                _restored_shard(w0, by_name[n]) for n, w0 in zip(self.layer_names, self._initial, strict=True)
            ]
            self._candidate_names = names
        self._candidates = candidates
        self._layers = [by_name[name] for name in self.layer_names]
        self._initial_norms = [torch.linalg.vector_norm(w0, dtype=accumulation_dtype(w0.dtype)) for w0 in self._initial]
        self._update_layout()
        joined = set(self.layer_names)
        self._pending = [(name, p) for name, p in candidates if name not in joined]
        self._join_trainable()

    def _join_trainable(self) -> None:
        """Start monitoring the candidates that have become trainable, snapshotting their (still initial) weights."""
        joining = [(name, p) for name, p in self._pending if p.requires_grad]
        if not joining:
            return
        self._pending = [(name, p) for name, p in self._pending if not p.requires_grad]
        snapshots = dict(zip(self.layer_names, zip(self._initial, self._initial_norms, strict=True), strict=True))
        for name, p in joining:
            w0 = local_shard(p.detach()).clone()  # this process's shard of a sharded layer
            snapshots[name] = (w0, torch.linalg.vector_norm(w0, dtype=accumulation_dtype(w0.dtype)))
            # Frozen until now, so its rotation was 0 at every epoch end so far.
            self.epoch_rotation[layer_display_name(name)] = [(e, 0.0) for e in self._epochs]
        # Depth order, for the figure's colours and the order of everything logged.
        monitored = [(name, p) for name, p in self._candidates if name in snapshots]
        self.layer_names = [name for name, _ in monitored]
        self._layers = [p for _, p in monitored]
        self._initial = [snapshots[name][0] for name in self.layer_names]
        self._initial_norms = [snapshots[name][1] for name in self.layer_names]
        self._update_layout()
        self.epoch_rotation = {name: self.epoch_rotation[name] for name in self.display_names}

    def _update_layout(self) -> None:
        layout = shard_layout(self._layers) if any(is_dtensor(p) for p in self._layers) else None
        self._layout = layout

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
        if not self.epoch_rotation:  # every layer still frozen
            return
        curves = {name: [v for _, v in points] for name, points in self.epoch_rotation.items()}
        try:
            fig = rotation_curves_figure(self._epochs, curves)
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
