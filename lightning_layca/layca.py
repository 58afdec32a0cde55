"""Layca: layer-level controlled amount of weight rotation, around any torch optimizer.

Reference: S. Carbonnelle and C. De Vleeschouwer, "On layer-level control of DNN training and its impact on
generalization", arXiv:1806.01603.

For every selected layer ``w`` (a weight tensor seen as one vector) and the step ``D`` the wrapped optimizer took,
Layca keeps only the rotational part of ``D``, gives it the norm ``rho_l(t) * ||w||`` and projects the result back onto
the sphere of the layer's initial norm. Each step therefore rotates the layer by exactly ``atan(rho_l(t))`` radians,
whatever the scale of the gradients, and never changes its norm. A layer whose step has no rotational part that
rounding could not also explain does not move (see :mod:`lightning_layca.step.rule`). The wrapped optimizer's state
(momentum, Adam moments) is updated from the raw gradients as usual; parameters that are not layers (biases,
normalisation parameters) are stepped by the wrapped optimizer untouched.

This module is the facade: argument checks, ``step()`` as a short sequence, and the state dict. Each concern it
delegates has a room of its own:

* :mod:`lightning_layca.wrapping`: the wrapped optimizer's containers, shared, and how its step is called;
* :mod:`lightning_layca.layers`: which layers, which are stepped now, their initial norms;
* :mod:`lightning_layca.rates`: each layer's rate (schedule, reference lr, equilibrium);
* :mod:`lightning_layca.plan`: which implementation steps which layer (:meth:`Layca.describe`), and the snapshots;
* :mod:`lightning_layca.stepping`: running the plan (kernels, fallbacks, the sharded form);
* :mod:`lightning_layca.step`: the arithmetic; :mod:`lightning_layca.diagnostics`: the warnings.

Sharded layers (``DTensor`` parameters, as FSDP2's ``fully_shard`` and tensor parallelism make them) take the eager step
(with ``implementation="compiled"``, the compiled kernel's two halves) with one ``all_reduce`` of their float64 sums
per step (:func:`lightning_layca.distributed.reduce_sums`), issued inside :meth:`Layca.step`, the same on every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from lightning_layca.argument_types import (
    DEFAULT_ROTATION_RATE,
    EQUILIBRIUM,
    MAX_ROTATION_RATE,
    Granularity,
    Implementation,
    as_patterns,
    check_granularity,
    check_implementation,
    check_reference_lr,
    check_rotation_rate,
)
from lightning_layca.diagnostics import Diagnostics
from lightning_layca.layers import LayerRegistry
from lightning_layca.plan import StepPlan
from lightning_layca.rates import Rates
from lightning_layca.schedules import RotationSchedule, as_schedule
from lightning_layca.stepping import (
    gradients_set_aside,
    read_base_steps,
    rotate_buckets,
    small_steps_on_one_thread,
    take_snapshots,
    upload_rates,
)
from lightning_layca.target_controller import TargetController
from lightning_layca.targets import RotationTarget, check_target
from lightning_layca.wrapping import WrappedOptimizer

__all__ = ["DEFAULT_ROTATION_RATE", "EQUILIBRIUM", "MAX_ROTATION_RATE", "Layca"]


class Layca(WrappedOptimizer):
    """Wrap any ``torch.optim.Optimizer`` so that each of its steps rotates every layer by ``atan(rho_l(t))``.

    ``rho_l(t) = rotation_rate * m_l(t) * lr_g(t) / lr_ref``: ``m_l(t)`` comes from the rotation ``schedule``,
    ``lr_g(t)`` is the current learning rate of the layer's param group and ``lr_ref`` the optimizer's reference
    learning rate (see ``reference_lr``), so any LR scheduler attached to the wrapper or to the wrapped optimizer shapes
    the rotation rate over time, groups with smaller learning rates rotate proportionally slower, and the magnitude of
    the learning rates cancels out.

    Layers frozen when the wrapper is built (``requires_grad=False``) and trained later, by a fine-tuning callback
    that adds them as a new param group or flips ``requires_grad``, are controlled from their first step: they
    take their place in the depth order from the start (schedules see them), and their initial norm is read when they
    join, which is their initial norm since frozen weights do not change. Layers that stay frozen cost nothing.

    The wrapper *is* a ``torch.optim.Optimizer``: its ``param_groups``, ``state`` and ``defaults`` are always the
    wrapped optimizer's own objects, whatever assigns them, and ``state_dict()`` is the wrapped optimizer's state dict
    with Layca's state added under ``"layca"``, so the wrapped optimizer alone can also load it.

    Args:
        optimizer: The optimizer to wrap.
        named_parameters: ``(name, parameter)`` pairs naming every parameter of ``optimizer``, for example
            ``model.named_parameters()``, and the frozen ones that may be trained later. Names drive layer
            selection and schedules. When omitted, parameters are named ``"param{i}"`` in the optimizer's order.
        rotation_rate: Base rotation rate ``rho`` in ``(0, 1000]``; each step rotates a layer by ``atan(rho)``
            radians at multiplier 1 and relative lr 1. Default ``3 ** -3``, the paper's best for SGD. Or
            ``"equilibrium"``: every step, each group's base rate is the angular update its optimizer reaches at
            equilibrium with weight decay (:func:`lightning_layca.step.families.equilibrium_rate`, from the group's lr,
            weight decay and momentum), times the schedule's multiplier; LR schedulers shape it through ``lr(t)``.
        schedule: Per-layer multipliers (default :class:`~lightning_layca.Uniform`).
        include: ``fnmatch`` patterns of parameter names to control (default: every parameter with ``ndim >= 2``
            that this optimizer trains or that is frozen and may be trained later).
        exclude: ``fnmatch`` patterns of parameter names never to control.
        granularity: ``"layer"`` (the paper: each layer turns by ``atan(rho)`` and keeps its norm) or ``"unit"``:
            every output unit (slice along dim 0: a row of a Linear weight, a filter of a convolution) turns by
            ``atan(rho)`` and keeps its own initial norm, the rounding-floor and non-finite rules applying per unit;
            the schedule still gives one multiplier per layer. A unit whose weights are all zero stays zero.
        reference_lr: The learning rate at which a layer rotates at ``rotation_rate * m_l``. Default: fixed at the
            first step as the largest peak learning rate among the param groups holding layers (``max_lr`` where
            ``OneCycleLR`` records one, else the ``initial_lr`` a scheduler recorded, else ``lr``), so the fastest
            group rotates at ``rotation_rate`` at its peak; a group added later (fine-tuning) is measured against the
            same reference.
        implementation: How the step is computed, always by the same rule
            (:func:`lightning_layca.step.rule.coefficients`): ``"eager"``, float64 sums and a multi-tensor update;
            ``"compiled"``, per layer one fused reduction pass and one update pass compiled with ``torch.compile``
            at the first step for float32, bfloat16 and float16 layers (one warning and the eager step where
            compiling fails), which around ``torch.optim.SGD``, ``Adam`` or ``AdamW`` themselves also takes their step
            for the layers (no snapshot); ``"auto"`` (default), on CPU in a single process the eager step until its
            steps have taken :data:`~lightning_layca.auto_choice.AUTO_COMPILE_AFTER_SECONDS`, then the faster of the
            two in trials repeated at intervals (:class:`~lightning_layca.auto_choice.AutoChoice`), else the eager step.
        target: A :class:`~lightning_layca.RotationTarget` instead of ``rotation_rate`` and ``schedule``: the rates
            (per unit under ``granularity="unit"``) follow it
            (:class:`~lightning_layca.target_controller.TargetController`).

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer`` or is already a ``Layca``, or ``schedule`` is
            not a :class:`~lightning_layca.RotationSchedule`.
        ValueError: For a ``rotation_rate`` outside ``(0, 1000]``, a pattern that matches nothing, a parameter the
            names do not cover, a complex or sparse layer, a selected layer whose weights are all zero, or no
            positive learning rate among the groups holding layers.

    Example:
        >>> import lightning_layca as ll
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        ...                named_parameters=model.named_parameters(), rotation_rate=0.1)
        >>> opt.layer_names
        ['0.weight', '2.weight']
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> _ = opt.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        *,
        rotation_rate: float | Literal["equilibrium"] = DEFAULT_ROTATION_RATE,
        schedule: RotationSchedule | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        reference_lr: float | None = None,
        granularity: Granularity = "layer",
        implementation: Implementation = "auto",
        target: RotationTarget | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Layca wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}: {optimizer!r}."
            )
        if isinstance(optimizer, Layca):
            raise TypeError("Layca: the optimizer is already wrapped in Layca; wrap the base optimizer once.")
        check_rotation_rate("Layca", rotation_rate)
        check_target("Layca", target, schedule, rotation_rate)
        schedule = as_schedule("Layca", schedule)
        check_reference_lr("Layca", reference_lr)
        check_granularity("Layca", granularity)
        check_implementation("Layca", implementation)
        include_patterns = as_patterns("Layca: `include`", include)
        exclude_patterns = as_patterns("Layca: `exclude`", exclude)

        super().__init__(optimizer)
        self.granularity: Granularity = granularity
        self.implementation: Implementation = implementation
        base_params = [p for group in optimizer.param_groups for p in group["params"]]
        self.layers = LayerRegistry(
            base_params, named_parameters, include_patterns, exclude_patterns, per_unit=granularity == "unit"
        )
        """The layer registry: candidates, controlled layers, initial norms (``lightning_layca.layers``)."""
        self.rates = Rates(rotation_rate, schedule, reference_lr, target, self.layers.names, self.layers.per_unit)
        """The rates: schedule, reference lr, equilibrium, rotation target (``lightning_layca.rates``)."""
        self.targets: TargetController | None = self.rates.controller
        """The controller of the rotation target, or ``None``."""
        self.plan = StepPlan(implementation, self.layers.per_unit, self.rates.eager_reason)
        """The step plan: which path steps which layer, the snapshots (``lightning_layca.plan``)."""
        self.step_count = 0
        self.epoch = 0
        self.restored_from_plain_state = False
        """Whether the last ``load_state_dict`` got a state dict without Layca's state (its counters then start over:
        the Lightning callback sets them from the restored training loop)."""
        self._diagnostics = Diagnostics()
        self._keep_next = False
        self.layers.update(self.param_groups)
        self.rates.check(optimizer, self.layers)  # fail early on unusable learning rates

    # ------------------------------------------------------------------ what the wrapper controls
    @property
    def layer_names(self) -> list[str]:
        """Parameter names of the candidate layers, in depth order (controlled now or later)."""
        return self.layers.names

    @property
    def controlled_layer_names(self) -> list[str]:
        """Names of the layers the next step controls: in a param group and trainable, in depth order."""
        self._update_controlled()
        return [self.layers.names[i] for i in self.layers.controlled]

    @property
    def initial_norms(self) -> list[float | None]:
        """Per candidate layer, its initial norm (``None`` until it is first controlled)."""
        return self.layers.initial_norms

    @property
    def initial_unit_norms(self) -> list[torch.Tensor | None]:
        """With ``granularity="unit"``: per candidate layer, its initial norm per unit (float64, on the CPU)."""
        return self.layers.initial_unit_norms

    @property
    def rotation_rate(self) -> float | str:
        """The base rotation rate, or ``"equilibrium"``."""
        return self.rates.rotation_rate

    @property
    def schedule(self) -> RotationSchedule:
        """The rotation schedule."""
        return self.rates.schedule

    @property
    def reference_lr(self) -> float | None:
        """The learning rate at which a layer rotates at ``rotation_rate * m_l`` (fixed at the first step if unset)."""
        return self.rates.reference_lr

    def describe(self) -> dict[str, str]:
        """Return ``{layer name: path}``: which implementation the next step takes for each controlled layer.

        Paths are ``"compiled+base"``, ``"compiled"`` and ``"eager"`` (see ``lightning_layca.plan``). A layer
        whose base step the kernel cannot take at some step (no readable gradient) falls back along that order. Under
        a per-unit rotation target every layer is ``"eager"`` (``lightning_layca.rates.PER_UNIT_TARGET_EAGER``).

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
            ...       implementation="eager").describe()
            {'0.weight': 'eager', '2.weight': 'eager'}
        """
        self._update_controlled()
        return self.plan.describe(self.layers, self.optimizer)

    def set_epoch(self, epoch: int) -> None:
        """Tell time-varying schedules the current epoch (the Lightning callbacks call this for you)."""
        self.epoch = int(epoch)

    def rotation_rates(self) -> dict[str, float]:
        """Return the effective ``rho_l(t)`` of each controlled layer for the next step, keyed by parameter name."""
        self._update_controlled()
        self.rates.prepare(self, fix_reference=False)
        rates = self.rates.of(self)
        return {self.layers.names[i]: rates[i] for i in self.layers.controlled}

    def rotation_targets(self) -> dict[str, float]:
        """Return each controlled layer's target cosine distance after the steps taken so far (empty without one)."""
        self._update_controlled()
        return {} if self.targets is None else self.targets.targets_now(self)

    def _update_controlled(self) -> None:
        if self.layers.update(self.param_groups):
            self.plan.invalidate()
            self.rates.invalidate()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the wrapped optimizer's step, then turn it into a Layca step for every controlled layer.

        Where the compiled step takes a layer's base step itself (``torch.optim.SGD``, ``Adam``, ``AdamW``; see
        ``implementation``), that layer is hidden from the wrapped optimizer's step (its gradient is set aside for its
        duration) and the fused kernel updates its weights and its state (momentum buffer, moments, step count) in the
        wrapped optimizer's ``state``.

        Args:
            closure: Re-evaluates the model and returns the loss. For torch's own optimizers (LBFGS excepted) Layca
                calls it first, with gradients enabled, as they would; other optimizers get it to call themselves.

        Returns:
            What the closure returned (``None`` without a closure).
        """
        if closure is None and not self.state and all(float(group["lr"]) == 0 for group in self.param_groups):
            # Before loading an optimizer state, torch.distributed.checkpoint (``ModelParallelStrategy``'s
            # checkpoints) creates the wrapped optimizer's state with one step at learning rate 0 from zero
            # gradients. That is no training step: nothing rotates, nothing is counted, no collective is issued.
            return self.optimizer.step()
        loss = None
        if closure is not None and self.calls_closure_first():
            with torch.enable_grad():
                loss = closure()
            closure = None
        self._update_controlled()
        self.rates.prepare(self)
        auto = self.plan.auto
        timed = auto is not None and auto.measuring
        # The whole step is timed when the closure has run already; otherwise only Layca's part of it.
        start = time.perf_counter() if timed and closure is None else None
        buckets = self.plan.for_step(self.layers, self.optimizer)
        sharded = self.plan.layout is not None
        base_steps = [
            read_base_steps(b, self.optimizer, self.layers.param_group_of, sharded, self.plan.sgd_forms)
            for b in buckets
        ]
        keep, self._keep_next = self._keep_next, False
        take_snapshots(buckets, base_steps, keep_all=keep)

        # The kernels take the base step of these layers.
        with (
            gradients_set_aside(
                [b.params[j] for b, base in zip(buckets, base_steps, strict=True) for j in base.positions]
            ),
            small_steps_on_one_thread(self.optimizer, closure),
        ):
            base_loss = self.base_step(closure)
        loss = base_loss if loss is None else loss

        rates = self.rates.of(self)
        for b in buckets:
            upload_rates(b, rates, self.rates.relative_lrs, self.rates.version, self.rates.unit_rates)
        seconds = rotate_buckets(
            buckets, base_steps, self.optimizer, self.plan.layout, self.layers, timed=timed and start is None
        )
        if start is not None:
            seconds = time.perf_counter() - start
        if auto is not None and any(b.eligible for b in buckets) and auto.record(seconds):
            self.plan.switch()  # take the other implementation from the next step on
        self.step_count += 1
        self.rates.after_step(self, rates)
        flags = [(b.near_floor, b.indices) for b in buckets]
        self._diagnostics.near_floor(flags, self.layers.names, self.layers.params, self.step_count, self.rotation_rate)
        return loss

    def keep_weights_before_next_step(self) -> None:
        """Have the next step keep the weights of every controlled layer before it (:meth:`weights_before_last_step`).

        Layers whose base step the compiled kernel takes (``torch.optim.SGD``, ``Adam``, ``AdamW``) need no copy of
        their weights for the step itself, so they keep one only when asked, for that step;
        :class:`~lightning_layca.LaycaCallback` asks on its logging steps.
        """
        self._keep_next = True

    def weights_before_last_step(self) -> dict[str, torch.Tensor]:
        """Return the weights the controlled layers had before the latest step, keyed by parameter name.

        These are Layca's own snapshot buffers (no copy): valid until the next step, and read-only. Layers whose base
        step the compiled kernel took are included only when :meth:`keep_weights_before_next_step` was called before
        that step (they need no snapshot otherwise).
        """
        return self.plan.weights_before_last_step(self.layers)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer; its layers are controlled from their first step.

        Parameters of the new group that the selection rules accept (``include``/``exclude``, ``ndim >= 2``) and that
        were not candidate layers yet take their place in the depth order of ``named_parameters``.
        """
        super().add_param_group(param_group)
        if self._base_or_none() is None:  # torch's Optimizer.__init__ adds its placeholder group
            return
        if self.layers.add(self.optimizer.param_groups[-1]["params"]):
            self.rates.resize(self.layers.names)
        self.plan.invalidate()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped optimizer's state dict, with Layca's own state (:meth:`layca_state`) under ``"layca"``."""
        state = dict(self.optimizer.state_dict())
        state["layca"] = self.layca_state()
        return state

    def layca_state(self) -> dict[str, Any]:
        """Return Layca's own state, without the wrapped optimizer's: initial norms, counters, reference lr.

        The same on every process, sharded or not. Checkpointing through ``torch.distributed.checkpoint`` (as
        ``ModelParallelStrategy`` does) keeps only an optimizer's ``state`` and ``param_groups``, so
        :class:`~lightning_layca.LaycaCallback` saves this in its own state as well.
        """
        return {
            **self.layers.state(),
            "reference_lr": self.reference_lr,
            "step_count": self.step_count,
            "epoch": self.epoch,
            "rotation_rate": self.rotation_rate,
            "sgd_forms": self.plan.sgd_forms.state(),
            **self.rates.state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state dict from :meth:`state_dict`, or a plain state dict of the wrapped optimizer.

        A plain state dict (for example from a checkpoint written before Layca was added) restores the wrapped
        optimizer, keeps Layca's current initial norms, and sets :attr:`restored_from_plain_state`.
        """
        state_dict = dict(state_dict)
        layca = state_dict.pop("layca", None)
        if layca is not None:
            self.layers.check(layca)
        self.optimizer.load_state_dict(state_dict)
        self.restored_from_plain_state = layca is None
        if layca is not None:
            self.load_layca_state(layca)
        self.layers.invalidate()
        self.rates.invalidate()

    def load_layca_state(self, layca: dict[str, Any]) -> None:
        """Restore Layca's own state from :meth:`layca_state`, leaving the wrapped optimizer's state as it is.

        Raises:
            ValueError: When the state was saved for other layers or another granularity.
        """
        self.layers.check(layca)
        self.plan.sgd_forms.load(layca.get("sgd_forms", {}))  # checked before anything else is loaded
        self.layers.load(layca)
        self.step_count = int(layca["step_count"])
        self.epoch = int(layca["epoch"])
        self.restored_from_plain_state = False
        self.rates.load(layca)

    def __repr__(self) -> str:
        return (
            f"Layca(rotation_rate={self.rotation_rate!r}, schedule={self.schedule!r}, "
            f"layers={len(self.layer_names)}, optimizer={self.optimizer!r})"
        )
