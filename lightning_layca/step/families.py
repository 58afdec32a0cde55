"""One entry per base-optimizer family: how its step is read, the kernel that takes it, its equilibrium rate.

Supporting a new base optimizer is one :class:`Family` in :data:`FAMILIES`:

* ``read_step``: for one layer at one step, what torch's own step would do, in the kernel's terms
  (:class:`LayerStep`): the form of the step (a key of :data:`BASE_KERNELS`), the state tensors it updates in the
  optimizer's own ``state`` (created as torch creates them at a layer's first step), and its hyperparameters as
  numbers. The optimizer's state dict is therefore the same as without Layca's kernel: a resume with another
  implementation, or with the optimizer alone, carries on from it. ``None`` where the kernel cannot take the step.
* the kernels (:data:`BASE_KERNELS`): the optimizer's step and the Layca step of one layer in one traced function,
  the step ``D`` formed exactly in float64 and never written, so no snapshot of the weights is needed;
* ``equilibrium``: the angular update per step (tan of the angle) the optimizer reaches at equilibrium with weight
  decay (Kosson et al., "Rotational Equilibrium", 2024), for ``rotation_rate="equilibrium"``.

The kernel takes the step of ``torch.optim.SGD``, ``Adam`` and ``AdamW`` themselves (those exact types: a subclass may
step differently); every other optimizer steps by itself, and Layca works after its step from a snapshot. A family
without ``read_step`` (``torch.optim.Muon``: its Newton-Schulz orthogonalisation is a matrix iteration, not an
element-wise step) contributes its equilibrium rate only.

Example:
    >>> p = torch.nn.Parameter(torch.randn(4, 4))
    >>> family_of(torch.optim.SGD([p], lr=0.1)).name, family_of(torch.optim.RMSprop([p])) is None
    ('sgd', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_layca.argument_types import EQUILIBRIUM
from lightning_layca.muon import USE_MUON, MuonWithAdamW
from lightning_layca.step.kernels import layer_sums, rotate_rows, update_rows

__all__ = [
    "BASE_KERNELS",
    "COMPILED_FORMS",
    "FAMILIES",
    "SHARDED_BASE_KERNELS",
    "Family",
    "LayerStep",
    "equilibrium_rate",
    "family_of",
    "muon_correlation",
    "polar_correlation_terms",
    "sharded_forms",
]


@dataclass
class LayerStep:
    """One layer's base step as the kernel takes it (see :attr:`Family.read_step`)."""

    variant: str
    """The form of the step: a key of :data:`BASE_KERNELS`."""
    state: list[torch.Tensor]
    """The state tensors the kernel updates in place, in its order, laid out as the layer."""
    hyper: tuple[float, ...]
    """The kernel's hyperparameters for this step."""
    new_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Entries to store in the optimizer's state once the kernel ran (state created, or laid out anew)."""
    counter: torch.Tensor | None = None
    """Adam's ``step``: incremented once the kernel ran."""

    def commit(self, state: dict[str, Any]) -> None:
        """Record in the optimizer's ``state`` of the layer that the kernel took the step."""
        state.update(self.new_state)
        if self.counter is not None:
            self.counter.add_(1)


