"""Layca: layer-level controlled amount of weight rotation, around any torch optimizer.

Reference: S. Carbonnelle and C. De Vleeschouwer, "On layer-level control of DNN training and its impact on
generalization", arXiv:1806.01603.

For every selected layer ``w`` (a weight tensor seen as one vector) and the step ``D`` the wrapped optimizer took,
Layca keeps only the rotational part of ``D``, gives it the norm ``rho_l(t) * ||w||`` and projects the result back onto
the sphere of the layer's initial norm. Each step therefore rotates the layer by exactly ``atan(rho_l(t))`` radians,
whatever the scale of the gradients, and never changes its norm. The wrapped optimizer's state (momentum, Adam
moments) is updated from the raw gradients as usual; parameters that are not layers (biases, normalisation
parameters) are stepped by the wrapped optimizer untouched.

Implementation: per (device, dtype) group, a handful of multi-tensor passes (snapshot, ``D``, ``<D, w>`` and
``||w||``, ``D_perp`` and its norm, then ``w' = k1 * w + k2 * D_perp`` with per-layer scalars ``k1, k2``),
reductions accumulated in at least float32, and no host synchronisation: rates enter as host scalars (kernel
arguments), layer-wise decisions (``eps`` rule, non-finite steps) as device masks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_layca.rotation import accumulation_dtype, inner_products
from lightning_layca.schedules import RotationSchedule, Uniform
from lightning_layca.selection import select_layers

__all__ = ["DEFAULT_ROTATION_RATE", "EPS", "Layca"]

DEFAULT_ROTATION_RATE = 3**-3
"""The paper's best base rotation rate for SGD-based Layca."""

