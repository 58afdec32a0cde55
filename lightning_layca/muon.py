"""Muon for the matrices, AdamW for the rest, as one optimizer: what Lightning's ``configure_optimizers`` returns.

``torch.optim.Muon`` (K. Jordan et al., "Muon: an optimizer for hidden layers in neural networks", 2024) steps 2-D
weights only and refuses any other parameter, so a real model pairs it with AdamW for biases, normalisation
parameters and any parameter the user keeps out of Muon (embeddings, the output layer). Under Lightning's automatic
optimization that pair must be one optimizer object: :class:`MuonWithAdamW` holds a ``torch.optim.Muon`` and a
``torch.optim.AdamW`` and steps both, with one ``param_groups`` list, one ``state`` and one state dict, so that LR
schedulers, checkpoints and :class:`~lightning_layca.Layca` see one optimizer.

Convolution weights (4-D) reach Muon flattened to 2-D, as Muon's users train them: register a parametrization that
keeps the parameter as ``(out_channels, in_channels * kh * kw)`` (see ``docs/other-optimizers.md``); the flattened
matrix is the same vector, so its rotation, and each output filter's, is unchanged.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> optimizer = MuonWithAdamW(model.parameters(), lr=0.02, adamw_lr=1e-3)
    >>> [(group["use_muon"], len(group["params"])) for group in optimizer.param_groups]
    [(True, 2), (False, 2)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["MuonWithAdamW"]

USE_MUON = "use_muon"


class MuonWithAdamW(Optimizer):
    """``torch.optim.Muon`` for the param groups marked ``use_muon``, ``torch.optim.AdamW`` for the others.

    Args:
        params: Parameters, or param groups (dicts). Parameters, and groups without a ``"use_muon"`` key, are split:
            the 2-D ones go to Muon, the others to AdamW. A group with ``"use_muon": True`` must hold 2-D
            parameters only (Muon's own rule); ``"use_muon": False`` sends a group to AdamW whatever its shapes.
            Group keys other than ``params`` and ``use_muon`` are the hyperparameters of the optimizer it goes to.
        lr: Muon's learning rate.
        weight_decay: Muon's (decoupled) weight decay.
        momentum: Muon's momentum.
        nesterov: Whether Muon uses Nesterov momentum.
        adjust_lr_fn: Muon's shape adjustment of the lr (``None``/``"original"`` or ``"match_rms_adamw"``).
        adamw_lr: AdamW's learning rate.
        adamw_betas: AdamW's betas.
        adamw_weight_decay: AdamW's (decoupled) weight decay.
        adamw_eps: AdamW's epsilon.

    Raises:
        ValueError: A group marked ``use_muon`` with a parameter that is not 2-D, or no parameter at all.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str | None = None,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_weight_decay: float = 1e-2,
        adamw_eps: float = 1e-8,
    ) -> None:
        muon_groups: list[dict[str, Any]] = []
        adamw_groups: list[dict[str, Any]] = []
        for group in _split(params):
            (muon_groups if group[USE_MUON] else adamw_groups).append(group)
        for group in muon_groups:
            shapes = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
            if shapes:
                raise ValueError(
                    f"MuonWithAdamW: a param group marked use_muon holds parameters of shapes {shapes}; Muon steps "
                    "2-D parameters only. Flatten convolution weights to 2-D (a parametrization) or mark the group "
                    "use_muon=False."
                )
        if not muon_groups and not adamw_groups:
            raise ValueError("MuonWithAdamW: got no parameters.")
        placeholder = torch.nn.Parameter(torch.zeros(2, 2))  # an empty side: an optimizer must hold a parameter
        self.muon = torch.optim.Muon(
            muon_groups or [{"params": [placeholder], USE_MUON: True}],
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            adjust_lr_fn=adjust_lr_fn,
        )
        self.adamw = torch.optim.AdamW(
            adamw_groups or [{"params": [placeholder], USE_MUON: False}],
            lr=adamw_lr,
            betas=adamw_betas,
            weight_decay=adamw_weight_decay,
            eps=adamw_eps,
        )
        self._sides = [side for side, groups in ((self.muon, muon_groups), (self.adamw, adamw_groups)) if groups]
        defaults = {"lr": lr, "weight_decay": weight_decay, "adamw_lr": adamw_lr}
        # torch's Optimizer.__init__ sets up hooks and state; the groups are then the two sides' own dicts.
        super().__init__([placeholder], defaults)
        self._bound = True
        self._bind([group for side in self._sides for group in side.param_groups], self.state)

    def _bind(self, groups: list[dict[str, Any]], state: Any) -> None:
        """One ``param_groups`` list (the sides' own dicts, Muon's first) and one ``state`` shared with both sides."""
        self.param_groups = groups
        self.state = state
        for side in self._sides:
            side.param_groups = [group for group in groups if group[USE_MUON] == (side is self.muon)]
            side.state = state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the side its ``use_muon`` key (or its parameters' shapes) sends it to."""
        if "_bound" not in self.__dict__:  # torch's Optimizer.__init__ adds its placeholder group
            super().add_param_group(param_group)
            return
        (group,) = _split([param_group])
        side = self.muon if group[USE_MUON] else self.adamw
        side.add_param_group(group)
        if side not in self._sides:
            self._sides.append(side)
        self.param_groups.append(side.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, and bind both sides to the loaded groups and state."""
        super().load_state_dict(state_dict)
        self._bind(self.param_groups, self.state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate ``closure`` (if any) once, then take Muon's step and AdamW's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for side in self._sides:
            side.step()
        return loss


def _split(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Param groups, each with a ``use_muon`` key: a group without one, or bare parameters, split by ``ndim == 2``."""
    items = list(params)
    if not items:
        return []
    groups = [item if isinstance(item, dict) else {"params": [item]} for item in items]
    if not isinstance(items[0], dict):
        groups = [{"params": [p for g in groups for p in g["params"]]}]
    out = []
    for group in groups:
        tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if USE_MUON in group:
            out.append({**group, "params": tensors, USE_MUON: bool(group[USE_MUON])})
            continue
        for flag in (True, False):
            chosen = [p for p in tensors if (p.ndim == 2) == flag]
            if chosen:
                out.append({**group, "params": chosen, USE_MUON: flag})
    return out