def _laid_out_like(
    name: str, tensor: torch.Tensor, p: torch.Tensor, new_state: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``tensor``, or a copy laid out as ``p`` (a state loaded contiguous for a channels-last layer), recorded."""
    if tensor.stride() == p.stride() and tensor.dtype == p.dtype and tensor.device == p.device:
        return tensor
    new_state[name] = torch.empty_like(p).copy_(tensor)
    return new_state[name]


def _sgd(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> LayerStep:
    lr, momentum, weight_decay = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    sign = -1.0 if group["maximize"] else 1.0
    if momentum == 0:
        return LayerStep("sgd", [], (lr, 0.0, 1.0, weight_decay, sign, 0.0))
    new_state: dict[str, torch.Tensor] = {}
    buffer = state.get("momentum_buffer")
    if buffer is None:  # torch's SGD starts the buffer at the first step's direction: momentum 0, no dampening
        buffer = new_state["momentum_buffer"] = torch.zeros_like(p)
        carried, dampened = 0.0, 1.0
    else:
        buffer = _laid_out_like("momentum_buffer", buffer, p, new_state)
        carried, dampened = momentum, 1.0 - float(group["dampening"])
    variant = "sgd_nesterov" if group["nesterov"] else "sgd_momentum"
    return LayerStep(variant, [buffer], (lr, carried, dampened, weight_decay, sign, momentum), new_state)


def _adam(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any], decoupled: bool) -> LayerStep | None:
    lr, weight_decay, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = (float(beta) for beta in group["betas"])
    amsgrad = bool(group["amsgrad"])
    names = ["exp_avg", "exp_avg_sq"] + ["max_exp_avg_sq"] * amsgrad
    new_state: dict[str, torch.Tensor] = {}
    if not state:  # as torch's Adam creates it
        on_device = group["capturable"] or group["fused"]
        dtype = torch.float32 if group["fused"] or torch.get_default_dtype() != torch.float64 else torch.float64
        new_state["step"] = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
        new_state.update({name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in names})
        counter, steps = new_state["step"], 0.0
        moments = [new_state[name] for name in names]
    else:
        if not isinstance(state.get("step"), torch.Tensor) or any(name not in state for name in names):
            return None
        counter = state["step"]
        if counter.device.type != "cpu" and p.device.type != "cpu":
            return None  # reading an accelerator's step count would synchronise with it
        steps = float(counter)
        moments = [_laid_out_like(name, state[name], p, new_state) for name in names]
    t = steps + 1
    correction1, correction2 = 1 - beta1**t, 1 - beta2**t
    hyper = (
        lr * weight_decay if decoupled else 0.0,
        beta1,
        beta2,
        eps,
        0.0 if decoupled else weight_decay,
        -1.0 if group["maximize"] else 1.0,
        lr / correction1,
        math.sqrt(correction2),
    )
    return LayerStep("adam_amsgrad" if amsgrad else "adam", moments, hyper, new_state, counter)


def _read_adam(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> LayerStep | None:
    return _adam(group, p, state, decoupled=bool(group.get("decoupled_weight_decay")))


def _read_adamw(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> LayerStep | None:
    return _adam(group, p, state, decoupled=True)


_UPDATE, _UPDATE_AS_STORED, _UPDATED = "update", "update_as_stored", "updated"
"""What the step's arithmetic does with the optimizer's state: update it and go on with the float32 values
(:data:`_UPDATE`, the unsharded kernels), update it and go on with the values as stored (:data:`_UPDATE_AS_STORED`,
the sums half of a sharded layer's kernel: the update half, which reads them back, then forms the same ``D``; the same
for float32 state), or read it as already updated by this step (:data:`_UPDATED`, the update half)."""


def _sgd_operands(
    params: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    hyper: torch.Tensor,
    nesterov: bool,
    state: str = _UPDATE,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``torch.optim.SGD``'s step of one layer as the kernels' operands ``(w, D)``: ``exact`` (float64) and ``low``.

    The step's direction ``D = -lr * v`` (``v`` the momentum buffer, or the Nesterov or plain direction) is formed from
    the gradient, the weights and the buffer, in float32 (the precision of torch's own step for float32 layers; more
    than its own for lower precisions), and exactly in float64 for the sums. ``state`` says what happens to the
    buffer (see :data:`_UPDATE`, :data:`_UPDATE_AS_STORED`, :data:`_UPDATED`).

    Args:
        params: ``w``, a dense 2-D view of the layer.
        grad: The same view of its gradient.
        buffer: The same view of its momentum buffer (``None`` for SGD without momentum).
        hyper: ``(lr, carried, 1 - dampening, weight_decay, sign, momentum)`` (float64): ``carried`` is the momentum
            applied to the buffer, 0 (with ``1 - dampening`` 1) on the step that creates it, as torch's SGD starts it;
            ``sign`` is -1 under ``maximize``; ``momentum`` is Nesterov's.
        nesterov: Whether the direction is ``d + momentum * v`` rather than ``v``.
        state: What to do with the buffer.
    """
    lr, carried, dampened, weight_decay, sign, momentum = hyper.unbind()
    weights32 = params.float()
    direction = grad.float() * sign + weights32 * weight_decay
    if buffer is not None:
        if state == _UPDATED:
            velocity = buffer.float()
        else:
            velocity = _store(buffer, buffer.float() * carried + direction * dampened, state)
        direction = direction + velocity * momentum if nesterov else velocity
    return (params.double(), direction.double() * -lr), (weights32, direction * -lr)


def _store(tensor: torch.Tensor, value: torch.Tensor, state: str) -> torch.Tensor:
    """Write ``value`` (float32) to the state ``tensor``; return it, or under :data:`_UPDATE_AS_STORED` as stored."""
    tensor.copy_(value)
    return value.to(tensor.dtype).float() if state == _UPDATE_AS_STORED else value


def _sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    hyper: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
    nesterov: bool,
) -> torch.Tensor:
    """``torch.optim.SGD``'s step and the Layca step of one layer in one function (traced and compiled).

    The base step is never written to the weights: its direction (:func:`_sgd_operands`) is formed in registers,
    exactly in float64, so no snapshot of the weights is needed: the first pass reads ``(w, grad, buffer)`` and writes
    the new buffer, the second reads ``w`` and the new buffer (and ``grad`` again for Nesterov) and writes ``w``.

    Args:
        params: ``w``, a dense 2-D view of the layer; overwritten with ``k1 * w + k2 * D``.
        grad: The same view of its gradient.
        buffer: The same view of its momentum buffer, updated in place (``None`` for SGD without momentum).
        hyper: See :func:`_sgd_operands`.
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``, 0-dim or one per row (see :func:`~lightning_layca.step.kernels.after_step`).
        near_floor: The layer's near-floor flag, or-ed in place.
        nesterov: Whether the direction is ``d + momentum * v`` rather than ``v``.

    Returns:
        ``(a, b, c)`` as :func:`~lightning_layca.step.kernels.after_step`.
    """
    exact, low = _sgd_operands(params, grad, buffer, hyper, nesterov)
    return rotate_rows(params, exact, low, (rate, relative_lr, initial_norms, near_floor))