EPS = 1e-7
"""A layer whose tangential step has a norm at most ``EPS`` does not move (as in the paper's reference code)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_rotation_rate(owner: str, rotation_rate: object) -> None:
    """Raise ``ValueError`` (naming ``owner`` and the value) unless ``rotation_rate`` is a finite positive number."""
    if (
        isinstance(rotation_rate, bool)
        or not isinstance(rotation_rate, int | float)
        or not math.isfinite(rotation_rate)
        or rotation_rate <= 0
    ):
        raise ValueError(f"{owner}: `rotation_rate` must be a finite positive number, got {rotation_rate!r}.")


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
    """The layers of one (device, dtype) chunk, with their snapshot buffers."""

    indices: list[int]
    params: list[torch.Tensor]
    previous: list[torch.Tensor]


class Layca(Optimizer):
    """Wrap any ``torch.optim.Optimizer`` so that each of its steps rotates every layer by ``atan(rho_l(t))``.

    ``rho_l(t) = rotation_rate * m_l(t) * lr_g(t) / lr_g(0)``: ``m_l(t)`` comes from the rotation ``schedule`` and
    ``lr_g(t) / lr_g(0)`` is the relative learning rate of the layer's parameter group, so any LR scheduler attached
    to the wrapper or to the wrapped optimizer shapes the rotation rate over time (the base lr's magnitude cancels).

    The wrapper *is* a ``torch.optim.Optimizer``: its ``param_groups`` and ``state`` are the wrapped optimizer's own
    objects, and ``state_dict()`` / ``load_state_dict()`` round-trip the wrapped optimizer's state together with
    Layca's (initial norms, initial learning rates, step and epoch counters).

    Args:
        optimizer: The optimizer to wrap.
        named_parameters: ``(name, parameter)`` pairs naming every parameter of ``optimizer``, for example
            ``model.named_parameters()``. Names drive layer selection and schedules. When omitted, parameters are
            named ``"param{i}"`` in the optimizer's order.
        rotation_rate: Base rotation rate ``rho`` (positive, finite); each step rotates a layer by ``atan(rho)``
            radians at multiplier 1 and relative lr 1. Default ``3 ** -3``, the paper's best for SGD.
        schedule: Per-layer multipliers (default :class:`~lightning_layca.Uniform`).
        include: ``fnmatch`` patterns of parameter names to control (default: every trainable parameter with
            ``ndim >= 2``).
        exclude: ``fnmatch`` patterns of parameter names never to control.

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer`` or is already a ``Layca``, or ``schedule`` is
            not a :class:`~lightning_layca.RotationSchedule`.
        ValueError: For a non-positive or non-finite ``rotation_rate``, a pattern that matches nothing, a parameter
            the names do not cover, or a selected layer whose weights are all zero.

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
        rotation_rate: float = DEFAULT_ROTATION_RATE,
        schedule: RotationSchedule | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
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

        # Let torch's Optimizer set up its hook registries and step patching, then share the base's containers so
        # LR schedulers, gradient clipping and LR monitors read and change the real values.
        super().__init__([torch.zeros(0)], {})
        self.optimizer = optimizer
        self.rotation_rate = float(rotation_rate)
        self.schedule = schedule
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults

        base_params = [p for group in optimizer.param_groups for p in group["params"]]
        named = self._name_parameters(base_params, named_parameters)
        layers = select_layers(named, include=include, exclude=exclude)
        if not layers:
            raise ValueError(
                "Layca: no parameter selected as a layer (default: trainable parameters with ndim >= 2). "
                f"Available names: {', '.join(name for name, _ in named)}."
            )
        self.layer_names: list[str] = [name for name, _ in layers]
        self._layers: list[torch.Tensor] = [p for _, p in layers]
        schedule.validate(self.layer_names)

        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._layer_group: list[int] = [group_of[id(p)] for p in self._layers]
        for name, p in layers:
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(f"Layca: layer {name!r} has dtype {p.dtype}; only real floating-point layers rotate.")
            if p.is_sparse:
                raise ValueError(f"Layca: layer {name!r} is sparse; exclude it (exclude={name!r}).")
        # Accumulated in float32 at least, so that a bf16/fp16 layer's initial norm is not rounded to its dtype.
        norms = [float(torch.linalg.vector_norm(p.detach(), dtype=accumulation_dtype(p.dtype))) for p in self._layers]
        for name, norm in zip(self.layer_names, norms, strict=True):
            if not norm > 0 or not math.isfinite(norm):
                raise ValueError(
                    f"Layca: layer {name!r} has weights of norm {norm}; Layca cannot rotate a zero (or non-finite) "
                    f"vector. Initialise it differently or leave it to the base optimizer with exclude={name!r}."
                )
        self.initial_norms: list[float] = norms
        # lr_g(0) is fixed at the first step, so that an LR scheduler attached after wrapping is taken into account.
        self.initial_lrs: list[float] | None = None
        for group in optimizer.param_groups:
            self._initial_lr(group)  # fail early on a learning rate that cannot define relative rates
        self.step_count = 0
        self.epoch = 0

        self._groups: list[_Group] | None = None
        self._schedule_key: Hashable = object()
        self._multipliers: list[float] = []
        self._rates: list[float] = []
        self._rates_version = 0

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _name_parameters(
        base_params: list[torch.Tensor], named_parameters: Iterable[tuple[str, torch.Tensor]] | None
    ) -> list[tuple[str, torch.Tensor]]:
        """Return ``(name, parameter)`` for every parameter of the base optimizer, in ``named_parameters`` order."""
        if named_parameters is None:
            return [(f"param{i}", p) for i, p in enumerate(base_params)]
        pairs = list(named_parameters)
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise TypeError(f"Layca: `named_parameters` must yield (name, parameter) pairs, got {pair!r}.")
        in_optimizer = {id(p) for p in base_params}
        named = [(name, p) for name, p in pairs if id(p) in in_optimizer]
        named_ids = {id(p) for _, p in named}
        missing = [i for i, p in enumerate(base_params) if id(p) not in named_ids]
        if missing:
            shapes = ", ".join(f"#{i} {tuple(base_params[i].shape)}" for i in missing[:10])
            raise ValueError(
                f"Layca: {len(missing)} parameter(s) of the optimizer are not named by `named_parameters` ({shapes}). "
                "Pass the named_parameters() of the module whose parameters the optimizer trains."
            )
        seen: set[int] = set()
        unique = []
        for name, p in named:  # tied weights: keep the first name, as nn.Module.named_parameters does
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((name, p))
        return unique

    @staticmethod
    def _initial_lr(group: dict[str, Any]) -> float:
        # An LR scheduler created before the wrapper records the lr it started from as ``initial_lr``.
        lr = float(group.get("initial_lr", group.get("lr", 1.0)))
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(
                f"Layca: parameter group learning rate must be positive and finite to define relative rates, got {lr}."
            )
        return lr

    # ------------------------------------------------------------------ rates
    def set_epoch(self, epoch: int) -> None:
        """Tell time-varying schedules the current epoch (the Lightning callbacks call this for you)."""
        self.epoch = int(epoch)

    def rotation_rates(self) -> dict[str, float]:
        """Return the effective ``rho_l(t)`` of each layer for the next step, keyed by parameter name."""
        return dict(zip(self.layer_names, self._current_rates(), strict=True))

    @property
    def rates_version(self) -> int:
        """A counter that increases whenever the effective rates change (for loggers that log on change)."""
        self._current_rates()
        return self._rates_version

    def _current_rates(self) -> list[float]:
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
        initial_lrs = self.initial_lrs or [self._initial_lr(group) for group in self.param_groups]
        relative_lr = [float(group["lr"]) / lr0 for group, lr0 in zip(self.param_groups, initial_lrs, strict=True)]
        rates = [
            self.rotation_rate * m * relative_lr[g] for m, g in zip(self._multipliers, self._layer_group, strict=True)
        ]
        if rates != self._rates:
            self._rates = rates
            self._rates_version += 1
        return rates

    # ------------------------------------------------------------------ the step
    def _build_groups(self) -> list[_Group]:
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, p in enumerate(self._layers):
            by_key[(p.device, p.dtype)].append(i)
        chunks: list[list[int]] = []
        for (device, _), indices in by_key.items():
            chunks.extend(_chunks(indices, self._layers, _CPU_CHUNK_BYTES if device.type == "cpu" else None))
        return [
            _Group(
                indices=idx,
                params=[self._layers[i] for i in idx],
                previous=[torch.empty_like(self._layers[i]) for i in idx],
            )
            for idx in chunks
        ]

    def _groups_for_step(self) -> list[_Group]:
        groups = self._groups
        if groups is None or any(
            buf.device != p.device or buf.dtype != p.dtype or buf.shape != p.shape
            for g in groups
            for p, buf in zip(g.params, g.previous, strict=True)
        ):
            groups = self._groups = self._build_groups()
        return groups

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the wrapped optimizer's step, then turn it into a Layca step for every layer.

        Args:
            closure: Re-evaluates the model and returns the loss; handed to the wrapped optimizer, which calls it
                with gradients enabled (exactly once for every torch optimizer but LBFGS).

        Returns:
            What the closure returned (``None`` without a closure).
        """
        if self.initial_lrs is None:
            self.initial_lrs = [self._initial_lr(group) for group in self.param_groups]
        groups = self._groups_for_step()
        for g in groups:
            torch._foreach_copy_(g.previous, [p.detach() for p in g.params])

        if closure is None:
            loss = self.optimizer.step()
        else:

            def closure_with_grad() -> Any:
                with torch.enable_grad():
                    return closure()

            loss = self.optimizer.step(closure_with_grad)

        rates = self._current_rates()
        for g in groups:
            _rotate(g, [rates[i] for i in g.indices], [self.initial_norms[i] for i in g.indices])
        self.step_count += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of every parameter of the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; its parameters are stepped as usual, not rotated."""
        if not hasattr(self, "optimizer"):  # torch's Optimizer.__init__ adds its placeholder group
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        if self.initial_lrs is not None:
            self.initial_lrs.append(self._initial_lr(self.optimizer.param_groups[-1]))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped optimizer's state dict under ``"base"`` and Layca's own state under ``"layca"``."""
        return {
            "base": self.optimizer.state_dict(),
            "layca": {
                "layer_names": list(self.layer_names),
                "initial_norms": list(self.initial_norms),
                "initial_lrs": None if self.initial_lrs is None else list(self.initial_lrs),
                "step_count": self.step_count,
                "epoch": self.epoch,
                "rotation_rate": self.rotation_rate,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state dict from :meth:`state_dict`, or a plain state dict of the wrapped optimizer.

        A plain state dict (for example from a checkpoint written before Layca was added) restores the wrapped
        optimizer and keeps Layca's current initial norms and counters.
        """
        if "base" not in state_dict or "layca" not in state_dict:
            self.optimizer.load_state_dict(state_dict)
        else:
            layca = state_dict["layca"]
            if list(layca["layer_names"]) != self.layer_names:
                raise ValueError(
                    "Layca: the state dict was saved for layers "
                    f"{layca['layer_names']!r}, but this optimizer controls {self.layer_names!r}."
                )
            self.optimizer.load_state_dict(state_dict["base"])
            self.initial_norms = [float(x) for x in layca["initial_norms"]]
            lrs = layca["initial_lrs"]
            self.initial_lrs = None if lrs is None else [float(x) for x in lrs]
            self.step_count = int(layca["step_count"])
            self.epoch = int(layca["epoch"])
        # torch's load_state_dict replaces the base's param_groups and state: re-bind them.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._schedule_key = object()
        self._rates = []

    def __repr__(self) -> str:
        return (
            f"Layca(rotation_rate={self.rotation_rate:.6g}, schedule={self.schedule!r}, "
            f"layers={len(self.layer_names)}, optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_groups"] = None  # snapshot buffers are scratch space, rebuilt at the next step
        return state


def _coefficients(
    norm_w: torch.Tensor,
    residual: torch.Tensor,
    tangential: torch.Tensor,
    rates: list[float],
    initial_norms: list[float],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``k1, k2`` of ``w' = k1 * w + k2 * P``, as lists of 0-dim device tensors.

    ``P`` is the computed ``D_perp``, ``residual = <P, w> / ||w||^2`` what rounding left of its radial part and
    ``tangential = ||P - residual * w||``. With ``q = n0 / sqrt(1 + rho^2)``: ``k2 = rho * q / tangential`` and
    ``k1 = q / ||w|| - k2 * residual``, which moves ``w`` by exactly ``rho * ||w||`` orthogonally to it and puts the
    result on the sphere of radius ``n0``. A layer whose step is non-finite or has ``||D_perp|| <= EPS`` is frozen:
    ``k1 = 1, k2 = 0``. Rates and norms are host scalars: they reach the device as kernel arguments, not copies.
    """
    ok = torch.isfinite(tangential) & torch.isfinite(residual) & (tangential > EPS) & (norm_w > 0)
    inv_norm_w = torch.where(ok, 1.0 / torch.where(ok, norm_w, 1.0), 0.0)
    inv_tangential = torch.where(ok, 1.0 / torch.where(ok, tangential, 1.0), 0.0)
    residual_over_tangential = torch.where(ok, residual, 0.0) * inv_tangential
    q = [n0 / math.sqrt(1.0 + rho * rho) for rho, n0 in zip(rates, initial_norms, strict=True)]
    h = [rho * qi for rho, qi in zip(rates, q, strict=True)]
    k1 = torch._foreach_mul(list(inv_norm_w.unbind()), q)
    torch._foreach_sub_(k1, torch._foreach_mul(list(residual_over_tangential.unbind()), h))
    torch._foreach_add_(k1, list((~ok).to(norm_w.dtype).unbind()))
    k2 = torch._foreach_mul(list(inv_tangential.unbind()), h)
    return list(k1), list(k2)


def _project_out(
    steps: list[torch.Tensor], weights: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove the radial part of each step in place; return ``||w||``, the residual radial part and ``||D_perp||``.

    ``D_perp = D - (<D, w> / ||w||^2) w`` is formed explicitly, because ``||D||^2 - <D, w>^2 / ||w||^2`` cancels
    catastrophically when the step is mostly radial (weight decay). What float32 rounding leaves of the radial part is
    measured by one more dot product and removed in the coefficients ("twice is enough"), which keeps the norm and
    the angle exact to rounding. A non-finite step gives a non-finite ``||D_perp||``.
    """
    norm_w = torch.stack(torch._foreach_norm(weights, 2))
    norm_w_sq = norm_w.square()
    radial = torch.stack(inner_products(steps, weights, accumulation_dtype(steps[0].dtype))) / norm_w_sq
    torch._foreach_addcmul_(steps, weights, list((-radial).unbind()))
    residual = torch.stack(inner_products(steps, weights, accumulation_dtype(steps[0].dtype))) / norm_w_sq
    norm_p = torch.stack(torch._foreach_norm(steps, 2))
    tangential = (norm_p.square() - residual.square() * norm_w_sq).clamp_min(0.0).sqrt()
    return norm_w, residual, tangential


def _rotate(group: _Group, rates: list[float], initial_norms: list[float]) -> None:
    """Turn the base step of one (device, dtype) group into a Layca step, in place and without host syncs.

    On entry the parameters hold ``w + D`` and ``group.previous`` holds ``w``.
    """
    params = [p.detach() for p in group.params]
    if params[0].dtype in _LOW_PRECISION:
        _rotate_low_precision(params, group.previous, rates, initial_norms)
        return
    previous = group.previous
    torch._foreach_sub_(params, previous)  # params now hold the base step D
    norm_w, residual, tangential = _project_out(params, previous)
    k1, k2 = _coefficients(norm_w, residual, tangential, rates, initial_norms)
    # Frozen layers multiply D_perp by 0, so it must hold no NaN or inf. On CUDA the cleaning pass runs every step
    # (one more read and write of the layers), since skipping it would need the flags on the host; on CPU reading
    # them is no synchronisation, and the pass is skipped in the usual case of finite steps.
    if params[0].device.type != "cpu" or not bool(torch.isfinite(tangential).all()):
        for d in params:
            torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
    torch._foreach_mul_(params, k2)
    torch._foreach_addcmul_(params, previous, k1)


def _rotate_low_precision(
    params: list[torch.Tensor], previous: list[torch.Tensor], rates: list[float], initial_norms: list[float]
) -> None:
    """The same step for float16/bfloat16 layers, computed per tensor in float32 and rounded once at the end."""
    w = [x.float() for x in previous]
    d = [p.float().sub_(x) for p, x in zip(params, w, strict=True)]
    norm_w, residual, tangential = _project_out(d, w)
    k1, k2 = _coefficients(norm_w, residual, tangential, rates, initial_norms)
    for p, wi, di, c1, c2 in zip(params, w, d, k1, k2, strict=True):
        p.copy_(wi.mul_(c1).add_(torch.nan_to_num_(di, nan=0.0, posinf=0.0, neginf=0.0).mul_(c2)))
