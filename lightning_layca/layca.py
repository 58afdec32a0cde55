"""Layca: layer-level controlled amount of weight rotation, around any torch optimizer.

Reference: S. Carbonnelle and C. De Vleeschouwer, "On layer-level control of DNN training and its impact on
generalization", arXiv:1806.01603.

For every selected layer ``w`` (a weight tensor seen as one vector) and the step ``D`` the wrapped optimizer took,
Layca keeps only the rotational part of ``D``, gives it the norm ``rho_l(t) * ||w||`` and projects the result back onto
the sphere of the layer's initial norm. Each step therefore rotates the layer by exactly ``atan(rho_l(t))`` radians,
whatever the scale of the gradients, and never changes its norm. A layer whose step has no rotational part that
rounding could not also explain does not move (see :mod:`lightning_layca.step`). The wrapped optimizer's state
(momentum, Adam moments) is updated from the raw gradients as usual; parameters that are not layers (biases,
normalisation parameters) are stepped by the wrapped optimizer untouched.

This module holds the orchestration: which layers are controlled (including layers frozen at first and trained
later), their rates, their state, and the grouping of layers by device and dtype; the arithmetic of the step is in
:mod:`lightning_layca.step`.

Sharded layers (``DTensor`` parameters, as FSDP2's ``fully_shard`` and tensor parallelism make them) take the summed
form of the step: every rank sums ``(<D, w>, <w, w>, <D, D>)`` over its local shard of every layer in float64, one
``all_reduce`` for all layers together turns the parts into full sums (:func:`lightning_layca.distributed.full_sums`),
and every rank applies the same per-layer coefficients to its own shard. The snapshot of ``w`` is per shard, and the
only collectives are issued inside :meth:`Layca.step`, the same on every rank.
"""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch.optim import Optimizer

from lightning_layca.base_steps import LayerStep, group_supported, kernel_family, plan_layer
from lightning_layca.compiled_step import (
    IMPLEMENTATIONS,
    AutoChoice,
    Implementation,
    compiled_step_ready,
    kernel_view,
    parallel_kernel,
    rotate_base_compiled,
    rotate_compiled,
    scalars,
    unit_view,
    use_compiled_step,
)
from lightning_layca.distributed import ShardLayout, full_sums, is_dtensor, local_shard, shard_layout
from lightning_layca.rotation import pair_sums
from lightning_layca.schedules import RotationSchedule, Uniform
from lightning_layca.selection import as_patterns, select_layers
from lightning_layca.step import (
    NEAR_FLOOR_FACTOR,
    apply_coefficients,
    coefficients,
    rotate_eager,
    rotate_eager_units,
    step_sums,
    unit_counts,
    unit_roundoff,
)

__all__ = ["DEFAULT_ROTATION_RATE", "EQUILIBRIUM", "MAX_ROTATION_RATE", "Layca", "equilibrium_rate"]

DEFAULT_ROTATION_RATE = 3**-3
"""The paper's best base rotation rate for SGD-based Layca."""

MAX_ROTATION_RATE = 1e3
"""The largest base rotation rate accepted: ``atan(1000)`` is 89.94 degrees, a quarter turn per step in all but name,
so a larger value is a mistake. Effective rates above it (large multipliers or learning-rate ratios) still compute
without overflow."""

_FLOOR_CHECK_EVERY = 100
"""On accelerators, the host reads the near-floor flags every this many steps (on CPU: every step, at no cost)."""


EQUILIBRIUM = "equilibrium"
"""``rotation_rate=EQUILIBRIUM``: each group's rate is the angular update its optimizer reaches at equilibrium."""


def check_rotation_rate(owner: str, rotation_rate: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``0 < rotation_rate <= MAX_ROTATION_RATE``.

    The string ``"equilibrium"`` is accepted too (see :func:`equilibrium_rate`).
    """
    if rotation_rate == EQUILIBRIUM:
        return
    if (
        isinstance(rotation_rate, bool)
        or not isinstance(rotation_rate, int | float)
        or not math.isfinite(rotation_rate)
        or not 0 < rotation_rate <= MAX_ROTATION_RATE
    ):
        raise ValueError(
            f"{owner}: `rotation_rate` must be a number in (0, {MAX_ROTATION_RATE:g}] (a layer turns by "
            f"atan(rotation_rate) per step; the paper's best is 3**-3 = {DEFAULT_ROTATION_RATE:.6g}) or "
            f"'{EQUILIBRIUM}', got {rotation_rate!r}."
        )


def equilibrium_rate(optimizer: Optimizer, group: dict[str, Any]) -> float:
    """Return the angular update per step (tan of the angle) that ``optimizer`` reaches at equilibrium on ``group``.

    With weight decay, the norm of a scale-invariant layer settles where decay's shrinking balances the growth from
    updates orthogonal to the weights; the angle each step then turns the layer is (Kosson et al., "Rotational
    Equilibrium", 2024), with ``lr`` and ``wd`` the group's learning rate and weight decay:

    * ``AdamW`` (decoupled decay, ``beta1`` its first beta): ``sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))``;
    * ``SGD`` with momentum ``mu`` (no dampening) and weight decay: ``sqrt(2 * lr * wd / (1 + mu))``.

    Raises:
        ValueError: For another optimizer, a group without positive weight decay, or SGD with dampening.

    Example:
        >>> p = torch.nn.Parameter(torch.randn(4, 4))
        >>> round(equilibrium_rate(torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4),
        ...                        {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "dampening": 0}), 6)
        0.007255
    """
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if type(optimizer) not in (torch.optim.SGD, torch.optim.AdamW):
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' knows the equilibrium of torch.optim.SGD and torch.optim.AdamW, "
            f"not of {type(optimizer).__name__}; give the rotation rate as a number."
        )
    if not wd > 0:
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' needs weight decay: a parameter group holding layers has "
            f"weight_decay={wd} (without decay the norm grows forever and there is no equilibrium). Set "
            "weight_decay > 0 on that group, or give the rotation rate as a number."
        )
    if isinstance(optimizer, torch.optim.AdamW):
        beta1 = float(group["betas"][0])
        return math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))
    if float(group.get("dampening", 0.0)) != 0:
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' covers SGD without dampening; got dampening={group['dampening']}."
        )
    return math.sqrt(2 * lr * wd / (1 + float(group.get("momentum", 0.0))))


def check_implementation(owner: str, implementation: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``implementation`` is an accepted one."""
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{owner}: `implementation` must be one of {', '.join(repr(x) for x in IMPLEMENTATIONS)}, "
            f"got {implementation!r}."
        )