def _adam_operands(
    params: torch.Tensor,
    grad: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    hyper: torch.Tensor,
    state: str = _UPDATE,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``torch.optim.Adam``'s (or ``AdamW``'s) step of one layer as the kernels' operands ``(w, D)``, and its direction.

    The moments ``(exp_avg, exp_avg_sq, max_exp_avg_sq or None)`` are updated in float32, as torch's own step does
    (``state``: see :data:`_UPDATE`), and the step ``D = -step_size * m / (sqrt(v) / sqrt(bc2) + eps) - lr * wd * w``
    is formed exactly in float64. ``hyper``: ``(lr * decoupled_wd, beta1, beta2, eps, coupled_wd, sign, lr / bc1,
    sqrt(bc2))`` (float64; ``bc1``, ``bc2`` the bias corrections of this step, ``sign`` -1 under ``maximize``).

    Returns:
        ``exact`` (float64) and ``low`` (float32) operands, and the float32 direction
        ``m / (sqrt(v) / sqrt(bc2) + eps)``.
    """
    decay, beta1, beta2, eps, coupled_decay, sign, step_size, correction2 = hyper.unbind()
    exp_avg, exp_avg_sq, max_exp_avg_sq = moments
    weights32 = params.float()
    if state == _UPDATED:
        first = exp_avg.float()
        second = (exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq).float()
    else:
        gradient = grad.float() * sign + weights32 * coupled_decay
        first = exp_avg.float()
        first = _store(exp_avg, first + (gradient - first) * (1 - beta1), state)
        second = _store(exp_avg_sq, exp_avg_sq.float() * beta2 + gradient * gradient * (1 - beta2), state)
        if max_exp_avg_sq is not None:
            second = _store(max_exp_avg_sq, torch.maximum(max_exp_avg_sq.float(), second), state)
    direction = first / (second.sqrt() / correction2 + eps)
    weights = params.double()
    exact = weights, direction.double() * -step_size - weights * decay
    low = weights32, direction * -step_size - weights32 * decay
    return exact, low, direction


def _adam_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    hyper: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.optim.Adam``'s (or ``AdamW``'s) step and the Layca step of one layer in one function (compiled).

    As :func:`_sgd_step`, with the operands of :func:`_adam_operands` (the moments updated in place). The float32
    direction is written once, in the pass that updates the moments, and read back by the sums and the update: left
    to itself, Inductor recomputes it (a square root and two divisions per element, the kernel's costliest
    arithmetic) in the update pass from the old moments and the gradient.

    Args:
        params: ``w``, a dense 2-D view of the layer; overwritten with ``k1 * w + k2 * D``.
        grad: The same view of its gradient.
        exp_avg: The same view of the first moment, updated in place.
        exp_avg_sq: The same view of the second moment, updated in place.
        max_exp_avg_sq: The same view of the largest second moment (``amsgrad``), updated in place, or ``None``.
        hyper: See :func:`_adam_operands`.
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``, 0-dim or one per row (see :func:`~lightning_layca.step.kernels.after_step`).
        near_floor: The layer's near-floor flag, or-ed in place.

    Returns:
        ``(a, b, c)`` as :func:`~lightning_layca.step.kernels.after_step`, and the direction (float32, laid out as
        ``params``): compiled as an output (:data:`COMPILED_FORMS`), it is stored (a graph output always is) rather
        than recomputed; the callers drop it.
    """
    exact, low, direction = _adam_operands(params, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq), hyper)
    return rotate_rows(params, exact, low, (rate, relative_lr, initial_norms, near_floor)), direction


