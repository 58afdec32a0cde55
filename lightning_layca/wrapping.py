"""An optimizer that stands for another one: its containers are the wrapped optimizer's own objects.

:class:`~lightning_layca.Layca` is a :class:`WrappedOptimizer`: code written for the wrapped optimizer (LR schedulers,
Lightning's fine-tuning callbacks and ``LearningRateMonitor``, checkpointing) sees and changes the wrapped optimizer
when it reads or assigns ``param_groups``, ``state`` or ``defaults`` on the wrapper. This module holds that forwarding
and how the wrapped optimizer's step is called, nothing of Layca's arithmetic.

Example:
    >>> base = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    >>> wrapper = WrappedOptimizer(base)
    >>> wrapper.param_groups is base.param_groups, wrapper.state is base.state
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["WrappedOptimizer"]


def _forwarded(name: str, what: str) -> Any:
    """A property that reads and assigns the wrapped optimizer's attribute ``name``.

    Before the wrapped optimizer is known (inside torch's ``Optimizer.__init__``), the value is a placeholder of the
    wrapper's own.
    """
    placeholder = f"_placeholder_{name}"

    def get(self: WrappedOptimizer) -> Any:
        base = self._base_or_none()
        return getattr(base, name) if base is not None else self.__dict__[placeholder]

    def set_(self: WrappedOptimizer, value: Any) -> None:
        base = self._base_or_none()
        if base is None:
            self.__dict__[placeholder] = value
        else:
            setattr(base, name, value)

    return property(get, set_, doc=f"The wrapped optimizer's ``{name}`` ({what}; the same object).")


class WrappedOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are those of ``optimizer``.

    Properties rather than copied references: code that assigns ``optimizer.param_groups = ...`` on the wrapper (as
    Lightning's fine-tuning callbacks do when they restore their groups) changes the wrapped optimizer.

    Args:
        optimizer: The optimizer to wrap.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        # torch's Optimizer.__init__ sets up hook registries and step patching; its placeholder containers are kept
        # apart (see the properties below) until the wrapped optimizer is known.
        super().__init__([torch.zeros(0)], {})
        self.optimizer = optimizer

    def _base_or_none(self) -> Optimizer | None:
        return self.__dict__.get("optimizer")

    param_groups = _forwarded("param_groups", "list of dicts")
    state = _forwarded("state", "mapping from parameter to its state")
    defaults = _forwarded("defaults", "dict of default hyperparameters")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of every parameter of the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer."""
        if self._base_or_none() is None:  # torch's Optimizer.__init__ adds its placeholder group
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    def calls_closure_first(self) -> bool:
        """Whether the wrapped optimizer is one of torch's, which call the closure once, first (LBFGS excepted)."""
        base = type(self.optimizer)
        return base.__module__.startswith("torch.optim.") and base is not torch.optim.LBFGS

    def base_step(self, closure: Callable[[], Any] | None) -> Any:
        """Run the wrapped optimizer's step (the closure, if any, evaluated with gradients enabled)."""
        if closure is None:
            return self.optimizer.step()

        def closure_with_grad() -> Any:
            with torch.enable_grad():
                return closure()

        return self.optimizer.step(closure_with_grad)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only its containers; the wrapper's are the wrapped optimizer's, kept with the rest.
        return dict(self.__dict__)
