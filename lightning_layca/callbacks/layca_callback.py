"""Train with Layca without touching the LightningModule: wrap whatever ``configure_optimizers`` returned.

When the fit starts, each selected optimizer becomes :class:`~lightning_layca.Layca` around it, installed through the
strategy so Lightning steps the wrapper in automatic and manual optimization, with gradient accumulation, gradient
clipping, mixed precision (GradScaler skips leave the weights untouched) and checkpoints (the wrapper's state dict
holds the base optimizer's). LR schedulers stay attached and shape the rotation rate through the relative learning
rate. As a :class:`~lightning_layca.LayerRotationMonitor`, the callback also logs every layer's rotation, and, on the
same logging steps and at the same step values, the effective rate ``Rotation_rate`` that the step just logged used
(``Rotation_rate_summary/{mean,min,max}`` over the layers, and ``Rotation_rate/<layer>`` with ``per_layer_detail``),
so rates and rotations are curves of the same resolution. A ``LayerRotationMonitor`` on the same Trainer leaves the
layers this callback measures to it.

Several instances can share a Trainer when they wrap different optimizers (a GAN with one rate for the generator and
one for the discriminator): each one's checkpoint state is stored under a key that holds its ``optimizers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import CyclicLR
from typing_extensions import override

from lightning_layca import tags
from lightning_layca.adapters import adapter_parameter_names
from lightning_layca.argument_types import (
    DEFAULT_ROTATION_RATE,
    Granularity,
    Implementation,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RotationRate,
    as_optimizer_indices,
    as_patterns,
    check_granularity,
    check_implementation,
    check_reference_lr,
    check_rotation_rate,
)
from lightning_layca.callbacks.horizon import start_targets, steered_now, targets_now
from lightning_layca.callbacks.monitor import LayerRotationMonitor
from lightning_layca.layca import Layca
from lightning_layca.schedule_free import ScheduleFree
from lightning_layca.schedules import RotationSchedule, as_schedule
from lightning_layca.selection import layer_display_name
from lightning_layca.targets import RotationTarget, check_target

__all__ = ["LaycaCallback"]


class LaycaCallback(LayerRotationMonitor):
    r"""Wrap the Trainer's optimizer(s) in :class:`~lightning_layca.Layca`, and monitor layer rotation.

    Args:
        rotation_rate: Base rotation rate ``rho`` in ``(0, 1000]``, or ``"equilibrium"`` (each group's rate is the
            angular update its optimizer reaches at equilibrium, see :class:`~lightning_layca.Layca`);
            a layer at multiplier 1 and relative lr 1
            rotates by ``atan(rho)`` radians per step. Default ``3 ** -3``, the paper's best for SGD.
        schedule: Per-layer multipliers (default :class:`~lightning_layca.Uniform`).
        include: ``fnmatch`` patterns of parameter names to control and monitor (default: trainable parameters with
            ``ndim >= 2``).
        exclude: ``fnmatch`` patterns of parameter names never to control or monitor.
        optimizers: Index, or indices, into the optimizers ``configure_optimizers`` returned, of those to wrap
            (default: all). With several optimizers (manual optimization) each wrapped one controls its own
            parameters, so ``include``/``exclude`` must make sense for each.
        log_rates: Whether to log ``Rotation_rate`` on every logging step of the rotation scalars (see
            ``log_every_n_steps``), at the same step value: the effective rate ``rho_l(t)`` used by the optimizer
            step whose rotation is logged there (its summary over the layers, and per layer with
            ``per_layer_detail``).
        reference_lr: The learning rate at which a layer rotates at ``rotation_rate * m_l`` (see
            :class:`~lightning_layca.Layca`). Default: the largest peak learning rate of the groups holding layers at
            the first step (``OneCycleLR``'s ``max_lr``, a ``CyclicLR`` scheduler's ``max_lr``, else the lr a
            scheduler started from, else the group's lr).
        granularity: ``"layer"`` (the paper) or ``"unit"``: every output unit turns by ``atan(rho)`` and keeps its own
            initial norm (see :class:`~lightning_layca.Layca`).
        log_every_n_steps: See :class:`~lightning_layca.LayerRotationMonitor`, like the keyword-only arguments other
            than ``implementation``.
        implementation: How the Layca step is computed: ``"auto"`` (default), ``"eager"`` or ``"compiled"`` (see
            :class:`~lightning_layca.Layca`), and the sums of the monitor's measurements (see
            :class:`~lightning_layca.LayerRotationMonitor`).
        target: A :class:`~lightning_layca.RotationTarget`: each layer's rate is chosen so that its rotation follows
            the target (see :class:`~lightning_layca.Layca`); ``rotation_rate`` and ``schedule`` then do not apply.
            The length of training comes from the Trainer (``estimated_stepping_batches``) and the learning rates
            from stepping its LR schedulers ahead (``ReduceLROnPlateau`` cannot be: the current lr is assumed);
            the controller measures against the monitor's initial weights (no copy of its own), and the target is
            logged as ``Rotation_target/<layer>`` beside the rotation, and drawn dashed in the rotation curves.

    Attributes:
        laycas: The wrappers of the current fit, keyed by optimizer index.
        last_rates: Layer display name -> the latest logged effective rate ``rho_l(t)`` (of the last logged step).

    Raises:
        ValueError: For a bad argument (at construction), or, in ``setup``, a pattern of ``include``, ``exclude`` or
            the schedule that matches no layer of the module.
        MisconfigurationException: When ``optimizers`` names an optimizer that does not exist (in ``setup`` under
            automatic optimization, which has one; when the fit starts otherwise), when ``configure_optimizers``
            returned none, or for FSDP1 (``FSDPStrategy``) and DeepSpeed (``ModelParallelStrategy``, FSDP2, is
            supported).

    Example:
        >>> import lightning as L
        >>> import lightning_layca as ll
        >>> callback = ll.LaycaCallback(rotation_rate=3**-3, schedule=ll.DepthDecay(alpha=0.0))
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[callback], logger=False)
    """

    def __init__(
        self,
        rotation_rate: RotationRate | Literal["equilibrium"] = DEFAULT_ROTATION_RATE,
        schedule: RotationSchedule | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        optimizers: NonNegativeInt | Sequence[NonNegativeInt] | None = None,
        log_rates: bool = True,
        log_every_n_steps: PositiveInt | None = None,
        reference_lr: PositiveFloat | None = None,
        granularity: Granularity = "layer",
        *,
        every_n_epochs: PositiveInt = 1,
        angle_histograms: bool = True,
        histogram_bins: PositiveInt = 30,
        figure: bool = True,
        per_layer_detail: bool = False,
        implementation: Implementation = "auto",
        unmoved_adapter_steps: PositiveInt | None = 100,
        target: RotationTarget | None = None,
    ) -> None:
        super().__init__(
            log_every_n_steps,
            include,
            exclude,
            every_n_epochs=every_n_epochs,
            angle_histograms=angle_histograms,
            histogram_bins=histogram_bins,
            figure=figure,
            per_layer_detail=per_layer_detail,
            unmoved_adapter_steps=unmoved_adapter_steps,
            implementation=implementation,
        )
        check_rotation_rate("LaycaCallback", rotation_rate)
        check_target("LaycaCallback", target, schedule, rotation_rate)
        self.target = target
        self.epoch_targets: dict[str, list[float]] = {}
        """Layer display name -> its target at the start and at the end of every epoch of the fit (with a target)."""
        if schedule is not None:
            as_schedule("LaycaCallback", schedule)
        self.rotation_rate: float | Literal["equilibrium"] = (
            rotation_rate if isinstance(rotation_rate, str) else float(rotation_rate)
        )
        self.schedule = schedule
        self.optimizer_indices = as_optimizer_indices("LaycaCallback", optimizers)
        self.log_rates = bool(log_rates)
        check_reference_lr("LaycaCallback", reference_lr)
        self.reference_lr = None if reference_lr is None else float(reference_lr)
        check_granularity("LaycaCallback", granularity)
        self.granularity: Granularity = granularity
        check_implementation("LaycaCallback", implementation)
        self.implementation: Implementation = implementation
        self.laycas: dict[int, Layca] = {}
        self._pre_step_counts: dict[int, int] = {}
        self.last_rates: dict[str, float] = {}
        self._step_rates: dict[str, float] = {}  # rates of the optimizer step(s) of the current logging batch
        self._restored_laycas: dict[int, dict[str, Any]] = {}  # Layca states of a checkpoint, until they are applied

    # ------------------------------------------------------------------ hooks
    @override
    def check_module(self, pl_module: pl.LightningModule) -> list[str]:
        """Raise on a mistake of the callback's arguments that the module shows before the fit (called in ``setup``).

        Besides the monitor's checks: a pattern of the schedule (nested schedules too) that matches no candidate layer
        (``ValueError`` listing the names), and an index of ``optimizers`` other than 0 under automatic optimization,
        which trains one optimizer (``MisconfigurationException``). Under manual optimization the number of optimizers
        is known when the fit starts, where an index beyond it is refused.
        """
        names = super().check_module(pl_module)
        if self.schedule is not None:
            self.schedule.validate(names)
        beyond = [i for i in self.optimizer_indices or () if i > 0]
        if pl_module.automatic_optimization and beyond:
            raise MisconfigurationException(
                f"LaycaCallback: `optimizers={self.optimizer_indices}` names optimizer(s) {beyond}, but "
                f"{type(pl_module).__name__} uses automatic optimization, which trains one optimizer (index 0). "
                "Leave `optimizers` out, or set `self.automatic_optimization = False` to use several."
            )
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap_optimizers(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # After a checkpoint has restored the loops and the optimizers. A checkpoint written without Layca restarts
        # Layca's counters: take them from the restored loop, so that step-based schedules do not start over.
        for layca in self.laycas.values():
            if layca.restored_from_plain_state:
                layca.step_count = (
                    trainer.global_step
                    if len(trainer.optimizers) == 1
                    else trainer.fit_loop.epoch_loop._batches_that_stepped
                )
                layca.set_epoch(trainer.current_epoch)
                layca.restored_from_plain_state = False
        # After every restore (ModelParallelStrategy restores callbacks late): the monitor's initial weights are final.
        start_targets(trainer, self.laycas.values(), self.layers)
        self.epoch_targets = {name: [value] for name, value in targets_now(self.laycas.values()).items()}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, value in targets_now(self.laycas.values()).items():
            self.epoch_targets.setdefault(name, []).append(value)
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def figure_targets(self) -> dict[str, list[float]]:
        return self.epoch_targets

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layca in self.laycas.values():
            layca.set_epoch(trainer.current_epoch)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        # On logging batches only: the rates this step will use are read just before it, when the schedule's step
        # count and the learning rates are the step's own (a per-step LR scheduler moves them after the batch).
        if not self.log_rates or not self.is_logging_batch(trainer):
            return
        for layca in self.laycas.values():
            if layca is optimizer:
                for name, rate in layca.rotation_rates().items():
                    self._step_rates[layer_display_name(name)] = rate

    @override
    def logging_step_scalars(self) -> dict[str, float]:
        scalars = self.step_scalars(tags.ROTATION_RATE, self._step_rates) if self._step_rates else {}
        scalars.update(
            {
                tags.layer_tag(tags.ROTATION_TARGET, name): value
                for name, value in targets_now(self.laycas.values()).items()
            }
        )
        steered = steered_now(self.laycas.values())
        if steered:
            scalars.update(self.step_scalars(tags.ROTATION_STEERED, steered))
        self.last_rates.update(self._step_rates)
        self._step_rates = {}
        return scalars

    @property
    @override
    def measures_first(self) -> bool:
        return True  # from Layca's own snapshot, with the rates: a plain monitor leaves these layers to it

    @override
    def per_step_quantities(self) -> list[str]:
        steered = [tags.ROTATION_STEERED] if self.target is not None and self.target.steer else []
        return ([tags.ROTATION_RATE] if self.log_rates else []) + steered + super().per_step_quantities()

    @property
    @override
    def measures_unit_steps(self) -> bool:
        return self.granularity == "unit" and self.angle_histograms

    @override
    def copy_weights_before_step(self) -> dict[str, torch.Tensor]:
        # Layca keeps the weights before its step (asked to for the layers whose base step the kernel takes, which
        # need no copy otherwise): copy only the layers no wrapper controls.
        self._pre_step_counts = {index: layca.step_count for index, layca in self.laycas.items()}
        for layca in self.laycas.values():
            layca.keep_weights_before_next_step()
        controlled = {name for layca in self.laycas.values() for name in layca.controlled_layer_names}
        copies = super().copy_weights_before_step()
        return {name: weights for name, weights in copies.items() if name not in controlled}

    @override
    def weights_before_step(self, copies: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = dict(copies)
        for index, layca in self.laycas.items():
            if layca.step_count > self._pre_step_counts.get(index, layca.step_count):
                weights.update(layca.weights_before_last_step())
            else:  # the step was skipped (a GradScaler found inf gradients): the layers did not move
                current = self.layers.local_weights(clone=False)
                weights.update({n: current[n] for n in layca.controlled_layer_names if n in current})
        return weights

    @override
    def state_key_fields(self) -> dict[str, Any]:
        # The wrapped optimizers tell two LaycaCallbacks apart; two on the same optimizer would wrap it twice.
        return {} if self.optimizer_indices is None else {"optimizers": self.optimizer_indices}

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # Also in the optimizer's state dict; but checkpoints written through torch.distributed.checkpoint
        # (`ModelParallelStrategy`) keep only the wrapped optimizer's `state` and `param_groups`.
        state["laycas"] = {index: layca.layca_state() for index, layca in self.laycas.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restored = {int(index): layca for index, layca in state_dict.get("laycas", {}).items()}
        if self.layers.module is None:  # before the fit starts (DDP): applied when the optimizers are wrapped
            self._restored_laycas = restored
            return
        # During the fit (`ModelParallelStrategy` restores callbacks after `on_fit_start`): the wrappers exist.
        for index, layca in self.laycas.items():
            if index in restored:
                layca.load_layca_state(restored[index])

    # ------------------------------------------------------------------ wrapping
    def _wrap_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.strategy.optimizers)
        # For a `None` from configure_optimizers, Lightning installs a placeholder (`_MockOptimizer`, a private class:
        # recognised by its name) that holds no parameter of the module.
        if not optimizers or all(type(optimizer).__name__ == "_MockOptimizer" for optimizer in optimizers):
            raise MisconfigurationException(
                f"LaycaCallback: `{type(pl_module).__name__}.configure_optimizers` returned None: there is no "
                "optimizer to wrap. LaycaCallback needs it to return one (for example "
                "`torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)`), or the `optimizer:` section of a "
                "LightningCLI configuration."
            )
        indices = list(range(len(optimizers))) if self.optimizer_indices is None else self.optimizer_indices
        out_of_range = [i for i in indices if i >= len(optimizers)]
        if out_of_range:
            raise MisconfigurationException(
                f"LaycaCallback: `optimizers={self.optimizer_indices}` names optimizer(s) {out_of_range}, but "
                f"`configure_optimizers` returned {len(optimizers)} (indices 0 to {len(optimizers) - 1})."
            )
        # LR schedulers keep pointing at the base optimizer: they only read and write `param_groups`, which the
        # wrapper shares, and Lightning's LearningRateMonitor finds wrapped optimizers through `.optimizer`, so
        # re-pointing them would log the learning rate twice (and trip torch's step-order check).
        previous, self.laycas = self.laycas, {}
        for i in indices:
            # Inside a schedule-free optimizer, Layca steps its base sequence z (see lightning_layca.schedule_free).
            found = optimizers[i]
            outer: ScheduleFree | None = found if isinstance(found, ScheduleFree) else None
            base = found if outer is None else outer.optimizer
            if isinstance(base, Layca):  # wrapped by the user in `configure_optimizers`: used as it is
                if base.rotation_rate != self.rotation_rate or (
                    self.schedule is not None and base.schedule is not self.schedule
                ):
                    rank_zero_warn(
                        f"LaycaCallback: optimizer {i} is already a Layca (rotation_rate={base.rotation_rate!r}, "
                        f"schedule={base.schedule!r}); it is used as it is, so the "
                        f"callback's rotation_rate={self.rotation_rate!r} and schedule={self.schedule!r} "
                        "do not apply."
                    )
                self.laycas[i] = base
                continue
            adapted = adapter_parameter_names(pl_module)
            held = {id(p) for group in base.param_groups for p in group["params"]}
            if adapted and not any(
                p.ndim >= 2 and id(p) in held and n not in adapted for n, p in pl_module.named_parameters()
            ):
                rank_zero_info(
                    f"LaycaCallback: optimizer {i} trains adapters (LoRA/DoRA) only; it steps as it is, and the "
                    "rotation of the adapted layers' effective weights is monitored."
                )
                continue
            layca = Layca(
                base,
                named_parameters=pl_module.named_parameters(),
                rotation_rate=self.rotation_rate,
                schedule=self.schedule,
                include=self.include,
                exclude=[*as_patterns("LaycaCallback: `exclude`", self.exclude), *adapted],
                reference_lr=self.reference_lr or _cyclic_max_lr(trainer, base),
                granularity=self.granularity,
                implementation=self.implementation,
                target=self.target,
            )
            earlier = previous.get(i)
            if (
                earlier is not None
                and earlier.layer_names == layca.layer_names
                and earlier.granularity == layca.granularity
            ):
                # A new fit of the same training run: keep the norms of the true initialisation, the reference lr
                # and the step count that step-based schedules read. A resumed checkpoint overrides them afterwards.
                layca.load_layca_state(earlier.layca_state())
            if outer is None:
                optimizers[i] = layca
            else:
                outer.optimizer = layca
            self.laycas[i] = layca
        for i, layca in self.laycas.items():  # a checkpoint's state wins over what an earlier fit left
            if i in self._restored_laycas:
                layca.load_layca_state(self._restored_laycas[i])
        self._restored_laycas = {}
        trainer.strategy.optimizers = optimizers


def _cyclic_max_lr(trainer: pl.Trainer, optimizer: Any) -> float | None:
    """The largest ``max_lr`` of a ``CyclicLR`` driving ``optimizer`` (it keeps its peak on the scheduler only)."""
    peaks = [
        max(float(lr) for lr in config.scheduler.max_lrs)
        for config in trainer.lr_scheduler_configs
        if isinstance(config.scheduler, CyclicLR) and config.scheduler.optimizer is optimizer
    ]
    return max(peaks, default=None)