# The kernels that take a base optimizer's step, one per form of it, all called as
# ``kernel(params, grad, *state, hyper, rate, relative_lr, initial_norms, near_floor)``.

T = torch.Tensor


def _sgd_kernel(p: T, g: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, None, h, rate, lr, n0, flag, nesterov=False)


def _sgd_momentum_kernel(p: T, g: T, b: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, b, h, rate, lr, n0, flag, nesterov=False)


def _sgd_nesterov_kernel(p: T, g: T, b: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, b, h, rate, lr, n0, flag, nesterov=True)


def _adam_kernel(p: T, g: T, m: T, v: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _adam_step(p, g, m, v, None, h, rate, lr, n0, flag)[0]


def _adam_amsgrad_kernel(p: T, g: T, m: T, v: T, vmax: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _adam_step(p, g, m, v, vmax, h, rate, lr, n0, flag)[0]


def _adam_storing_kernel(p: T, g: T, m: T, v: T, h: T, rate: T, lr: T, n0: T, flag: T) -> tuple[T, T]:
    return _adam_step(p, g, m, v, None, h, rate, lr, n0, flag)


def _adam_amsgrad_storing_kernel(p: T, g: T, m: T, v: T, vmax: T, h: T, rate: T, lr: T, n0: T, flag: T) -> tuple[T, T]:
    return _adam_step(p, g, m, v, vmax, h, rate, lr, n0, flag)


BASE_KERNELS: dict[str, tuple[Callable[..., torch.Tensor], int, tuple[float, ...]]] = {
    "sgd": (_sgd_kernel, 0, (0.1, 0.0, 1.0, 1e-4, 1.0, 0.0)),
    "sgd_momentum": (_sgd_momentum_kernel, 1, (0.1, 0.9, 1.0, 1e-4, 1.0, 0.9)),
    "sgd_nesterov": (_sgd_nesterov_kernel, 1, (0.1, 0.9, 1.0, 1e-4, 1.0, 0.9)),
    "adam": (_adam_kernel, 2, (1e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 1e-2, 0.03)),
    "adam_amsgrad": (_adam_amsgrad_kernel, 3, (1e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 1e-2, 0.03)),
}
"""Per form of a base step the kernel takes (:attr:`LayerStep.variant`): the kernel, the number of state tensors it
updates, and stand-in values of ``hyper`` for its first compilation. Each kernel returns the layer's sums."""

COMPILED_FORMS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "adam": _adam_storing_kernel,
    "adam_amsgrad": _adam_amsgrad_storing_kernel,
}
"""The function compiled for a form of :data:`BASE_KERNELS` where it is not the kernel itself: the same arithmetic,
returning besides the sums what the compiled code must store rather than recompute (Adam's direction, see
:func:`_adam_step`). Its first output is the sums."""


def sharded_forms(variant: str) -> tuple[str, str]:
    """The two halves of the kernel of a base step's form (a key of :data:`BASE_KERNELS`) for a sharded layer."""
    return f"{variant}_sharded_sums", f"{variant}_sharded_update"


# The halves of those kernels for a process's shard of a sharded layer, around the step's one collective: the sums
# half is called as ``kernel(params, grad, *state, hyper, initial_norms)`` (it updates the state and returns the
# shard's partial sums), the update half as ``kernel(params, grad, *state, hyper, sums, rate, relative_lr,
# initial_norms, near_floor)`` (it forms ``D`` again from the weights and the updated state, takes the rule from the
# layer's full ``sums`` and writes the weights; ``single=True``: see step.kernels.update_rows). The arithmetic is the
# unsharded kernels' own.


def _sgd_sums(p: T, g: T, b: T | None, h: T, n0: T, nesterov: bool) -> T:
    return layer_sums(_sgd_operands(p, g, b, h, nesterov, _UPDATE_AS_STORED)[0], n0)


def _sgd_update(
    p: T, g: T, b: T | None, h: T, sums: T, scalars: tuple[T, T, T, T], nesterov: bool, single: bool = False
) -> T:
    exact, low = _sgd_operands(p, g, b, h, nesterov, _UPDATED)
    return update_rows(p, exact, low, sums, scalars, single)


def _sgd_sums_kernel(p: T, g: T, h: T, n0: T) -> T:
    return _sgd_sums(p, g, None, h, n0, nesterov=False)


def _sgd_momentum_sums_kernel(p: T, g: T, b: T, h: T, n0: T) -> T:
    return _sgd_sums(p, g, b, h, n0, nesterov=False)


def _sgd_nesterov_sums_kernel(p: T, g: T, b: T, h: T, n0: T) -> T:
    return _sgd_sums(p, g, b, h, n0, nesterov=True)


def _sgd_update_kernel(p: T, g: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False) -> T:
    return _sgd_update(p, g, None, h, sums, (rate, lr, n0, flag), nesterov=False, single=single)


def _sgd_momentum_update_kernel(
    p: T, g: T, b: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False
) -> T:
    return _sgd_update(p, g, b, h, sums, (rate, lr, n0, flag), nesterov=False, single=single)


def _sgd_nesterov_update_kernel(
    p: T, g: T, b: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False
) -> T:
    return _sgd_update(p, g, b, h, sums, (rate, lr, n0, flag), nesterov=True, single=single)


def _adam_sums_kernel(p: T, g: T, m: T, v: T, h: T, n0: T) -> T:
    return layer_sums(_adam_operands(p, g, (m, v, None), h, _UPDATE_AS_STORED)[0], n0)


def _adam_amsgrad_sums_kernel(p: T, g: T, m: T, v: T, vmax: T, h: T, n0: T) -> T:
    return layer_sums(_adam_operands(p, g, (m, v, vmax), h, _UPDATE_AS_STORED)[0], n0)


def _adam_update_kernel(
    p: T, g: T, m: T, v: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False
) -> T:
    exact, low, _ = _adam_operands(p, g, (m, v, None), h, _UPDATED)
    return update_rows(p, exact, low, sums, (rate, lr, n0, flag), single)


def _adam_amsgrad_update_kernel(
    p: T, g: T, m: T, v: T, vmax: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False
) -> T:
    exact, low, _ = _adam_operands(p, g, (m, v, vmax), h, _UPDATED)
    return update_rows(p, exact, low, sums, (rate, lr, n0, flag), single)


_HALVES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "sgd": (_sgd_sums_kernel, _sgd_update_kernel),
    "sgd_momentum": (_sgd_momentum_sums_kernel, _sgd_momentum_update_kernel),
    "sgd_nesterov": (_sgd_nesterov_sums_kernel, _sgd_nesterov_update_kernel),
    "adam": (_adam_sums_kernel, _adam_update_kernel),
    "adam_amsgrad": (_adam_amsgrad_sums_kernel, _adam_amsgrad_update_kernel),
}

