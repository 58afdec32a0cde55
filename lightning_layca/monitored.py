"""The layers a rotation monitor measures: candidates, the trainable ones, their initial snapshots, one meter.

:class:`~lightning_layca.LayerRotationMonitor` (and :class:`~lightning_layca.LaycaCallback`, which extends it) keep
one :class:`MonitoredLayers`: it selects the candidate layers of a model, snapshots each one's initial weights when it
first becomes trainable (the shard of this process under sharding), checks a model against the layers of a checkpoint
or an earlier fit, and measures the layers through :class:`~lightning_layca.rotation.RotationMeter`. It imports no
Lightning: what is logged, and when, is the callback's business.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> layers = MonitoredLayers("Monitor")
    >>> layers.bind(model)
    ['0.weight', '2.weight']
    >>> layers.names
    ['0.weight', '2.weight']
    >>> layers.measure(distances=True).distances
    [0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_layca.adapters import AdaptedLayers, adapter_parameter_names, cosine_distance, unit_angles_degrees
from lightning_layca.distributed import is_dtensor, local_shard, shard_of
from lightning_layca.rotation import Measured, PairSums, RotationMeter
from lightning_layca.schedule_free import evaluation_weights, has_evaluation_weights
from lightning_layca.selection import layer_display_name, select_layers

__all__ = ["LayerShare", "MonitorSpec", "MonitoredLayers", "share_layers"]


def _restored_shard(initial: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """This process's part of a restored initial snapshot, on the layer's device and dtype (all of it unsharded).

    A snapshot already bound to a sharded layer is a local shard (``to`` is then a no-op).
    """
    if is_dtensor(layer) and initial.shape == layer.shape:
        initial = shard_of(initial, layer)
    local = local_shard(layer)
    return initial.to(device=local.device, dtype=local.dtype)


@dataclass(frozen=True)
class MonitorSpec:
    """What :func:`share_layers` needs of one monitor on a Trainer."""

    owner: str
    """The monitor's class name."""
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    measures_first: bool = False
    """Whether the monitor measures its layers before plain monitors do (a ``LaycaCallback``, from Layca's snapshot)."""


@dataclass
class LayerShare:
    """The share of one monitor: the layers it leaves to other monitors, and the label of its summaries."""

    left_out: list[str] = field(default_factory=list)
    """Parameter names it selects but another monitor measures."""
    measured_by: list[str] = field(default_factory=list)
    """The owners of the monitors that measure ``left_out``."""
    label: str | None = None
    """``None`` when it is the only monitor that measures anything, else a name that tells it from the others."""
    measures_any: bool = True
    """Whether some selected layer is left to it."""

    def explanation(self) -> str:
        """What the monitor leaves out, to whom, and why (for a warning)."""
        layers = [layer_display_name(name) for name in self.left_out]
        rest = "measures the others" if self.measures_any else "measures nothing"
        return (
            f"{', '.join(self.measured_by)} on the same Trainer measures and logs layers {layers}; this monitor "
            f"leaves them out, so that each layer is measured and logged once, and {rest}."
        )


def share_layers(
    named_parameters: Iterable[tuple[str, torch.Tensor]], specs: Sequence[MonitorSpec]
) -> list[LayerShare]:
    """Give every layer to one monitor, so that no tag is written twice at one step; label each monitor's summaries.

    The monitors that measure first (``LaycaCallback``) choose first, then the others, each in the Trainer's order; a
    monitor leaves out the layers an earlier one chose. When more than one monitor measures something, each has a
    label: its ``include`` patterns joined by ``+`` (else its class name), followed by ``-<pattern>`` for each
    ``exclude`` pattern.

    Returns:
        One :class:`LayerShare` per spec, in the order of ``specs``.

    Raises:
        ValueError: When two monitors that measure something would get the same label.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> shares = share_layers(model.named_parameters(), [MonitorSpec("A", include="0.*"), MonitorSpec("B")])
        >>> [(s.left_out, s.label) for s in shares]
        [([], '0.*'), (['0.weight'], 'B')]
    """
    params = list(named_parameters)
    order = sorted(range(len(specs)), key=lambda k: not specs[k].measures_first)  # stable
    taken: dict[str, str] = {}
    shares = [LayerShare() for _ in specs]
    active = []
    for k in order:
        spec = specs[k]
        chosen = [n for n, _ in select_layers(params, include=spec.include, exclude=spec.exclude, trainable_only=False)]
        left_out = [n for n in chosen if n in taken]
        shares[k].left_out = left_out
        shares[k].measured_by = sorted({taken[n] for n in left_out})
        shares[k].measures_any = len(left_out) < len(chosen)
        for name in chosen:
            taken.setdefault(name, spec.owner)
        if shares[k].measures_any:
            active.append(k)
    if len(active) > 1:
        labels = {k: _label(specs[k]) for k in active}
        if len(set(labels.values())) < len(labels):
            raise ValueError(
                "Rotation monitors on one Trainer would write their summaries under the same names "
                f"({sorted(labels.values())}): give them different `include`/`exclude` patterns."
            )
        for k, label in labels.items():
            shares[k].label = label
    return shares


