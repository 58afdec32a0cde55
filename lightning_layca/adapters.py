"""Adapted layers (LoRA, DoRA): the rotation of the effective weight ``W0 + s B A``, measured in factored form.

Under a low-rank adapter (``peft``'s LoRA and DoRA layers, recognised by their structure: a ``base_layer``, module
dicts ``lora_A`` and ``lora_B`` of Linear or convolution modules, and ``scaling``), the layer that computes is not
``lora_A`` or ``lora_B`` but the effective weight ``V = W0 + s B A`` (``B``: ``m x r``, ``A``: ``r x n``; for DoRA,
``W' = diag(magnitude / ||V_i||) V``, each output unit ``i`` split into a magnitude and a direction). Its rotation is
measured against the effective weight at the start of training (so an initialisation that changes the base weights,
PiSSA or OLoRA, is the reference as it starts), per layer and per output unit, without forming an ``m x n`` matrix:
with ``WA = W A^T`` (``m x r``) every sum is a row sum of ``m x r`` or ``r x r`` products::

    ||V_i||^2      = ||W_i||^2 + 2 s <B_i, WA_i> + s^2 B_i (A A^T) B_i^T
    <V_i, V0_i>    = <W_i, W0_i> + s0 <B0_i, (W A0^T)_i> + s <B_i, (W0 A^T)_i> + s s0 B_i (A A0^T) B0_i^T

The start keeps the adapter's factors as they started (``r (m + n)`` numbers) and, for a frozen base, ``W A0^T`` and
the base's row norms (``m (r + 2)`` numbers); a base that trains also keeps its start. A zero-initialised ``B`` is
no special case: at the start ``V = W0``.

Example:
    >>> base = torch.nn.Linear(4, 3)
    >>> adapters_of(torch.nn.Sequential(base))
    []
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Adapter", "AdapterStart", "adapter_parameter_names", "adapters_of", "effective_measures"]


@dataclass
class Adapter:
    """One adapted layer: where its factors live, read as matrices on demand (see :meth:`matrices`)."""

    name: str
    """The effective layer's name: the adapted module's path and ``.weight`` (logged without ``.weight``)."""
    module: Any
    """The adapted module (``peft``'s layer; read by its structure, not its type)."""
    key: str
    """The active adapter's key in ``lora_A`` / ``lora_B``."""
    parameter_names: list[str]
    """The adapter's own parameters (factors, DoRA's magnitude) and the base weight, by their names in the model."""

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """``(W, A, B, s, magnitude)``: the base weight as ``m x n``, the factors, the scale, DoRA's magnitude."""
        module = self.module
        base = module.base_layer.weight.detach()
        base = base.T if getattr(module, "fan_in_fan_out", False) else base.flatten(1)
        a = module.lora_A[self.key].weight.detach().flatten(1)
        b = module.lora_B[self.key].weight.detach().flatten(1)
        magnitudes: Any = getattr(module, "lora_magnitude_vector", None) or {}
        magnitude = magnitudes[self.key].weight.detach().flatten() if self.key in magnitudes else None
        return base, a, b, float(module.scaling[self.key]), magnitude


def _is_adapted(module: Any) -> bool:
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    return (
        isinstance(lora_a, torch.nn.ModuleDict)
        and isinstance(lora_b, torch.nn.ModuleDict)
        and isinstance(getattr(module, "scaling", None), dict)
        and isinstance(getattr(getattr(module, "base_layer", None), "weight", None), torch.Tensor)
    )


def adapters_of(model: torch.nn.Module) -> list[Adapter]:
    """The adapted layers of ``model`` (their active adapter, the first if several are active), in module order.

    An adapter whose factors are not Linear or convolution weights (``peft``'s embedding LoRA keeps raw parameters)
    is not recognised: its factors stay ordinary parameters.
    """
    found = []
    module: Any
    for path, module in model.named_modules():
        if not _is_adapted(module):
            continue
        active = getattr(module, "active_adapters", None) or list(module.lora_A.keys())
        key = next((k for k in active if k in module.lora_A and k in module.lora_B), None)
        if key is None or not all(hasattr(d[key], "weight") for d in (module.lora_A, module.lora_B)):
            continue
        prefix = f"{path}." if path else ""
        names = [f"{prefix}lora_A.{key}.weight", f"{prefix}lora_B.{key}.weight", f"{prefix}base_layer.weight"]
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is not None and key in magnitudes:
            names.append(f"{prefix}lora_magnitude_vector.{key}.weight")
        found.append(Adapter(f"{prefix}weight", module, key, names))
    return found


def adapter_parameter_names(model: torch.nn.Module) -> list[str]:
    """The names of every adapted layer's factors, magnitude and base weight (none of them a layer by itself)."""
    return [name for adapter in adapters_of(model) for name in adapter.parameter_names]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def _rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products of two ``m x k`` matrices (small ones: ``k`` is the rank), in float64."""
    return (_f64(x) * _f64(y)).sum(dim=1)


def _row_norms_squared(w: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = torch.linalg.vector_norm(w, dim=1, dtype=torch.float64)
    return norms.square()


class AdapterStart:
    """An adapted layer's effective weight at the start of training, kept in factored form.

    Args:
        adapter: The adapted layer, at the start.
    """

    def __init__(self, adapter: Adapter) -> None:
        base, a, b, scale, magnitude = adapter.matrices()
        self.a, self.b, self.scale = a.clone(), b.clone(), scale
        self.magnitude = None if magnitude is None else magnitude.clone()
        self.frozen_base = not adapter.module.base_layer.weight.requires_grad
        # A frozen base stays as it starts: its row norms and its product with A0 are all that is kept of it.
        self.base = None if self.frozen_base else base.clone()
        self.base_rows = _row_norms_squared(base)
        self.base_a0 = _f64(base @ a.T)
        self.rows0 = self._norms(self.base_rows, self.base_a0, self.a, self.b, self.scale)

    @staticmethod
    def _norms(base_rows: torch.Tensor, base_a: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> Any:
        """``||V_i||^2`` per row from ``||W_i||^2``, ``W A^T``, ``A`` and ``B``."""
        gram = _f64(a) @ _f64(a).T
        return base_rows + 2 * s * _rows(b, base_a) + s * s * _rows(_f64(b) @ gram, b)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the start."""
        return {k: v for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AdapterStart:
        """The start recorded by :meth:`state`."""
        start = cls.__new__(cls)
        vars(start).update(state)
        return start

    def to(self, device: torch.device) -> AdapterStart:
        """Move the kept tensors to ``device`` (a restored start, bound to the layer)."""
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))
        return self