def check_granularity(owner: str, granularity: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``granularity`` is ``"layer"`` or ``"unit"``."""
    if granularity not in ("layer", "unit"):
        raise ValueError(f"{owner}: `granularity` must be 'layer' or 'unit', got {granularity!r}.")


def group_peak_lr(group: dict[str, Any]) -> float:
    """Return the learning rate a parameter group peaks at, as far as the group records it.

    ``OneCycleLR`` records its peak as ``max_lr``; other schedulers record the lr they started from as
    ``initial_lr``; without a scheduler the group's ``lr`` is taken.
    """
    return float(group.get("max_lr", group.get("initial_lr", group.get("lr", 1.0))))


# On CPU a multi-tensor op is a loop over tensors, so each pass streams the whole group through memory. Stepping the
# layers in chunks of a few MiB keeps a chunk cache-resident across the passes of one Layca step.
_CPU_CHUNK_BYTES: int | None = 4 * 2**20


def _chunks(indices: list[int], layers: list[torch.Tensor], max_bytes: int | None) -> list[list[int]]:
    """Split consecutive layer indices into runs of at most ``max_bytes`` (a larger layer forms its own run)."""
    if max_bytes is None:
        return [indices]
    out: list[list[int]] = [[]]
    size = 0
    for i in indices:
        nbytes = layers[i].numel() * layers[i].element_size()
        if out[-1] and size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


@dataclass
class _Group:
    """The controlled layers of one (device, dtype) chunk, their snapshot buffers and device-side values.

    In ``compiled`` groups, the layers at ``fused`` positions take the fused step (see
    :mod:`lightning_layca.compiled_step`), which reads them through ``views`` and their values through per-layer
    tensors (``*_scalars``, one per position; with ``granularity="unit"``, ``norm_scalars`` holds each layer's norms
    per unit); the others (a layer that is not one dense block of memory, or that has no split into at least 2 rows
    and 2 columns) take the eager step.
    """

    indices: list[int]
    params: list[torch.Tensor]
    previous: list[torch.Tensor]
    """Per layer, the weights before the base step: this rank's local shard of a sharded layer."""
    initial_norms: torch.Tensor
    """Per layer, or per unit (rows of the group's layers, concatenated) with ``granularity="unit"``."""
    near_floor: torch.Tensor
    """Per layer: whether a step of the layer (of one of its units) came near the rounding floor."""
    row_layer: torch.Tensor | None = None
    """With ``granularity="unit"``: the position in the group of the layer each row belongs to."""
    rates: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    relative_lrs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    rates_version: int = -1
    eligible: bool = False
    compiled: bool = False
    fused: list[int] = field(default_factory=list)
    views: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    parallel: list[bool] = field(default_factory=list)
    norm_scalars: list[torch.Tensor] = field(default_factory=list)
    flag_scalars: list[torch.Tensor] = field(default_factory=list)
    rate_scalars: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    """``rho`` and the relative learning rate of every position, as the compiled kernels read them."""
    unfused: list[int] = field(default_factory=list)
    """Positions of the layers the eager step takes in a compiled group."""
    owned: list[int] = field(default_factory=list)
    """Positions of the layers whose base step (``torch.optim.SGD``, ``Adam``, ``AdamW``) the fused kernel takes as
    well (no snapshot; see :mod:`lightning_layca.base_steps`). Disjoint from ``fused`` and ``unfused``."""
    owned_views: list[torch.Tensor] = field(default_factory=list)
    owned_parallel: list[bool] = field(default_factory=list)
    hyper_values: list[tuple[float, ...]] = field(default_factory=list)
    hyper_rows: list[torch.Tensor] = field(default_factory=list)
    shapes: list[tuple[torch.device, torch.dtype, torch.Size]] = field(default_factory=list)
    """The device, dtype and shape of each layer (local shard) when the group was built."""
    kept: list[int] = field(default_factory=list)
    """Positions whose ``previous`` holds the weights before the latest step."""
    subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    """Device index tensors of a subset of the layers: their positions, their values' positions (rows with
    ``granularity="unit"``) and, per row, the position of its layer in the subset (built once per subset)."""


@dataclass
class _KernelPlan:
    """The base steps the fused kernel takes at one step for the owned layers of a group (``Layca._kernel_plan``)."""

    positions: list[int] = field(default_factory=list)
    """Positions (in the group) of the layers the kernel takes at this step; the lists below follow them."""
    steps: list[LayerStep] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[list[torch.Tensor]] = field(default_factory=list)
    """Per layer, kernel views of the state tensors of its step."""
    hypers: list[torch.Tensor] = field(default_factory=list)
    parallel: list[bool] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)
    """Positions of owned layers that take the base step and the other path at this step."""


@contextmanager
def _gradients_set_aside(params: list[torch.Tensor]) -> Iterator[None]:
    """Hide the gradients of ``params`` (``None``) from an optimizer step, and give the same tensors back after it."""
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad


def _device_values(values: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 tensor on ``device``; to an accelerator through pinned memory, without a sync."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
    return host.to(device, non_blocking=True)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


class Layca(Optimizer):
    """Wrap any ``torch.optim.Optimizer`` so that each of its steps rotates every layer by ``atan(rho_l(t))``.

    ``rho_l(t) = rotation_rate * m_l(t) * lr_g(t) / lr_ref``: ``m_l(t)`` comes from the rotation ``schedule``,
    ``lr_g(t)`` is the current learning rate of the layer's parameter group and ``lr_ref`` the optimizer's reference
    learning rate (see ``reference_lr``), so any LR scheduler attached to the wrapper or to the wrapped optimizer shapes
    the rotation rate over time, groups with smaller learning rates rotate proportionally slower, and the magnitude of
    the learning rates cancels out.

    Layers frozen when the wrapper is built (``requires_grad=False``) and trained later, by a fine-tuning callback
    that adds them as a new parameter group or flips ``requires_grad``, are controlled from their first step: they
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
            equilibrium with weight decay (``lightning_layca.layca.equilibrium_rate``, from the group's current lr,
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
            first step as the largest peak learning rate among the parameter groups holding layers (``max_lr`` where
            ``OneCycleLR`` records one, else the ``initial_lr`` a scheduler recorded, else ``lr``), so the fastest
            group rotates at ``rotation_rate`` at its peak; a group added later (fine-tuning) is measured against the
            same reference.
        implementation: How the step is computed; every implementation applies the same rule
            (:func:`lightning_layca.step.coefficients`). ``"eager"``: multi-tensor torch operations. ``"compiled"``:
            per layer, one fused reduction pass and one update pass, compiled with ``torch.compile`` at the first step
            (Inductor: C++ on CPU, Triton on CUDA) for float32, bfloat16 and float16 layers; where compilation fails,
            one warning and the eager step. Around ``torch.optim.SGD``, ``Adam`` or ``AdamW`` themselves (not
            subclasses), the kernel takes their step for the layers as well (their state kept where they keep it),
            so no snapshot of the weights is needed. ``"auto"`` (default): on CPU, the eager step until its steps
            have taken
            :data:`~lightning_layca.compiled_step.AUTO_COMPILE_AFTER_SECONDS` in total, then the compiled step if it
            turns out faster (:class:`~lightning_layca.compiled_step.AutoChoice`), so that a short fit never waits
            for a compilation; elsewhere the eager step (the compiled one has not been measured on GPUs yet).

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
        granularity: Literal["layer", "unit"] = "layer",
        implementation: Implementation = "auto",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Layca wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}: {optimizer!r}."
            )
        if isinstance(optimizer, Layca):
            raise TypeError("Layca: the optimizer is already wrapped in Layca; wrap the base optimizer once.")
        check_rotation_rate("Layca", rotation_rate)
        if schedule is None:
            schedule = Uniform()
        if not isinstance(schedule, RotationSchedule):
            raise TypeError(f"Layca: `schedule` must be a RotationSchedule instance, got {schedule!r}.")
        if reference_lr is not None:
            self._check_reference_lr(reference_lr, "`reference_lr`")
        check_granularity("Layca", granularity)
        check_implementation("Layca", implementation)

        # torch's Optimizer.__init__ sets up hook registries and step patching; its placeholder containers are kept
        # apart (see the properties below) until the wrapped optimizer is known.
        super().__init__([torch.zeros(0)], {})
        self.optimizer = optimizer
        self.rotation_rate: float | Literal["equilibrium"] = (
            EQUILIBRIUM if rotation_rate == EQUILIBRIUM else float(rotation_rate)
        )
        self.schedule = schedule
        self.granularity: Literal["layer", "unit"] = granularity
        self.reference_lr: float | None = None if reference_lr is None else float(reference_lr)
        self.implementation: Implementation = implementation
        self._auto = AutoChoice() if implementation == "auto" else None
        self._include = as_patterns("Layca: `include`", include)
        self._exclude = as_patterns("Layca: `exclude`", exclude)

        base_params = [p for group in optimizer.param_groups for p in group["params"]]
        self._names = self._name_parameters(base_params, named_parameters)
        in_optimizer = {id(p) for p in base_params}
        # A frozen parameter outside the optimizer may be added to it later (fine-tuning): it is a candidate layer.
        eligible = [(name, p) for name, p in self._names.values() if id(p) in in_optimizer or not p.requires_grad]
        layers = select_layers(eligible, include=include, exclude=exclude, trainable_only=False)
        if not layers:
            raise ValueError(
                "Layca: no parameter selected as a layer (default: parameters with ndim >= 2). "
                f"Available names: {', '.join(name for name, _ in eligible)}."
            )
        for name, p in layers:
            self._check_layer(name, p)
        self.layer_names: list[str] = [name for name, _ in layers]
        self._layers: list[torch.Tensor] = [p for _, p in layers]
        schedule.validate(self.layer_names)
        self.initial_norms: list[float | None] = [None] * len(self._layers)
        self.initial_unit_norms: list[torch.Tensor | None] = [None] * len(self._layers)
        """With ``granularity="unit"``: every layer's initial norm per unit (float64, on the CPU)."""
        self.step_count = 0
        self.epoch = 0
        self.restored_from_plain_state = False
        """Whether the last ``load_state_dict`` got a state dict without Layca's state (its counters then start over:
        the Lightning callback sets them from the restored training loop)."""

        self._controlled_key: Hashable = None
        self._controlled: list[int] = []
        self._layer_group: dict[int, int] = {}
        self._groups: list[_Group] | None = None
        self._schedule_key: Hashable = object()
        self._multipliers: list[float] = []
        self._rates: list[float] = []
        self._relative_lrs: list[float] = []
        self._rates_version = 0
        self._warned_near_floor: set[str] = set()
        self._warned_overflow: set[str] = set()
        self._joining: list[int] = []
        self._step_layout: ShardLayout | None = None
        self._warned_sharded_eager = False
        self._keep_next = False
        self._update_controlled()
        if self._controlled and self.reference_lr is None:
            self._default_reference_lr()  # fail early on learning rates that cannot define relative rates
        if self.rotation_rate == EQUILIBRIUM:
            for g in set(self._layer_group.values()):
                equilibrium_rate(optimizer, optimizer.param_groups[g])  # fail early on what the formula lacks

    # ------------------------------------------------------------------ the wrapped optimizer's containers
    # Properties rather than copied references: code that assigns `optimizer.param_groups = ...` on the wrapper (as
    # Lightning's fine-tuning callbacks do when they restore their groups) must change the wrapped optimizer.
    def _base_or_none(self) -> Optimizer | None:
        return self.__dict__.get("optimizer")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's ``param_groups`` (the same list object)."""
        base = self._base_or_none()
        return base.param_groups if base is not None else self.__dict__["_placeholder_param_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self._base_or_none()
        if base is None:
            self.__dict__["_placeholder_param_groups"] = value
        else:
            base.param_groups = value

    @property
    def state(self) -> Any:
        """The wrapped optimizer's ``state`` (the same object)."""
        base = self._base_or_none()
        return base.state if base is not None else self.__dict__["_placeholder_state"]

    @state.setter
    def state(self, value: Any) -> None:
        base = self._base_or_none()
        if base is None:
            self.__dict__["_placeholder_state"] = value
        else:
            base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's ``defaults`` (the same object)."""
        base = self._base_or_none()
        return base.defaults if base is not None else self.__dict__["_placeholder_defaults"]

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        base = self._base_or_none()
        if base is None:
            self.__dict__["_placeholder_defaults"] = value
        else:
            base.defaults = value

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _name_parameters(
        base_params: list[torch.Tensor], named_parameters: Iterable[tuple[str, torch.Tensor]] | None
    ) -> dict[int, tuple[str, torch.Tensor]]:
        """Return ``id(parameter) -> (name, parameter)`` in ``named_parameters`` order (tied weights: first name)."""
        if named_parameters is None:
            return {id(p): (f"param{i}", p) for i, p in enumerate(base_params)}
        named: dict[int, tuple[str, torch.Tensor]] = {}
        for pair in named_parameters:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise TypeError(f"Layca: `named_parameters` must yield (name, parameter) pairs, got {pair!r}.")
            named.setdefault(id(pair[1]), pair)
        missing = [i for i, p in enumerate(base_params) if id(p) not in named]
        if missing:
            shapes = ", ".join(f"#{i} {tuple(base_params[i].shape)}" for i in missing[:10])
            raise ValueError(
                f"Layca: {len(missing)} parameter(s) of the optimizer are not named by `named_parameters` ({shapes}). "
                "Pass the named_parameters() of the module whose parameters the optimizer trains."
            )
        return named

    @staticmethod
    def _check_layer(name: str, p: torch.Tensor) -> None:
        if p.is_complex() or not p.is_floating_point():
            raise ValueError(f"Layca: layer {name!r} has dtype {p.dtype}; only real floating-point layers rotate.")
        if p.is_sparse:
            raise ValueError(f"Layca: layer {name!r} is sparse; exclude it (exclude={name!r}).")

    @staticmethod
    def _check_reference_lr(lr: float, what: str) -> None:
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(
                f"Layca: {what} must be positive and finite to define relative rotation rates, got {lr}. Only the "
                "parameter groups that hold layers need one; pass `reference_lr` to set it explicitly."
            )

    def _default_reference_lr(self) -> float:
        groups = self.param_groups
        peaks = [group_peak_lr(groups[g]) for g in sorted(set(self._layer_group.values()))]
        lr = max(peaks, default=0.0)
        self._check_reference_lr(lr, f"the learning rates of the parameter groups holding layers ({peaks})")
        return lr

    # ------------------------------------------------------------------ which layers are controlled now
    def _update_controlled(self) -> None:
        """Find the layers stepped now: in a parameter group and trainable. Cheap when nothing changed."""
        groups = self.param_groups
        key = (
            tuple(id(group["params"]) for group in groups),
            tuple(len(group["params"]) for group in groups),
            tuple(p.requires_grad for p in self._layers),
        )
        if key == self._controlled_key:
            return
        group_of = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
        self._layer_group = {i: group_of[id(p)] for i, p in enumerate(self._layers) if id(p) in group_of}
        controlled = [i for i in self._layer_group if self._layers[i].requires_grad]
        # Joining now: frozen until now, so their weights are their initial weights.
        joining = [
            i
            for i in controlled
            if self.initial_norms[i] is None or (self.granularity == "unit" and self.initial_unit_norms[i] is None)
        ]
        if any(is_dtensor(self._layers[i]) for i in joining):
            self._joining = joining  # their norms come from the sums of the next step (see _take_initial_norms)
        else:
            self._joining = []
            if joining:
                self._set_initial_norms(joining)
        self._controlled = controlled
        self._controlled_key = key
        self._groups = None
        self._rates = []

    def _set_initial_norms(self, indices: list[int]) -> None:
        """Record the initial norms of joining layers (per unit too with ``granularity="unit"``).

        Float64 sums over each rank's part, through the seam: one collective when the layers are sharded.
        """
        layers = [self._layers[i].detach() for i in indices]
        layout = shard_layout(layers)
        local = [local_shard(p) for p in layers]
        squares = [pair_sums([w], [w], per_unit=True)[:, 1:2] for w in local]  # per local unit: <w, w>
        unit_sq = full_sums(layout.scatter_rows(squares), layout.row_divisors(squares[0].device)).squeeze(1).cpu()
        for i, rows in zip(indices, unit_sq.split(list(layout.rows)), strict=True):
            norm = math.sqrt(float(rows.sum()))
            self._check_initial_norm(i, norm)
            self.initial_norms[i] = norm
            if self.granularity == "unit":
                self.initial_unit_norms[i] = rows.sqrt()

    def _check_initial_norm(self, i: int, norm: float) -> None:
        if not norm > 0 or not math.isfinite(norm):
            raise ValueError(
                f"Layca: layer {self.layer_names[i]!r} has weights of norm {norm}; Layca cannot rotate a zero (or "
                f"non-finite) vector. Initialise it differently or leave it to the base optimizer with "
                f"exclude={self.layer_names[i]!r}."
            )

    @property
    def controlled_layer_names(self) -> list[str]:
        """Names of the layers the next step controls: in a parameter group and trainable, in depth order."""
        self._update_controlled()
        return [self.layer_names[i] for i in self._controlled]

    # ------------------------------------------------------------------ rates
    def set_epoch(self, epoch: int) -> None:
        """Tell time-varying schedules the current epoch (the Lightning callbacks call this for you)."""
        self.epoch = int(epoch)

    def rotation_rates(self) -> dict[str, float]:
        """Return the effective ``rho_l(t)`` of each controlled layer for the next step, keyed by parameter name."""
        self._update_controlled()
        rates = self._current_rates()
        return {self.layer_names[i]: rates[i] for i in self._controlled}

    @property
    def rates_version(self) -> int:
        """A counter that increases whenever the effective rates change (for loggers that log on change)."""
        self._update_controlled()
        self._current_rates()
        return self._rates_version

    def _current_rates(self) -> list[float]:
        """Rates of every candidate layer (0 for those outside every parameter group)."""
        key = self.schedule.cache_key(self.step_count, self.epoch)
        if key != self._schedule_key:
            multipliers = [float(m) for m in self.schedule.multipliers(self.layer_names, self.step_count, self.epoch)]
            if len(multipliers) != len(self.layer_names) or not all(math.isfinite(m) and m >= 0 for m in multipliers):
                raise ValueError(
                    f"Layca: schedule {self.schedule!r} returned {multipliers!r}; expected "
                    f"{len(self.layer_names)} finite non-negative multipliers."
                )
            self._multipliers = multipliers
            self._schedule_key = key
        if self.reference_lr is not None:
            reference = self.reference_lr
        elif self._layer_group:
            reference = self._default_reference_lr()
        else:  # no layer in any group yet (every layer frozen): nothing to rotate
            reference = 1.0
        groups = self.param_groups
        relative_lrs = [0.0] * len(self.layer_names)
        for i, g in self._layer_group.items():
            relative_lrs[i] = float(groups[g]["lr"]) / reference
        if isinstance(self.rotation_rate, str):  # "equilibrium"
            base_rates = [0.0] * len(self.layer_names)
            group_rates = {g: equilibrium_rate(self.optimizer, groups[g]) for g in set(self._layer_group.values())}
            for i, g in self._layer_group.items():
                base_rates[i] = group_rates[g]
            rates = [m * r for m, r in zip(self._multipliers, base_rates, strict=True)]
        else:
            rates = [self.rotation_rate * m * r for m, r in zip(self._multipliers, relative_lrs, strict=True)]
        if rates != self._rates or relative_lrs != self._relative_lrs:
            self._rates = rates
            self._relative_lrs = relative_lrs
            self._rates_version += 1
        return rates

    # ------------------------------------------------------------------ the step
    def _build_groups(self) -> list[_Group]:
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i in self._controlled:
            p = self._layers[i]
            by_key[(p.device, p.dtype)].append(i)
        chunks: list[tuple[list[int], bool]] = []
        for (device, dtype), indices in by_key.items():
            eligible = use_compiled_step(self.implementation, device, dtype)
            chunks.extend(
                (chunk, eligible)
                for chunk in _chunks(indices, self._layers, _CPU_CHUNK_BYTES if device.type == "cpu" else None)
            )
        groups = []
        order = [i for idx, _ in chunks for i in idx]
        layout = shard_layout([self._layers[i] for i in order])
        self._step_layout = layout if layout.sharded else None
        position = {i: k for k, i in enumerate(order)}
        # Sharded layers take the summed step (local sums, one all_reduce, update), which a fused kernel cannot split.
        compile_now = self._step_layout is None and (self._auto is None or self._auto.compiled)
        if self._step_layout is not None and self.implementation == "compiled" and not self._warned_sharded_eager:
            self._warned_sharded_eager = True
            warnings.warn(
                "Layca: implementation='compiled' does not apply to sharded (DTensor) layers: their step sums over "
                "each process's shard, adds the sums of all processes with one all_reduce, then updates each shard, "
                "and the fused kernel cannot be split around that collective. They take the eager summed step.",
                stacklevel=4,
            )
        for idx, eligible in chunks:
            device = self._layers[idx[0]].device
            params = [self._layers[i] for i in idx]
            locals_ = [local_shard(p.detach()) for p in params]
            row_layer = None
            # A sharded layer joining at this step gets its initial norm from the step's own sums (NaN until then).
            if self.granularity == "unit":
                # This rank's units of each layer (all of them unless the layer's rows are sharded).
                norms = torch.cat([self._local_unit_norms(i, layout, position[i]) for i in idx])
                counts = torch.tensor([layout.local_rows[position[i]] for i in idx], device=device)
                row_layer = torch.repeat_interleave(torch.arange(len(idx), device=device), counts)
            else:
                norms = torch.tensor([_nan_if_none(self.initial_norms[i]) for i in idx], dtype=torch.float64)
            g = _Group(
                indices=idx,
                params=params,
                previous=[torch.empty_like(x) for x in locals_],
                shapes=[(x.device, x.dtype, x.shape) for x in locals_],
                initial_norms=norms.to(device),
                near_floor=torch.zeros(len(idx), dtype=torch.bool, device=device),
                row_layer=row_layer,
                eligible=eligible and self._step_layout is None,
            )
            if eligible and compile_now:
                self._prepare_compiled(g)
            groups.append(g)
        return groups

    def _local_unit_norms(self, i: int, layout: ShardLayout, position: int) -> torch.Tensor:
        """The initial norms of the units of layer ``i`` this rank holds (NaN while the layer has not joined)."""
        norms = self.initial_unit_norms[i]
        if norms is None:
            return torch.full((layout.local_rows[position],), math.nan, dtype=torch.float64)
        start = layout.row_starts[position]
        return norms[start : start + layout.local_rows[position]]

    def _prepare_compiled(self, g: _Group) -> None:
        """The views and per-layer tensors of the compiled step for the layers of ``g`` it can take."""
        view = unit_view if self.granularity == "unit" else kernel_view
        pairs = [(view(p.detach()), view(w)) for p, w in zip(g.params, g.previous, strict=True)]
        viewable = [j for j, (vp, vw) in enumerate(pairs) if vp is not None and vw is not None]
        g.owned = [j for j in viewable if self._base_kernel_applies(g.indices[j])]
        g.fused = [j for j in viewable if j not in g.owned]
        g.unfused = [j for j in range(len(g.params)) if j not in viewable]
        g.compiled = bool(viewable)
        views = [(vp, vw) for vp, vw in pairs if vp is not None and vw is not None]
        g.views = [views[viewable.index(j)][0] for j in g.fused], [views[viewable.index(j)][1] for j in g.fused]
        g.parallel = [parallel_kernel(g.params[j]) for j in g.fused]
        g.owned_views = [views[viewable.index(j)][0] for j in g.owned]
        g.owned_parallel = [parallel_kernel(g.params[j]) for j in g.owned]
        for j in g.owned:  # no snapshot buffer until one is needed (see _snapshot)
            g.previous[j] = torch.empty(0, device=g.previous[j].device, dtype=g.previous[j].dtype)
        if self.granularity == "unit":  # each layer's norms per unit, in a tensor of its own
            g.norm_scalars = [norms.clone() for norms in g.initial_norms.split(unit_counts(g.params))]
        else:
            g.norm_scalars = scalars(g.initial_norms)
        g.flag_scalars = scalars(g.near_floor)
        if g.compiled and g.unfused:  # index tensors built now, not in a step (on an accelerator, that would sync)
            g.subsets[tuple(g.unfused)] = self._subset(g, g.unfused)

    def _base_kernel_applies(self, i: int) -> bool:
        """Whether layer ``i``'s base step may be taken by the fused kernel (see :mod:`lightning_layca.base_steps`)."""
        family = kernel_family(self.optimizer)
        return family is not None and group_supported(family, self.param_groups[self._layer_group[i]])

    def _groups_for_step(self) -> list[_Group]:
        groups = self._groups
        if groups is None or any(
            (x.device, x.dtype, x.shape) != shape
            for g in groups
            for x, shape in zip(self._locals(g), g.shapes, strict=True)
        ):
            groups = self._groups = self._build_groups()
        return groups

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
        if closure is not None and self._calls_closure_first():
            with torch.enable_grad():
                loss = closure()
            closure = None
        self._update_controlled()
        if self._controlled and self.reference_lr is None:
            self.reference_lr = self._default_reference_lr()
        auto = self._auto if self._auto is not None and self._auto.measuring else None
        # The whole step is timed when the closure has run already; otherwise only Layca's part of it.
        start = time.perf_counter() if auto is not None and closure is None else None
        groups = self._groups_for_step()
        plans = [self._kernel_plan(g) for g in groups]
        keep = self._keep_next
        self._keep_next = False
        for g, plan in zip(groups, plans, strict=True):
            owned = set(g.owned) - set(plan.fallback)
            g.kept = [j for j in range(len(g.params)) if keep or j not in owned]
            self._snapshot(g, g.kept)

        # The fused kernel takes the base step of these layers.
        with _gradients_set_aside([g.params[j] for g, plan in zip(groups, plans, strict=True) for j in plan.positions]):
            if closure is None:
                base_loss = self.optimizer.step()
            else:

                def closure_with_grad() -> Any:
                    with torch.enable_grad():
                        return closure()

                base_loss = self.optimizer.step(closure_with_grad)
        loss = base_loss if loss is None else loss

        rates = self._current_rates()
        seconds = 0.0
        for g, plan in zip(groups, plans, strict=True):
            part = time.perf_counter() if auto is not None and start is None and g.eligible else None
            if g.rates_version != self._rates_version:  # a host-to-device copy only when the rates change
                self._update_group_rates(g, rates)
            if self._step_layout is not None:
                continue  # sharded: the summed step below takes every group at once
            self._rotate_group(g, plan)
            if part is not None:  # eligible groups are on CPU: their kernels have finished
                seconds += time.perf_counter() - part
        if self._step_layout is not None:
            self._rotate_sharded(groups, self._step_layout)
        if start is not None:
            seconds = time.perf_counter() - start
        if auto is not None and any(g.eligible for g in groups) and auto.record(seconds):
            self._groups = None  # take the other implementation from the next step on
        self.step_count += 1
        self._warn_near_floor(groups)
        return loss

    def keep_weights_before_next_step(self) -> None:
        """Have the next step keep the weights of every controlled layer before it (:meth:`weights_before_last_step`).

        Layers whose base step the compiled kernel takes (``torch.optim.SGD``, ``Adam``, ``AdamW``) need no copy of
        their weights for the step itself, so they keep one only when asked, for that step;
        :class:`~lightning_layca.LaycaCallback` asks on its logging steps.
        """
        self._keep_next = True

    def _calls_closure_first(self) -> bool:
        """Whether the wrapped optimizer is one of torch's, which call the closure once, first (LBFGS excepted)."""
        base = type(self.optimizer)
        return base.__module__.startswith("torch.optim.") and base is not torch.optim.LBFGS

    def _update_group_rates(self, g: _Group, rates: list[float]) -> None:
        values = [[rates[i] for i in g.indices], [self._relative_lrs[i] for i in g.indices]]
        layer_rates, layer_relative_lrs = _device_values(values, g.near_floor.device)
        if g.compiled:
            g.rate_scalars = scalars(layer_rates), scalars(layer_relative_lrs)
        g.rates, g.relative_lrs = layer_rates, layer_relative_lrs
        if g.row_layer is not None:
            g.rates, g.relative_lrs = g.rates[g.row_layer], g.relative_lrs[g.row_layer]
        g.rates_version = self._rates_version

    def _snapshot(self, g: _Group, positions: list[int]) -> None:
        """Copy the current weights of the layers of ``g`` at ``positions`` into their snapshot buffers.

        The layers whose base step the kernel takes have a buffer only for the steps that need one (allocated then,
        released at the next step that does not): their memory is not held between logging steps.
        """
        for j in set(g.owned).difference(positions):
            if g.previous[j].numel():
                g.previous[j] = torch.empty(0, device=g.previous[j].device, dtype=g.previous[j].dtype)
        for j in positions:
            if g.previous[j].shape != g.shapes[j][2]:
                g.previous[j] = torch.empty_like(local_shard(g.params[j].detach()))
        if len(positions) == len(g.params):
            torch._foreach_copy_(g.previous, self._locals(g))
        elif positions:
            torch._foreach_copy_(
                [g.previous[j] for j in positions], [local_shard(g.params[j].detach()) for j in positions]
            )

    def _rotate_group(self, g: _Group, plan: _KernelPlan) -> None:
        """Turn the base step of the layers of ``g`` into Layca steps, and take the planned fused base steps."""
        per_unit = g.row_layer is not None
        device, dtype = g.near_floor.device, g.params[0].dtype
        if not g.compiled:
            self._rotate_eager(g, None)
            return
        rest = g.unfused + plan.fallback
        rates, relative_lrs = g.rate_scalars
        if g.fused and compiled_step_ready(device, dtype, g.parallel, per_unit=per_unit):
            at = g.fused
            done = rotate_compiled(
                *g.views,
                [rates[j] for j in at],
                [relative_lrs[j] for j in at],
                [g.norm_scalars[j] for j in at],
                [g.flag_scalars[j] for j in at],
                g.parallel,
                per_unit=per_unit,
            )
            rest = rest + g.fused[done:]
        else:
            rest = rest + g.fused
        if plan.positions:
            at = plan.positions
            done = rotate_base_compiled(
                [g.owned_views[g.owned.index(j)] for j in at],
                plan.grads,
                plan.states,
                plan.hypers,
                [rates[j] for j in at],
                [relative_lrs[j] for j in at],
                [g.norm_scalars[j] for j in at],
                [g.flag_scalars[j] for j in at],
                plan.parallel,
                [step.variant for step in plan.steps],
                per_unit=per_unit,
            )
            state = self.optimizer.state
            for j, step in zip(at[:done], plan.steps, strict=False):
                step.commit(state[g.params[j]])
            if done < len(at):  # a compilation failed: those layers take the base step and the eager one
                missed = at[done:]
                self._snapshot(g, missed)
                g.kept = sorted(set(g.kept) | set(missed))
                self._base_step_of([g.params[j] for j in missed])
                rest += missed
        if rest:
            self._rotate_eager(g, None if len(rest) == len(g.params) else sorted(rest))

    def _base_step_of(self, params: list[torch.Tensor]) -> None:
        """Run the wrapped optimizer's step for ``params`` only (every other gradient set aside meanwhile)."""
        chosen = {id(p) for p in params}
        with _gradients_set_aside([p for group in self.param_groups for p in group["params"] if id(p) not in chosen]):
            self.optimizer.step()

    def _kernel_plan(self, g: _Group) -> _KernelPlan:
        """The owned layers of ``g`` whose base step the fused kernel takes at this step, with its arguments.

        A layer without a gradient is skipped, as torch's optimizers skip it. A layer whose gradient the kernel cannot
        read as it reads the weights (sparse, another dtype or memory layout), or whose step it cannot take now (see
        :func:`lightning_layca.base_steps.plan_layer`), takes the base step and the other path (``fallback``), and so
        does every owned layer where the kernel cannot be compiled.
        """
        plan = _KernelPlan()
        if not g.owned:
            return plan
        family = kernel_family(self.optimizer)
        assert family is not None  # layers are owned only around the optimizers it names (_base_kernel_applies)
        view = unit_view if g.row_layer is not None else kernel_view
        device, dtype = g.near_floor.device, g.params[0].dtype
        state, groups = self.optimizer.state, self.param_groups
        for j, weights_view, parallel in zip(g.owned, g.owned_views, g.owned_parallel, strict=True):
            p = g.params[j]
            grad = p.grad
            if grad is None:
                continue
            group = groups[self._layer_group[g.indices[j]]]
            grad_view = None if grad.is_sparse or grad.stride() != p.stride() else view(grad)
            readable = grad_view is not None and grad.dtype == dtype and grad_view.shape == weights_view.shape
            step = None
            if readable and group_supported(family, group):
                step = plan_layer(family, group, p, state.get(p))
            if step is None:
                plan.fallback.append(j)
                continue
            plan.positions.append(j)
            plan.steps.append(step)
            plan.grads.append(cast(torch.Tensor, grad_view))
            plan.states.append([cast(torch.Tensor, view(x)) for x in step.state])
            plan.parallel.append(parallel)
        variants = [step.variant for step in plan.steps]
        per_unit = g.row_layer is not None
        if plan.positions and not compiled_step_ready(device, dtype, plan.parallel, per_unit, variants):
            return _KernelPlan(fallback=plan.fallback + plan.positions)
        hyper_values = [step.hyper for step in plan.steps]
        if hyper_values != g.hyper_values:  # a host-to-device copy only when the values change
            g.hyper_values = hyper_values
            rows = _device_values(hyper_values, device).unbind() if hyper_values else ()
            g.hyper_rows = [row.detach() for row in rows]
        plan.hypers = g.hyper_rows
        return plan

    @staticmethod
    def _locals(group: _Group) -> list[torch.Tensor]:
        """The group's layers as this rank holds them (detached local shards of sharded layers)."""
        return [local_shard(p.detach()) for p in group.params]

    def _rotate_sharded(self, groups: list[_Group], layout: ShardLayout) -> None:
        """The summed form of the step for sharded layers.

        Local float64 sums of every group, ONE all-reduce for all of them together, then every rank applies the same
        coefficients to its own shard.
        """
        per_unit = self.granularity == "unit"
        local = [self._locals(g) for g in groups]
        device = groups[0].near_floor.device
        if per_unit:  # per unit: each rank's units placed at their global positions, summed over the ranks
            rows = [
                step_sums([x], [w], per_unit=True)
                for xs, g in zip(local, groups, strict=True)
                for x, w in zip(xs, g.previous, strict=True)
            ]
            full = full_sums(layout.scatter_rows([r.to(device) for r in rows]), layout.row_divisors(device))
            per_layer = layout.local_rows_of(full)
            sums, start = [], 0
            for g in groups:
                sums.append(torch.cat(per_layer[start : start + len(g.indices)]))
                start += len(g.indices)
        else:
            partial = [step_sums(xs, g.previous).to(device) for xs, g in zip(local, groups, strict=True)]
            full = full_sums(torch.cat(partial), layout.divisors(device))
            sums = list(full.split([len(g.indices) for g in groups]))
        if self._joining:
            self._take_initial_norms(groups, layout, full if per_unit else torch.cat(sums))
        for g, xs, s in zip(groups, local, sums, strict=True):
            s = s.to(g.near_floor.device)
            a, b, c = s.unbind(1)
            k1, k2, near = coefficients(
                a, b, c, c, g.rates, g.relative_lrs, g.initial_norms, unit_roundoff(xs[0].dtype)
            )
            # On CPU, reading whether every step is finite costs no synchronisation and saves a pass.
            finite = xs[0].device.type == "cpu" and bool(torch.isfinite(c).all())
            apply_coefficients(xs, g.previous, k1, k2, per_unit=per_unit, finite=finite)
            if g.row_layer is not None:
                near = torch.zeros_like(g.near_floor).index_put_((g.row_layer,), near, accumulate=True)
            g.near_floor |= near

    def _take_initial_norms(self, groups: list[_Group], layout: ShardLayout, full: torch.Tensor) -> None:
        """Record the initial norms of the sharded layers that join at this step from the step's full sums.

        Their weights before this step are their initial weights (they were frozen until now), whose squared norms
        are the sums ``<w, w>`` every rank now holds: no collective of their own.

        Args:
            groups: The step's groups, their ``initial_norms`` holding NaN for the joining layers.
            layout: The layout of the groups' layers in order.
            full: The step's full sums: per layer, or per global unit (``granularity="unit"``), in that order.
        """
        order = [i for g in groups for i in g.indices]
        joining = set(self._joining)
        per_unit = self.granularity == "unit"
        weight_sq = full[:, 1].to(device="cpu", dtype=torch.float64)  # one host transfer, once per joining
        per_layer = weight_sq.split(list(layout.rows)) if per_unit else weight_sq.split(1)
        for i, values in zip(order, per_layer, strict=True):
            if i not in joining:
                continue
            norm = math.sqrt(float(values.sum()))
            self._check_initial_norm(i, norm)
            self.initial_norms[i] = norm
            if per_unit:
                self.initial_unit_norms[i] = values.sqrt()
        self._joining = []
        positions = {i: k for k, i in enumerate(order)}
        for g in groups:
            if per_unit:
                norms = torch.cat([self._local_unit_norms(i, layout, positions[i]) for i in g.indices])
            else:
                norms = torch.tensor([self.initial_norms[i] for i in g.indices], dtype=torch.float64)
            g.initial_norms.copy_(norms)

    def _rotate_eager(self, g: _Group, positions: list[int] | None) -> None:
        """The eager step for the layers of ``g`` at ``positions`` (all of them when ``None``)."""
        chosen = list(range(len(g.params))) if positions is None else positions
        params, previous = [g.params[j].detach() for j in chosen], [g.previous[j] for j in chosen]
        rates, relative_lrs, initial_norms, row_layer = g.rates, g.relative_lrs, g.initial_norms, g.row_layer
        if positions is not None:  # the values of those layers (of their rows) only
            if tuple(chosen) not in g.subsets:
                g.subsets[tuple(chosen)] = self._subset(g, chosen)
            at, rows, row_layer = g.subsets[tuple(chosen)]
            rates, relative_lrs, initial_norms = rates[rows], relative_lrs[rows], initial_norms[rows]
        if row_layer is not None:
            near_rows = rotate_eager_units(params, previous, rates, relative_lrs, initial_norms)
            near_floor = torch.zeros(len(chosen), dtype=torch.bool, device=near_rows.device)
            near_floor.index_put_((row_layer,), near_rows, accumulate=True)
        else:
            near_floor, overflowed = rotate_eager(params, previous, rates, relative_lrs, initial_norms)
            if overflowed is not None:
                flags = overflowed.tolist()
                self._warn_overflow([g.indices[j] for j, flag in zip(chosen, flags, strict=True) if flag])
        if positions is None:
            g.near_floor |= near_floor
        else:
            g.near_floor[at] |= near_floor

    @staticmethod
    def _subset(g: _Group, chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        device = g.near_floor.device
        at = torch.tensor(chosen, dtype=torch.long)
        if g.row_layer is None:
            return at.to(device), at.to(device), None
        counts = unit_counts(g.params)
        starts = [sum(counts[:j]) for j in range(len(counts))]
        rows = torch.cat([torch.arange(starts[j], starts[j] + counts[j]) for j in chosen])
        row_layer = torch.repeat_interleave(torch.arange(len(chosen)), torch.tensor([counts[j] for j in chosen]))
        return at.to(device), rows.to(device), row_layer.to(device)

    def _warn_near_floor(self, groups: list[_Group]) -> None:
        flagged: list[int] = []
        for g in groups:
            # Reading the flags is free on CPU; on accelerators it synchronises, so it happens every few steps only.
            if g.near_floor.device.type != "cpu" and self.step_count % _FLOOR_CHECK_EVERY != 1:
                continue
            flagged += [i for i, flag in zip(g.indices, g.near_floor.tolist(), strict=True) if flag]
        new = [i for i in flagged if self.layer_names[i] not in self._warned_near_floor]
        if new:  # one warning for the layers flagged together, never twice for a layer
            self._warned_near_floor.update(self.layer_names[i] for i in new)
            warnings.warn(self._near_floor_message(new), stacklevel=3)

    def _warn_overflow(self, indices: list[int]) -> None:
        names = [self.layer_names[i] for i in indices if self.layer_names[i] not in self._warned_overflow]
        if names:
            self._warned_overflow.update(names)
            warnings.warn(
                f"Layca: the base step of layer(s) {names} is finite but so large (norm above about 1.8e19) that its "
                "float32 sums overflow, so those layers did not move on that step. Check the gradients and the base "
                "learning rate.",
                stacklevel=3,
            )

    def _near_floor_message(self, indices: list[int]) -> str:
        names = ", ".join(repr(self.layer_names[i]) for i in indices)
        dtypes = sorted({str(self._layers[i].dtype).removeprefix("torch.") for i in indices})
        if isinstance(self.rotation_rate, str):  # "equilibrium": the learning rate also sets the rotation rate
            advice = (
                "Under rotation_rate='equilibrium' the learning rate also sets the rotation rate, so raising it "
                "changes the recipe: give the rotation rate as a number and raise the base learning rate instead."
            )
        else:
            advice = "Raise the base optimizer's learning rate: Layca's step does not depend on its magnitude."
        if any(self._layers[i].dtype in (torch.float16, torch.bfloat16) for i in indices):
            advice += " Or keep float32 weights (Lightning's precision='bf16-mixed' rather than 'bf16-true')."
        return (
            f"Layca: the base optimizer's steps for layer(s) {names} are within {NEAR_FLOOR_FACTOR:g}x of what "
            f"{'/'.join(dtypes)} rounding of `w + step` can resolve, so rounding blurs their direction by more than "
            f"about 1% (and a step below that floor does not move a layer at all). {advice}"
        )

    def weights_before_last_step(self) -> dict[str, torch.Tensor]:
        """Return the weights the controlled layers had before the latest step, keyed by parameter name.

        These are Layca's own snapshot buffers (no copy): valid until the next step, and read-only. Layers whose base
        step the compiled kernel took are included only when :meth:`keep_weights_before_next_step` was called before
        that step (they need no snapshot otherwise).
        """
        return {self.layer_names[g.indices[j]]: g.previous[j] for g in self._groups or [] for j in g.kept}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of every parameter of the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; its layers are controlled from their first step.

        Parameters of the new group that the selection rules accept (``include``/``exclude``, ``ndim >= 2``) and that
        were not candidate layers yet take their place in the depth order of ``named_parameters``.
        """
        if self._base_or_none() is None:  # torch's Optimizer.__init__ adds its placeholder group
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        known = {id(p) for p in self._layers}
        new = []
        for p in self.optimizer.param_groups[-1]["params"]:
            if id(p) not in known and id(p) not in self._names:
                self._names[id(p)] = (f"param{len(self._names)}", p)
            if id(p) not in known:
                new.append(self._names[id(p)])
        selected = self._select(new) if new else []
        if selected:
            for name, p in selected:
                self._check_layer(name, p)
            order = {id(p): k for k, (_, p) in enumerate(self._names.values())}
            existing = list(
                zip(self.layer_names, self._layers, self.initial_norms, self.initial_unit_norms, strict=True)
            )
            joining: list[tuple[str, torch.Tensor, float | None, torch.Tensor | None]] = [
                (n, p, None, None) for n, p in selected
            ]
            layers = sorted(existing + joining, key=lambda item: order[id(item[1])])
            self.layer_names = [item[0] for item in layers]
            self._layers = [item[1] for item in layers]
            self.initial_norms = [item[2] for item in layers]
            self.initial_unit_norms = [item[3] for item in layers]
            self.schedule.validate(self.layer_names)
            self._schedule_key = object()
        self._controlled_key = None

    def _select(self, named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The selection rule applied to parameters that join later (patterns need not match among them)."""
        chosen = []
        for name, p in named:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self._exclude):
                continue
            if (self._include and any(fnmatch.fnmatchcase(name, pattern) for pattern in self._include)) or (
                not self._include and p.ndim >= 2
            ):
                chosen.append((name, p))
        return chosen

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
            "layer_names": list(self.layer_names),
            "initial_norms": list(self.initial_norms),
            "granularity": self.granularity,
            "initial_unit_norms": list(self.initial_unit_norms),
            "reference_lr": self.reference_lr,
            "step_count": self.step_count,
            "epoch": self.epoch,
            "rotation_rate": self.rotation_rate,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state dict from :meth:`state_dict`, or a plain state dict of the wrapped optimizer.

        A plain state dict (for example from a checkpoint written before Layca was added) restores the wrapped
        optimizer, keeps Layca's current initial norms, and sets :attr:`restored_from_plain_state`.
        """
        state_dict = dict(state_dict)
        layca = state_dict.pop("layca", None)
        if "base" in state_dict:  # the layout of lightning_layca 0.1
            state_dict = state_dict["base"]
        if layca is not None:
            self._check_layca_state(layca)
        self.optimizer.load_state_dict(state_dict)
        self.restored_from_plain_state = layca is None
        if layca is not None:
            self.load_layca_state(layca)
        self._controlled_key = None
        self._schedule_key = object()
        self._rates = []

    def load_layca_state(self, layca: dict[str, Any]) -> None:
        """Restore Layca's own state from :meth:`layca_state`, leaving the wrapped optimizer's state as it is.

        Raises:
            ValueError: When the state was saved for other layers or another granularity.
        """
        self._check_layca_state(layca)
        self.initial_norms = [None if x is None else float(x) for x in layca["initial_norms"]]
        self.initial_unit_norms = list(layca.get("initial_unit_norms", [None] * len(self.layer_names)))
        if "reference_lr" in layca:
            self.reference_lr = None if layca["reference_lr"] is None else float(layca["reference_lr"])
        elif layca.get("initial_lrs"):  # 0.1 kept one initial lr per group
            self.reference_lr = max(float(x) for x in layca["initial_lrs"])
        self.step_count = int(layca["step_count"])
        self.epoch = int(layca["epoch"])
        self.restored_from_plain_state = False
        self._controlled_key = None
        self._schedule_key = object()
        self._rates = []

    def _check_layca_state(self, layca: dict[str, Any]) -> None:
        if list(layca["layer_names"]) != self.layer_names:
            raise ValueError(
                "Layca: the state dict was saved for layers "
                f"{layca['layer_names']!r}, but this optimizer controls {self.layer_names!r}."
            )
        if layca.get("granularity", "layer") != self.granularity:
            raise ValueError(
                f"Layca: the state dict was saved with granularity={layca.get('granularity', 'layer')!r}, but "
                f"this optimizer has granularity={self.granularity!r}."
            )

    def __repr__(self) -> str:
        return (
            f"Layca(rotation_rate={self.rotation_rate!r}, schedule={self.schedule!r}, "
            f"layers={len(self.layer_names)}, optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_groups"] = None  # snapshot buffers are scratch space, rebuilt at the next step
        return state
