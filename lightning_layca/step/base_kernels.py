"""The kernels that take a base optimizer's step and the Layca step of one layer, traced and compiled.

One form per kind of base step (:data:`BASE_KERNELS`, a :attr:`lightning_layca.step.base_steps.LayerStep.variant`):
``torch.optim.SGD`` (plain, momentum, Nesterov), ``Adam`` and ``AdamW`` (with and without ``amsgrad``). Each forms the
optimizer's step ``D`` from the gradient, the weights and the optimizer's state (updated in place, as torch's own step
updates it), exactly in float64 for the sums and never written to the weights, so no snapshot is needed; the sums, the
rule and the update are those of :mod:`lightning_layca.step.kernels`. Every form comes in two halves
(:data:`BASE_HALVES`): the sums, having updated the state, then the update from the layer's full sums; a
sharded layer takes them around the step's one collective, and so does every other layer, without it, except around
SGD, whose forms also take the step in one call (the sums and the update,
:func:`lightning_layca.step.kernels.rotate_rows`; see :data:`BASE_KERNELS`), per unit always and per layer where the
optimizer's form says so (:mod:`lightning_layca.step.sgd_form`). They are registered and compiled by
:mod:`lightning_layca.step.compiled` and called by :mod:`lightning_layca.step.base_compiled`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_layca.step.kernels import layer_sums, rotate_rows, update_rows

__all__ = ["BASE_HALVES", "BASE_KERNELS", "base_halves"]


_UPDATE, _UPDATE_AS_STORED, _UPDATED = "update", "update_as_stored", "updated"
"""What the step's arithmetic does with the optimizer's state: update it and go on with the float32 values
(:data:`_UPDATE`, SGD's one-call kernels), update it and go on with the values as stored (:data:`_UPDATE_AS_STORED`,
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
    state: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``torch.optim.Adam``'s (or ``AdamW``'s) step of one layer as the kernels' operands ``(w, D)``.

    The moments ``(exp_avg, exp_avg_sq, max_exp_avg_sq or None)`` are updated in float32, as torch's own step does
    (``state``: see :data:`_UPDATE`), and the step ``D = -step_size * m / (sqrt(v) / sqrt(bc2) + eps) - lr * wd * w``
    is formed exactly in float64. ``hyper``: ``(lr * decoupled_wd, beta1, beta2, eps, coupled_wd, sign, lr / bc1,
    sqrt(bc2))`` (float64; ``bc1``, ``bc2`` the bias corrections of this step, ``sign`` -1 under ``maximize``).

    Returns:
        ``exact`` (float64) and ``low`` (float32) operands.
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
    return exact, low


# The one-call kernels of SGD's forms, all called as
# ``kernel(params, grad, *state, hyper, rate, relative_lr, initial_norms, near_floor)``.

T = torch.Tensor


def _sgd_kernel(p: T, g: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, None, h, rate, lr, n0, flag, nesterov=False)


def _sgd_momentum_kernel(p: T, g: T, b: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, b, h, rate, lr, n0, flag, nesterov=False)


def _sgd_nesterov_kernel(p: T, g: T, b: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, b, h, rate, lr, n0, flag, nesterov=True)


BASE_KERNELS: dict[str, tuple[Callable[..., torch.Tensor] | None, int, tuple[float, ...]]] = {
    "sgd": (_sgd_kernel, 0, (0.1, 0.0, 1.0, 1e-4, 1.0, 0.0)),
    "sgd_momentum": (_sgd_momentum_kernel, 1, (0.1, 0.9, 1.0, 1e-4, 1.0, 0.9)),
    "sgd_nesterov": (_sgd_nesterov_kernel, 1, (0.1, 0.9, 1.0, 1e-4, 1.0, 0.9)),
    "adam": (None, 2, (1e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 1e-2, 0.03)),
    "adam_amsgrad": (None, 3, (1e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 1e-2, 0.03)),
}
"""Per form of a base step the kernels take (a ``LayerStep.variant``, :mod:`lightning_layca.step.base_steps`): its
one-call kernel (SGD's forms) or ``None`` (Adam's), the number of state tensors it updates, and stand-in values of
``hyper`` for its first compilation. Each one-call kernel returns the layer's sums. Sharded layers take the two halves
of :data:`BASE_HALVES`, and so do Adam's; per unit SGD's forms take their one-call kernel, per layer the form the
optimizer keeps (``step.base_compiled.in_halves``, :mod:`lightning_layca.step.sgd_form`). In one call the update pass
either forms the step again from the old state and the gradient (SGD's: a tensor more to read, 6 against 5 for SGD with
momentum) or reads it from a tensor the size of the layer that the compiled code stores, allocated at every call
(Adam's, until the section "Adam's step in two halves" of ``benchmarks/README.md``): the process then faulted its pages
in again at every step. The halves store nothing but the optimizer's state, and the update half forms the step again
from the state the sums half wrote (for Adam per layer and without ``amsgrad``, 7 tensor reads and 3 writes per element,
against 8 and 4). Measured in that section."""