@dataclass
class EffectiveMeasure:
    """What :func:`effective_measures` measured of one adapted layer (float64 host numbers, unit cosines a tensor)."""

    cosine: float
    """Cosine of the effective weight to its start."""
    unit_cosines: torch.Tensor
    """Cosine of each output unit's effective weight (the DoRA direction) to its start."""
    magnitude_change: float | None
    """DoRA: ``||magnitude - magnitude0|| / ||magnitude0||``; ``None`` for LoRA."""


def effective_row_sums(adapter: Adapter, start: AdapterStart) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output unit, ``(<V_i, V0_i>, ||V_i||^2, ||V0_i||^2)`` in float64, in factored form (see the module)."""
    base, a, b, s, _ = adapter.matrices()
    s0, a0, b0 = start.scale, start.a, start.b
    base_a = base @ a.T  # m x r: the one product with the base weight per measurement
    if start.frozen_base:
        base_rows, base_a0, cross_rows, base0_a = start.base_rows, start.base_a0, start.base_rows, base_a
    else:
        assert start.base is not None
        base_rows, base_a0 = _row_norms_squared(base), base @ a0.T
        cross_rows = torch.linalg.vecdot(_f64(base), _f64(start.base), dim=1)
        base0_a = start.base @ a.T
    norms = AdapterStart._norms(base_rows, _f64(base_a), a, b, s)
    norms0 = start.rows0
    dots = (
        cross_rows
        + s0 * _rows(b0, base_a0)
        + s * _rows(b, base0_a)
        + s * s0 * _rows(_f64(b) @ (_f64(a) @ _f64(a0).T), b0)
    )
    return dots, norms, norms0


def effective_measures(adapter: Adapter, start: AdapterStart) -> EffectiveMeasure:
    """The rotation of ``adapter``'s effective weight since ``start``: per layer, per unit, DoRA's magnitude."""
    dots, norms, norms0 = effective_row_sums(adapter, start)
    unit = dots / (norms * norms0).sqrt()
    magnitude = adapter.matrices()[4]
    if magnitude is None or start.magnitude is None:
        cosine = float(dots.sum() / (norms.sum() * norms0.sum()).sqrt())
        change = None
    else:
        m, m0 = _f64(magnitude), _f64(start.magnitude)
        cosine = float((m * m0 * unit).sum() / (m.norm() * m0.norm()))
        change = float((m - m0).norm() / m0.norm())
        unit = unit * torch.sign(m * m0)  # a magnitude that changed sign turned its unit around
    return EffectiveMeasure(cosine, unit, change)


def has_moved(adapter: Adapter, start: AdapterStart) -> bool:
    """Whether the effective weight (or DoRA's magnitude) differs from its start (exact comparisons)."""
    base, a, b, s, magnitude = adapter.matrices()
    if magnitude is not None and start.magnitude is not None and not torch.equal(magnitude, start.magnitude):
        return True
    if not start.frozen_base and start.base is not None and not torch.equal(base, start.base):
        return True
    if torch.equal(b, start.b) and not b.any():  # B is still zero: A's changes do not reach the weight
        return False
    return not (torch.equal(b, start.b) and torch.equal(a, start.a) and s == start.scale)


class AdaptedLayers:
    """The adapted layers of a model and their starts: what a rotation monitor measures of them.

    Args:
        owner: The name that warnings start with.
        unmoved_after: After this many optimizer steps, warn once, naming the adapted layers whose effective weight
            has not moved (``None``: never).
    """

    def __init__(self, owner: str, unmoved_after: int | None) -> None:
        self.owner = owner
        self.unmoved_after = unmoved_after
        self.adapters: list[Adapter] = []
        self.starts: dict[str, AdapterStart] = {}
        self._checked = False

    @property
    def names(self) -> list[str]:
        """The effective layers' names, in module order."""
        return [adapter.name for adapter in self.adapters]

    def bind(self, model: torch.nn.Module) -> list[str]:
        """Find the adapted layers of ``model``; record the start of those not recorded yet (a restored start stays).

        Returns:
            The names of the adapted layers whose start was recorded now.
        """
        self.adapters = adapters_of(model)
        new = []
        for adapter in self.adapters:
            device = adapter.module.base_layer.weight.device
            if adapter.name in self.starts:
                self.starts[adapter.name].to(device)
            else:
                self.starts[adapter.name] = AdapterStart(adapter)
                new.append(adapter.name)
        return new

    def measure(self) -> list[EffectiveMeasure]:
        """Every adapted layer's :class:`EffectiveMeasure`, in the order of :attr:`names`."""
        return [effective_measures(adapter, self.starts[adapter.name]) for adapter in self.adapters]

    def check_unmoved(self, step: int) -> list[str]:
        """At step :attr:`unmoved_after` (once): warn naming the adapted layers that have not moved; return them."""
        if self._checked or self.unmoved_after is None or step < self.unmoved_after or not self.adapters:
            return []
        self._checked = True
        still = [a.name for a in self.adapters if not has_moved(a, self.starts[a.name])]
        if still:
            warnings.warn(
                f"{self.owner}: after {step} optimizer steps the effective weight of {len(still)} adapted layer(s) "
                f"has not moved: {still}. A LoRA factor B that is still zero (frozen, a learning rate of 0, or "
                "missing from the optimizer) leaves the model as it started.",
                stacklevel=2,
            )
        return still

    def state(self) -> dict[str, Any]:
        """The starts, for a checkpoint."""
        return {name: start.state() for name, start in self.starts.items()}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (moved to the layers by the next :meth:`bind`)."""
        self.starts = {name: AdapterStart.from_state(s) for name, s in state.items()}


def unit_angles_degrees(unit_cosines: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per unit, the angle (degrees) from its cosine."""
    return [torch.rad2deg(torch.acos(c.clamp(-1.0, 1.0))).float() for c in unit_cosines]


def cosine_distance(cosine: float) -> float:
    """``1 - cosine``, clipped to ``[0, 2]`` (rounding can take a cosine just past 1)."""
    return min(max(1.0 - cosine, 0.0), 2.0) if math.isfinite(cosine) else cosine
