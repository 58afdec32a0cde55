"""A base optimizer's step of one layer, read from the optimizer's own state as the compiled kernel takes it.

For one layer at one step, what torch's own step would do, in the kernel's terms (:class:`LayerStep`): the form of the
step (a key of :data:`lightning_layca.step.base_kernels.BASE_KERNELS`), the state tensors it updates in the optimizer's
own ``state`` (created as torch creates them at a layer's first step), and its hyperparameters as numbers. The
optimizer's state dict is therefore the same as without Layca's kernel: a resume with another implementation, or with
the optimizer alone, carries on from it. One reader per optimizer (:func:`read_sgd`, :func:`read_adam`,
:func:`read_adamw`), listed in :data:`lightning_layca.step.families.FAMILIES`; each returns ``None`` where the kernel
cannot take the step.

Example:
    >>> p = torch.nn.Parameter(torch.randn(4, 4))
    >>> group = torch.optim.SGD([p], lr=0.1, momentum=0.9).param_groups[0]
    >>> step = read_sgd(group, p, {})
    >>> step.variant, step.hyper[:3], sorted(step.new_state)
    ('sgd_momentum', (0.1, 0.0, 1.0), ['momentum_buffer'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LayerStep", "read_adam", "read_adamw", "read_sgd"]


@dataclass
class LayerStep:
    """One layer's base step as the kernel takes it (see :attr:`lightning_layca.step.families.Family.read_step`)."""

    variant: str
    """The form of the step: a key of :data:`lightning_layca.step.base_kernels.BASE_KERNELS`."""
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


def read_sgd(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> LayerStep:
    """``torch.optim.SGD``'s step of ``p``: plain, with momentum (the buffer created at its first step) or Nesterov."""
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


def _read_adam_like(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any], decoupled: bool) -> LayerStep | None:
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


def read_adam(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> LayerStep | None:
    """``torch.optim.Adam``'s step of ``p`` (decoupled decay where the group says ``decoupled_weight_decay``)."""
    return _read_adam_like(group, p, state, decoupled=bool(group.get("decoupled_weight_decay")))


def read_adamw(group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> LayerStep | None:
    """``torch.optim.AdamW``'s step of ``p``: Adam's, with decoupled weight decay."""
    return _read_adam_like(group, p, state, decoupled=True)