SHARDED_BASE_KERNELS: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    name: (variant, half)
    for variant, halves in _HALVES.items()
    for name, half in zip(sharded_forms(variant), halves, strict=True)
}
"""Per half of a base step's form for sharded layers (:func:`sharded_forms`): the form (a key of
:data:`BASE_KERNELS`: the number of state tensors and the stand-in ``hyper``) and the function. Each returns the
layer's sums (partial for the sums half, the full ones it was given for the update half)."""


@dataclass(frozen=True)
class Family:
    """A base optimizer Layca knows: how its kernel takes its step, its equilibrium rate (see the module docstring)."""

    name: str
    optimizer: type[Optimizer]
    """The exact type (a subclass may step differently)."""
    read_step: Callable[[dict[str, Any], torch.Tensor, dict[str, Any]], LayerStep | None] | None
    """``read_step(param_group, layer, state)``: the layer's step at this step, or ``None``; ``None`` itself where no
    kernel takes this optimizer's step (it steps by itself, and Layca works after its step)."""
    equilibrium: Callable[[dict[str, Any]], float] | None
    """The equilibrium rate of a param group (``ValueError`` where it has none), or ``None`` if unknown."""

    def supports(self, group: dict[str, Any]) -> bool:
        """Whether the kernel can take the steps of this param group (its hyperparameters are plain numbers)."""
        if self.read_step is None or group.get("differentiable", False) or isinstance(group["lr"], torch.Tensor):
            return False
        return "betas" not in group or not any(isinstance(beta, torch.Tensor) for beta in group["betas"])