def _patterns(patterns: str | Sequence[str] | None) -> list[str]:
    return [] if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)


def _label(spec: MonitorSpec) -> str:
    include = _patterns(spec.include)
    return ("+".join(include) if include else spec.owner) + "".join(f"-{p}" for p in _patterns(spec.exclude))


class MonitoredLayers:
    """The monitored layers of one model, in depth order, with their initial weights.

    Adapted layers (LoRA, DoRA: ``lightning_layca.adapters``) are layers too, after the others: their effective
    weight is measured, and their factors and base weight are not layers of their own.

    Args:
        owner: The name that errors start with (the callback's class name).
        include: ``fnmatch`` patterns of parameter names to monitor (default: :func:`~lightning_layca.select_layers`).
        exclude: ``fnmatch`` patterns of parameter names not to monitor.
        unmoved_adapter_steps: After this many optimizer steps, warn once naming the adapted layers whose effective
            weight has not moved (``None``: never).
        sums: What forms the sums of the measurements (default: :func:`~lightning_layca.sums.float64_sums`; the
            monitors give a :class:`~lightning_layca.measurement.MeasurementSums`).

    Attributes:
        candidate_names: Parameter names of every selectable layer of the model, trainable or not (``None`` before
            the first :meth:`bind`).
        names: The monitored layers (candidates that were trainable at some point), in depth order, then the adapted
            layers' effective weights (``<module>.weight``).
        params: The monitored layers' parameters in the model currently bound, aligned with ``names``.
        initial: Their initial weights (this process's shard under sharding), aligned with ``names``.
        module: The module bound by :meth:`bind`; ``None`` outside a fit (:meth:`unbind`).
    """

    def __init__(
        self,
        owner: str,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        unmoved_adapter_steps: int | None = None,
        sums: PairSums | None = None,
    ) -> None:
        self.owner = owner
        self.sums = sums
        self.include = include
        self.exclude = exclude
        self.candidate_names: list[str] | None = None
        self._names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.initial: list[torch.Tensor] = []
        self.module: torch.nn.Module | None = None
        self.left_out: set[str] = set()
        """Parameter names selected but measured by another monitor (:func:`share_layers`): never candidates."""
        self._bound = False
        self._candidates: list[tuple[str, torch.Tensor]] = []
        self._pending: list[tuple[str, torch.Tensor]] = []  # candidates still frozen, not snapshotted
        self._meter = RotationMeter([], [], sums)
        self.adapted = AdaptedLayers(owner, unmoved_adapter_steps)
        self.magnitude_changes: dict[str, float] = {}
        """DoRA: each adapted layer's relative change of magnitude, as of the latest measure of distances."""

    @property
    def names(self) -> list[str]:
        """The monitored layers, then the adapted layers' effective weights (see the class docstring)."""
        return self._names + self.adapted.names

    def bind(self, module: torch.nn.Module) -> list[str]:
        """Bind the layers of ``module``, the model of a starting fit; return the names of the layers that joined.

        Adapted layers whose start is recorded now are among those that joined. The first bind takes the trainable
        layers' weights as their initial ones. A later one (a new fit, or a restored checkpoint) checks that
        ``module`` has the same candidate layers, of the same shapes, and keeps the recorded initial weights (moved
        to the layers' devices, each process keeping its own shard).

        Raises:
            ValueError: If nothing is selected, or the layers differ from those recorded.
        """
        self.module = module
        self._bound = True
        adapted = set(adapter_parameter_names(module))
        selected = select_layers(
            [(n, p) for n, p in module.named_parameters() if n not in adapted],
            include=self.include,
            exclude=self.exclude,
            trainable_only=False,
        )
        candidates = [(name, p) for name, p in selected if name not in self.left_out]
        new_adapters = self.adapted.bind(module)
        if not selected and not self.adapted.adapters:
            raise ValueError(
                f"{self.owner}: no parameter of {type(module).__name__} selected as a layer (default: real "
                "floating-point parameters with ndim >= 2; see `include`/`exclude`)."
            )
        names = [name for name, _ in candidates]
        by_name = dict(candidates)
        if self.candidate_names is None:  # the first fit: its weights are the initial ones
            self._names, self.initial = [], []
        else:
            self._check(names, by_name)
            self.initial = [_restored_shard(w0, by_name[n]) for n, w0 in zip(self._names, self.initial, strict=True)]
        self.candidate_names = names
        self._candidates = candidates
        self.params = [by_name[name] for name in self._names]
        self._meter = RotationMeter(self.params, self.initial, self.sums)
        monitored = set(self._names)
        self._pending = [(name, p) for name, p in candidates if name not in monitored]
        return self.join_trainable() + new_adapters

    def unbind(self) -> None:
        """Forget the module of the fit that ended (the layers and their snapshots stay)."""
        self.module = None

    def _check(self, names: list[str], by_name: dict[str, torch.Tensor]) -> None:
        unknown = [name for name in self._names if name not in by_name]
        if unknown or names != self.candidate_names:
            raise ValueError(
                f"{self.owner}: the initial weights were recorded for layers {self.candidate_names}, but the model "
                f"now has layers {names}. Use a new callback for a different model."
            )
        for name, w0 in zip(self._names, self.initial, strict=True):
            p = by_name[name]
            # A snapshot is the full layer (restored from a checkpoint) or this process's shard of it.
            if w0.shape != p.shape and w0.shape != local_shard(p).shape:
                raise ValueError(
                    f"{self.owner}: layer {name!r} has shape {tuple(p.shape)}, but its initial weights were "
                    f"recorded with shape {tuple(w0.shape)}."
                )

    @property
    def has_candidates(self) -> bool:
        """Whether a model has been bound (:meth:`bind`): its candidate layers are known."""
        return self._bound

    @property
    def has_pending(self) -> bool:
        """Whether some candidate is still frozen (it joins when it becomes trainable)."""
        return bool(self._pending)

    def join_trainable(self) -> list[str]:
        """Monitor the candidates that have become trainable, snapshotting their (still initial) weights.

        Returns:
            The names of the layers that joined, in depth order.
        """
        joining = [(name, p) for name, p in self._pending if p.requires_grad]
        if not joining:
            return []
        self._pending = [(name, p) for name, p in self._pending if not p.requires_grad]
        snapshots = dict(zip(self._names, self.initial, strict=True))
        for name, p in joining:
            snapshots[name] = local_shard(p.detach()).clone()  # this process's shard of a sharded layer
        monitored = [(name, p) for name, p in self._candidates if name in snapshots]  # depth order
        self._names = [name for name, _ in monitored]
        self.params = [p for _, p in monitored]
        self.initial = [snapshots[name] for name in self._names]
        self._meter = RotationMeter(self.params, self.initial, self.sums)
        return [name for name, _ in joining]

    def measure(
        self,
        distances: bool,
        steps: Sequence[str] = (),
        unit_steps: Sequence[str] = (),
        before: dict[str, torch.Tensor] | None = None,
    ) -> Measured:
        """Measure the monitored layers (:meth:`~lightning_layca.rotation.RotationMeter.measure`), by layer name.

        Args:
            distances: Whether to measure every layer's cosine distance to its initial weights.
            steps: Layers whose latest step to measure (``tan`` of its angle and the norm after it).
            unit_steps: Layers whose latest step to measure per unit (``tan`` per unit, rows concatenated).
            before: The weights before the step, by layer name, for ``steps`` and ``unit_steps``.
        """
        position = {name: k for k, name in enumerate(self._names)}
        before = before or {}
        measured = self._meter.measure(
            distances and bool(self.params),
            [position[n] for n in steps],
            [position[n] for n in unit_steps],
            [before[n] for n in steps],
            [before[n] for n in unit_steps],
        )
        if distances and self.adapted.adapters:
            effective = self.adapted.measure()
            measured.distances = [*measured.distances, *(cosine_distance(e.cosine) for e in effective)]
            self.magnitude_changes = {
                name: e.magnitude_change
                for name, e in zip(self.adapted.names, effective, strict=True)
                if e.magnitude_change is not None
            }
        return measured

    def measure_step(
        self, logging: bool, unit_steps: bool, before: dict[str, torch.Tensor] | None, optimizers: Sequence[Any]
    ) -> tuple[list[str], Measured]:
        """Measure what a training batch's optimizer step calls for (:meth:`measure`).

        Args:
            logging: Whether the batch logs: every layer's distance to its initial weights (of the evaluation weights
                under a schedule-free optimizer, ``lightning_layca.schedule_free``), and the step of the layers
                in ``before``.
            unit_steps: Whether to measure the step of the layers in ``before`` per unit too.
            before: The weights before the step, by parameter name (``None``: no step is measured).
            optimizers: The Trainer's optimizers.

        Returns:
            The names of the layers whose step was measured, in depth order, and the measurement.
        """
        names = [n for n in self.names if before is not None and n in before]
        evaluating = logging and has_evaluation_weights(optimizers)
        measured = self.measure(
            distances=logging and not evaluating,
            steps=names if logging else [],
            unit_steps=names if unit_steps else [],
            before=before,
        )
        if evaluating:
            with evaluation_weights(optimizers):
                measured.distances = self.measure(distances=True).distances
        return names, measured

    def rotation(self) -> dict[str, float]:
        """Every monitored layer's cosine distance to its initial weights, by display name (a collective if sharded).

        Raises:
            RuntimeError: Before the first fit has started (no initial snapshot yet).
        """
        if not self.has_candidates:
            raise RuntimeError(f"{self.owner}: nothing to measure before the first `Trainer.fit` starts.")
        if not self.names:  # every candidate is still frozen, or measured by another monitor
            return {}
        distances = self.measure(distances=True).distances
        return dict(zip([layer_display_name(n) for n in self.names], distances, strict=True))

    def unit_step_tans(self, names: Sequence[str], measured: Measured) -> dict[str, torch.Tensor]:
        """Display name -> ``tan`` of the angle each unit turned in the measured step, of the layers ``names``."""
        unit_tans = measured.unit_tans.split(self.unit_counts(names))
        return dict(zip([layer_display_name(n) for n in names], unit_tans, strict=True))

    def unit_angles(self) -> list[torch.Tensor]:
        """The angle (degrees) every unit of every layer turned from its initial weights (a collective if sharded)."""
        angles = self._meter.unit_angles() if self.params else []
        return angles + unit_angles_degrees([e.unit_cosines for e in self.adapted.measure()])

    def local_weights(self, clone: bool) -> dict[str, torch.Tensor]:
        """Every monitored layer's weights (this process's shard), by name: copies with ``clone``, else views."""
        return {
            name: local_shard(p.detach()).clone() if clone else local_shard(p.detach())
            for name, p in zip(self._names, self.params, strict=True)
        }

    def unit_counts(self, names: Sequence[str]) -> list[int]:
        """The number of units (rows) of each named layer."""
        params = dict(zip(self._names, self.params, strict=True))
        return [params[n].shape[0] if params[n].ndim >= 2 else 1 for n in names]

    def state(self) -> dict[str, Any]:
        """The candidates, the monitored layers and their full initial weights (a collective if sharded)."""
        return {
            "candidate_names": None if self.candidate_names is None else list(self.candidate_names),
            "layer_names": list(self._names),
            "initial": self._meter.full_initial() if self.candidate_names is not None else None,
            "adapters": self.adapted.state(),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (checked, and moved to the layers, by the next :meth:`bind`)."""
        self._names = list(state["layer_names"])
        initial = state["initial"]
        self.initial = [] if initial is None else [t.detach() for t in initial]
        candidates = state["candidate_names"]
        self.candidate_names = None if candidates is None else list(candidates)
        self.adapted.load(state.get("adapters", {}))
