"""One entry per base-optimizer family: how its step is read, the kernel that takes it, its equilibrium rate.

Supporting a new base optimizer is one :class:`Family` in :data:`FAMILIES`, which brings together what Layca knows of
it, each from its own room:

* ``read_step``: for one layer at one step, what torch's own step would do, in the kernel's terms
  (:class:`~lightning_layca.step.base_steps.LayerStep`, :mod:`lightning_layca.step.base_steps`): the form of the step
  (a key of :data:`~lightning_layca.step.base_kernels.BASE_KERNELS`), the state tensors it updates in the optimizer's
  own ``state``, and its hyperparameters as numbers. ``None`` where the kernel cannot take the step.
* the kernels (:mod:`lightning_layca.step.base_kernels`): the optimizer's step and the Layca step of one layer in
  traced functions (one call, or two halves), the step ``D`` formed exactly in float64 and never written, so no
  snapshot of the weights is needed;
* ``equilibrium``: the angular update per step (tan of the angle) the optimizer reaches at equilibrium with weight
  decay (:mod:`lightning_layca.step.equilibrium`), for ``rotation_rate="equilibrium"``.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_layca.argument_types import EQUILIBRIUM
from lightning_layca.muon import MuonWithAdamW
from lightning_layca.step.base_steps import LayerStep, read_adam, read_adamw, read_sgd
from lightning_layca.step.equilibrium import (
    adamw_equilibrium,
    muon_adamw_equilibrium,
    muon_equilibrium,
    sgd_equilibrium,
)

__all__ = ["FAMILIES", "Family", "equilibrium_rate", "family_of"]


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


FAMILIES: tuple[Family, ...] = (
    Family("sgd", torch.optim.SGD, read_sgd, sgd_equilibrium),
    Family("adam", torch.optim.Adam, read_adam, None),
    Family("adamw", torch.optim.AdamW, read_adamw, adamw_equilibrium),
    Family("muon", torch.optim.Muon, None, muon_equilibrium),
    Family("muon_adamw", MuonWithAdamW, None, muon_adamw_equilibrium),
)
"""The base optimizers whose step the compiled kernel takes, and what Layca knows of each."""


def family_of(optimizer: Optimizer) -> Family | None:
    """The :class:`Family` of ``optimizer`` (its exact type), or ``None``."""
    return next((family for family in FAMILIES if type(optimizer) is family.optimizer), None)


def equilibrium_rate(optimizer: Optimizer, group: dict[str, Any]) -> float:
    """Return the angular update per step (tan of the angle) that ``optimizer`` reaches at equilibrium on ``group``.

    The formula of its family (``lightning_layca.step.equilibrium``), with ``lr`` and ``wd`` the group's learning
    rate and weight decay:

    * ``AdamW`` (decoupled decay, ``beta1`` its first beta): ``sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))``;
    * ``SGD`` with momentum ``mu`` (no dampening) and weight decay: ``sqrt(2 * lr * wd / (1 + mu))``;
    * ``Muon``: ``sqrt(2 * lr * wd / K)``, ``K`` how its orthogonalised directions add up
      (:func:`~lightning_layca.step.equilibrium.muon_equilibrium`);
    * :class:`~lightning_layca.MuonWithAdamW`: Muon's for its Muon groups, AdamW's for the others.

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
