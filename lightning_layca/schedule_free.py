"""Schedule-free training around any optimizer, with the evaluation weights kept exactly.

Schedule-free optimization (A. Defazio et al., "The Road Less Scheduled", 2024) runs a base optimizer on a sequence
``z``, evaluates the model at the running average ``x`` of the ``z``'s, and takes gradients at their interpolation
``y = (1 - beta) z + beta x``; no learning-rate schedule is needed. :class:`ScheduleFree` does this around any torch
optimizer, so that Layca can sit **inside** it: ``ScheduleFree(Layca(SGD(...)))`` rotates every layer of ``z`` by the
chosen angle per step and keeps its norm, and ``x`` averages those rotated iterates. Layca around a schedule-free
optimizer would instead reshape the step of ``y``, of which ``x`` is only implied, and the two would drift apart.

The parameters hold ``y`` in training mode and ``x`` in evaluation mode (:meth:`ScheduleFree.eval`,
:meth:`ScheduleFree.train`). Both ``z`` and ``x`` are kept (:attr:`ScheduleFree.iterates`, saved in the state dict
beside the base optimizer's), apart from the base optimizer's own state, so switching writes stored or
recomputed values rather than interpolating back and forth: a train -> eval -> train cycle leaves the parameters
bit-identical, and a checkpoint restores the same ``y`` whichever mode it was saved in.

Example:
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> optimizer = ScheduleFree(torch.optim.SGD([w], lr=0.1))
    >>> w.grad = torch.ones(3)
    >>> optimizer.step()
    >>> optimizer.eval()
    >>> w.tolist()  # x: the average of the z's so far (here the one step's z)
    [0.8999999761581421, 0.8999999761581421, 0.8999999761581421]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_layca.wrapping import WrappedOptimizer

__all__ = ["ScheduleFree", "evaluation_weights", "has_evaluation_weights"]


class ScheduleFree(WrappedOptimizer):
    """Schedule-free averaging around ``optimizer`` (see the module docstring).

    Args:
        optimizer: The base optimizer (it steps ``z``); its ``param_groups`` and ``state`` are shared.
        momentum: ``beta``, the interpolation between ``z`` and ``x`` at which gradients are taken.
        weight_lr_power: The weight of each step in the average ``x`` is ``lr_max ** weight_lr_power`` (the largest
            learning rate so far: steps of a warm-up weigh less).

    Raises:
        ValueError: For a momentum outside ``[0, 1)`` or a negative ``weight_lr_power``.
    """

    def __init__(self, optimizer: Optimizer, momentum: float = 0.9, weight_lr_power: float = 2.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ScheduleFree: momentum must be in [0, 1), got {momentum!r}.")
        if not weight_lr_power >= 0.0:
            raise ValueError(f"ScheduleFree: weight_lr_power must be >= 0, got {weight_lr_power!r}.")
        super().__init__(optimizer)
        self.momentum = float(momentum)
        self.weight_lr_power = float(weight_lr_power)
        self.training = True
        self.iterates: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        """Parameter -> ``{"z": ..., "x": ...}``, from its first step on."""

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _layers(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        return [(p, self.iterates[p]) for p in self._params() if p in self.iterates]

    def _y(self, state: dict[str, Any]) -> torch.Tensor:
        return torch.lerp(state["z"], state["x"], self.momentum)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the evaluation weights ``x`` in the parameters."""
        for p, state in self._layers():
            p.copy_(state["x"])
        self.training = False

    @torch.no_grad()
    def train(self) -> None:
        """Put the training point ``y`` in the parameters (recomputed as the step computes it: exact)."""
        for p, state in self._layers():
            p.copy_(self._y(state))
        self.training = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take gradients at ``y`` (the closure, if any), step ``z`` with the base optimizer, update ``x`` and ``y``.

        Raises:
            RuntimeError: In evaluation mode (the parameters hold ``x``, not the point gradients are taken at).
        """
        if not self.training:
            raise RuntimeError("ScheduleFree: step() in evaluation mode; call train() first (after validation).")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped: list[list[torch.Tensor]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            stepped.append(params)
            for p in params:
                if p not in self.iterates:  # z, x and y all start at the initial weights
                    self.iterates[p] = {"z": p.detach().clone(), "x": p.detach().clone()}
                p.copy_(self.iterates[p]["z"])
        self.optimizer.step()
        for group, params in zip(self.param_groups, stepped, strict=True):
            lr = float(group["lr"])
            group["lr_max"] = lr_max = max(lr, float(group.get("lr_max", 0.0)))
            weight = lr_max**self.weight_lr_power
            group["weight_sum"] = weight_sum = float(group.get("weight_sum", 0.0)) + weight
            fraction = weight / weight_sum if weight_sum > 0 else 1.0
            for p in params:
                state = self.iterates[p]
                state["z"].copy_(p)
                state["x"].lerp_(state["z"], fraction)
                p.copy_(self._y(state))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, and ``z`` and ``x`` by the index of their parameter."""
        params = self._params()
        return {
            "base": self.optimizer.state_dict(),
            "iterates": {i: dict(self.iterates[p]) for i, p in enumerate(params) if p in self.iterates},
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`, and put ``y`` in the parameters if training."""
        self.optimizer.load_state_dict(state_dict["base"])
        params = self._params()
        self.iterates = {
            params[int(i)]: {k: v.to(params[int(i)]).clone() for k, v in kept.items()}
            for i, kept in state_dict["iterates"].items()
        }
        if self.training:
            self.train()


def has_evaluation_weights(optimizers: Iterable[object]) -> bool:
    """Whether some of ``optimizers`` is a :class:`ScheduleFree` in training mode (its parameters hold ``y``)."""
    return any(isinstance(o, ScheduleFree) and o.training for o in optimizers)


@contextmanager
def evaluation_weights(optimizers: Iterable[object]) -> Iterator[None]:
    """Inside, the parameters of every :class:`ScheduleFree` in training mode hold ``x``; after, ``y`` (exactly)."""
    switched = [o for o in optimizers if isinstance(o, ScheduleFree) and o.training]
    for optimizer in switched:
        optimizer.eval()
    try:
        yield
    finally:
        for optimizer in switched:
            optimizer.train()