def _weight_decay(group: dict[str, Any]) -> tuple[float, float]:
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if not wd > 0:
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' needs weight decay: a param group holding layers has "
            f"weight_decay={wd} (without decay the norm grows forever and there is no equilibrium). Set "
            "weight_decay > 0 on that group, or give the rotation rate as a number."
        )
    return lr, wd


def _sgd_equilibrium(group: dict[str, Any]) -> float:
    """SGD with momentum ``mu`` (no dampening): ``sqrt(2 * lr * wd / (1 + mu))``."""
    lr, wd = _weight_decay(group)
    if float(group.get("dampening", 0.0)) != 0:
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' covers SGD without dampening; got dampening={group['dampening']}."
        )
    return math.sqrt(2 * lr * wd / (1 + float(group.get("momentum", 0.0))))


def _adamw_equilibrium(group: dict[str, Any]) -> float:
    """AdamW (decoupled decay, ``beta1`` its first beta): ``sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))``."""
    lr, wd = _weight_decay(group)
    beta1 = float(group["betas"][0])
    return math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))


def polar_correlation_terms(rows: int, cols: int, points: int = 96) -> tuple[float, float, float]:
    """The first odd Hermite coefficients ``(h1, h3, h5)`` of the polar map of a large Gaussian ``rows x cols`` matrix.

    Two such matrices correlated by ``c`` have polar factors correlated by ``f(c) = h1 c + h3 c^3 + h5 c^5``
    (``h_n >= 0``, ``f(1) = 1``), with two of its properties matched:

    * ``f'(0) = h1 = kappa``, the polar map's linear share: ``(E ||X||_*)^2 / (E ||X||_F^2 * min(rows, cols))``;
    * ``f'(1) = beta``: perturbing ``X`` by ``dX`` turns its polar factor ``U V^T`` by ``U A V^T`` with
      ``A_ij = (a_ij - a_ji) / (s_i + s_j)`` (``a = U^T dX V``, ``s`` the singular values), plus ``a_ki / s_i`` into
      the ``max - min`` directions outside the factor's span; averaged, ``beta = 2 lam E[1 / (r + r')^2] + 1``.

    With ``lam = min / max`` of the shape, the squared singular values (scaled to mean 1) follow the
    Marchenko-Pastur law on ``[(1 - sqrt(lam))^2, (1 + sqrt(lam))^2]``: ``kappa = (E r)^2`` and the ``beta`` above
    with ``r, r'`` two independent square roots of it, taken by a fixed ``points``-point quadrature. Square matrices
    (``beta`` grows without bound as ``lam -> 1``) and shapes near them keep ``h3 = 0`` and ``h5 = 1 - kappa``,
    the steepest end these terms allow.
    """
    lam = min(rows, cols) / max(rows, cols)
    low, high = (1 - math.sqrt(lam)) ** 2, (1 + math.sqrt(lam)) ** 2
    half, mid = (high - low) / 2, (high + low) / 2
    roots, weights = [], []
    for i in range(points):  # x = mid + half cos(theta): the density's square root becomes half * sin(theta)
        theta = math.pi * (i + 0.5) / points
        x = mid + half * math.cos(theta)
        roots.append(math.sqrt(x))
        weights.append((half * math.sin(theta)) ** 2 / (2 * math.pi * lam * x) * math.pi / points)
    kappa = sum(w * r for w, r in zip(weights, roots, strict=True)) ** 2
    pairs = sum(
        w * v / (r + q) ** 2 for w, r in zip(weights, roots, strict=True) for v, q in zip(weights, roots, strict=True)
    )
    beta = 2 * lam * pairs + 1
    h5 = min(max((beta - kappa - 3 * (1 - kappa)) / 2, 0.0), 1 - kappa)
    return kappa, 1 - kappa - h5, h5