def base_halves(variant: str) -> tuple[str, str]:
    """The names of the two halves of a base step's form (a key of :data:`BASE_KERNELS`): its sums, its update."""
    return f"{variant}_sums", f"{variant}_update"


# The halves of those kernels, which a process's shard of a sharded layer takes around the step's one collective: the
# sums half is called as ``kernel(params, grad, *state, hyper, initial_norms)`` (it updates the state and returns the
# layer's (shard's partial) sums, over its elements in memory order rather than its lanes side by side, so that the
# state's store joins the loop of the sums: step.compiled._STORING_SUMS_OPTIONS), the update half as ``kernel(params,
# grad, *state, hyper, sums, rate, relative_lr, initial_norms, near_floor)`` (it forms ``D`` again from the weights and
# the updated state, takes the rule from the layer's full ``sums`` and writes the weights; ``single=True``: see
# step.kernels.update_rows). The sums, the rule and the update are those of step.kernels, as in SGD's one-call kernels.


def _sgd_sums(p: T, g: T, b: T | None, h: T, n0: T, nesterov: bool) -> T:
    return layer_sums(_sgd_operands(p, g, b, h, nesterov, _UPDATE_AS_STORED)[0], n0, lanes=False)


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
    return layer_sums(_adam_operands(p, g, (m, v, None), h, _UPDATE_AS_STORED)[0], n0, lanes=False)


def _adam_amsgrad_sums_kernel(p: T, g: T, m: T, v: T, vmax: T, h: T, n0: T) -> T:
    return layer_sums(_adam_operands(p, g, (m, v, vmax), h, _UPDATE_AS_STORED)[0], n0, lanes=False)


def _adam_update_kernel(
    p: T, g: T, m: T, v: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False
) -> T:
    exact, low = _adam_operands(p, g, (m, v, None), h, _UPDATED)
    return update_rows(p, exact, low, sums, (rate, lr, n0, flag), single)


def _adam_amsgrad_update_kernel(
    p: T, g: T, m: T, v: T, vmax: T, h: T, sums: T, rate: T, lr: T, n0: T, flag: T, single: bool = False
) -> T:
    exact, low = _adam_operands(p, g, (m, v, vmax), h, _UPDATED)
    return update_rows(p, exact, low, sums, (rate, lr, n0, flag), single)


_HALVES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "sgd": (_sgd_sums_kernel, _sgd_update_kernel),
    "sgd_momentum": (_sgd_momentum_sums_kernel, _sgd_momentum_update_kernel),
    "sgd_nesterov": (_sgd_nesterov_sums_kernel, _sgd_nesterov_update_kernel),
    "adam": (_adam_sums_kernel, _adam_update_kernel),
    "adam_amsgrad": (_adam_amsgrad_sums_kernel, _adam_amsgrad_update_kernel),
}

BASE_HALVES: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    name: (variant, half)
    for variant, halves in _HALVES.items()
    for name, half in zip(base_halves(variant), halves, strict=True)
}
"""Per half of a base step's form (:func:`base_halves`): the form (a key of
:data:`BASE_KERNELS`: the number of state tensors and the stand-in ``hyper``) and the function. Each returns the
layer's sums (partial for the sums half, the full ones it was given for the update half)."""