def muon_correlation(
    momentum: float, nesterov: bool, terms: tuple[float, float, float] = (1.0, 0.0, 0.0), decay: float = 1.0
) -> float:
    """How much Muon's consecutive orthogonalised directions add up: ``K = 1 + 2 * sum_k decay^k rho_k``.

    ``rho_k = <O_t, O_{t-k}> / ||O||^2`` is the correlation of the orthogonalised directions ``k`` steps apart and
    ``decay = 1 - lr * wd`` how much of a step is left ``k`` steps later. Muon's direction before orthogonalisation
    is ``D_t = sum_j a_j g_{t-j}`` with ``a_j = (1 - mu) mu^j`` (``buf.lerp_(g, 1 - mu)``), or with Nesterov
    ``a_0 = 1 - mu^2`` and ``a_j = (1 - mu) mu^(j+1)``; for uncorrelated gradients the directions ``k`` steps apart
    are correlated by ``c_k = C mu^k`` (``C = 1`` without Nesterov, ``C < 1`` with it).

    Orthogonalising decorrelates them: ``rho_k = f(c_k)``, ``f(c) = h1 c + h3 c^3 + h5 c^5`` with ``terms`` the
    coefficients (:func:`polar_correlation_terms`), so the sum is geometric:
    ``K = 1 + 2 sum_n h_n C^n q_n / (1 - q_n)``, ``q_n = decay mu^n``. With the default ``terms`` (a linear
    orthogonalisation) and ``decay = 1`` it is the momentum buffers' own ``(1 + mu) / (1 - mu)``, or
    ``1 / ((1 - mu^2)^2 + (1 - mu) mu^4 / (1 + mu))`` with Nesterov.
    """
    mu = momentum
    if nesterov:
        norm = (1 - mu**2) ** 2 + (1 - mu) * mu**4 / (1 + mu)
        coupling = ((1 - mu**2) * (1 - mu) * mu + (1 - mu) ** 2 * mu**4 / (1 - mu**2)) / norm if mu else 0.0
    else:
        coupling = 1.0
    total = 0.0
    for n, h in zip((1, 3, 5), terms, strict=True):
        q = decay * mu**n
        total += h * coupling**n * q / (1 - q)
    return 1 + 2 * total


def _muon_equilibrium(group: dict[str, Any]) -> float:
    """Muon (decoupled decay at the group's lr, a direction of fixed norm): ``sqrt(2 * lr * wd / K)``.

    ``K`` is the :func:`muon_correlation` of its momentum, with the mean :func:`polar_correlation_terms` of the
    group's matrices and the decay ``1 - lr * wd``.
    """
    lr, wd = _weight_decay(group)
    momentum = float(group.get("momentum", 0.0))
    if not 0 <= momentum < 1:
        raise ValueError(f"Layca: rotation_rate='{EQUILIBRIUM}' covers Muon with momentum in [0, 1); got {momentum}.")
    each = [polar_correlation_terms(*p.shape) for p in group["params"] if p.ndim == 2] or [(1.0, 0.0, 0.0)]
    h1, h3, h5 = (sum(t[i] for t in each) / len(each) for i in range(3))
    nesterov = bool(group.get("nesterov", False))
    return math.sqrt(2 * lr * wd / muon_correlation(momentum, nesterov, (h1, h3, h5), 1 - lr * wd))


FAMILIES: tuple[Family, ...] = (
    Family("sgd", torch.optim.SGD, _sgd, _sgd_equilibrium),
    Family("adam", torch.optim.Adam, _read_adam, None),
    Family("adamw", torch.optim.AdamW, _read_adamw, _adamw_equilibrium),
    Family("muon", torch.optim.Muon, None, _muon_equilibrium),
    Family("muon_adamw", MuonWithAdamW, None, lambda g: (_muon_equilibrium if g[USE_MUON] else _adamw_equilibrium)(g)),
)
"""The base optimizers whose step the compiled kernel takes, and what Layca knows of each."""


def family_of(optimizer: Optimizer) -> Family | None:
    """The :class:`Family` of ``optimizer`` (its exact type), or ``None``."""
    return next((family for family in FAMILIES if type(optimizer) is family.optimizer), None)


def equilibrium_rate(optimizer: Optimizer, group: dict[str, Any]) -> float:
    """Return the angular update per step (tan of the angle) that ``optimizer`` reaches at equilibrium on ``group``.

    With weight decay, the norm of a scale-invariant layer settles where decay's shrinking balances the growth from
    updates orthogonal to the weights; the angle each step then turns the layer is (Kosson et al., "Rotational
    Equilibrium", 2024), with ``lr`` and ``wd`` the group's learning rate and weight decay:

    * ``AdamW`` (decoupled decay, ``beta1`` its first beta): ``sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))``;
    * ``SGD`` with momentum ``mu`` (no dampening) and weight decay: ``sqrt(2 * lr * wd / (1 + mu))``;
    * ``Muon``: ``sqrt(2 * lr * wd / K)``, ``K`` its :func:`muon_correlation`. Its step is
      ``w <- (1 - lr * wd) w - lr' O`` with ``O`` the orthogonalised direction (a fixed norm) and ``lr'`` the lr
      adjusted to the layer's shape; at equilibrium, decay's ``2 * lr * wd * ||w||^2`` per step balances the growth
      ``lr'^2 ||O||^2 K``, so the angle ``lr' ||O|| / ||w||`` does not depend on the adjustment (which sets the
      equilibrium norm). ``K`` counts how the orthogonalised directions of consecutive steps add up, which is less
      than their momentum buffers do: orthogonalising decorrelates them, by an amount set by the matrices' aspect
      ratio (:func:`polar_correlation_terms`, averaged over the group's matrices). Against a simulated Muon it
      holds within 3 % at momentum 0.9 (and without momentum) for aspect ratios from 1/4 to 1 (see the docs).

    Raises:
        ValueError: For another optimizer, a group without positive weight decay, or SGD with dampening.

    Example:
        >>> p = torch.nn.Parameter(torch.randn(4, 4))
        >>> round(equilibrium_rate(torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4),
        ...                        {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "dampening": 0}), 6)
        0.007255
    """
    family = family_of(optimizer)
    if family is None or family.equilibrium is None:
        known = " and ".join(f"torch.optim.{f.optimizer.__name__}" for f in FAMILIES if f.equilibrium is not None)
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' knows the equilibrium of {known}, not of "
            f"{type(optimizer).__name__}; give the rotation rate as a number."
        )
    return family.equilibrium(group)
