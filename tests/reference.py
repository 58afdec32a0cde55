"""A per-tensor float64 reference of the Layca step, written straight from the formulas of DESIGN.md section 1.

It shares no code with the package: multipliers of the paper's depth schedule are recomputed here, and every
quantity is formed explicitly (projection, rounding-floor rule, normalisation, re-projection) in float64. The
rounding floor is the documented one: a layer whose tangential step is at most ``4 * u * (||w|| + ||D||)``, with ``u``
the unit roundoff of the parameters' dtype, does not move. Rates are ``rotation_rate * m_l * lr_g / lr_ref`` with
``lr_ref`` the largest learning rate of the groups at the start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

FLOOR_FACTOR = 4.0


def depth_decay_multipliers(alpha: float, n_layers: int) -> list[float]:
    """The paper's alpha schedule, written out independently of lightning_layca.schedules."""
    if n_layers == 1:
        return [1.0]
    out = []
    for i in range(n_layers):
        if alpha > 0:
            out.append(math.pow(1 - alpha, 5 * (n_layers - 1 - i) / (n_layers - 1)))
        else:
            out.append(math.pow(1 + alpha, 5 * i / (n_layers - 1)))
    return out


def layca_update(
    w: torch.Tensor, w_base: torch.Tensor, rho: float, initial_norm: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Return the Layca weights for one layer, given its weights before (``w``) and after (``w_base``) the base step.

    ``dtype`` is the dtype the parameters are trained in (default: ``w``'s), which sets the rounding floor.
    """
    u = torch.finfo(dtype or w.dtype).eps / 2
    w = w.double().flatten()
    step = w_base.double().flatten() - w
    if not torch.isfinite(step).all():
        return w
    tangential = step - (torch.dot(step, w) / torch.dot(w, w)) * w
    floor = FLOOR_FACTOR * u * (torch.linalg.vector_norm(w) + torch.linalg.vector_norm(step))
    if torch.linalg.vector_norm(tangential) <= floor:
        return w
    moved = w + rho * (torch.linalg.vector_norm(w) / torch.linalg.vector_norm(tangential)) * tangential
    return moved * (initial_norm / torch.linalg.vector_norm(moved))


class ReferenceLayca:
    """Float64 Layca around a base optimizer, one tensor at a time.

    Args:
        base: The base optimizer (over float64 parameters).
        layers: The controlled parameters, in depth order.
        rotation_rate: Base rate.
        multipliers: Per-layer multipliers, or a callable ``(step) -> multipliers``.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        layers: Sequence[torch.Tensor],
        rotation_rate: float,
        multipliers: Sequence[float] | Callable[[int], Sequence[float]],
    ) -> None:
        self.base = base
        self.layers = list(layers)
        self.rotation_rate = rotation_rate
        self.multipliers = multipliers
        self.initial_norms = [float(torch.linalg.vector_norm(p.detach().double())) for p in self.layers]
        self.reference_lr = max(group["lr"] for group in base.param_groups)
        self.steps = 0

    def rates(self) -> list[float]:
        m = self.multipliers(self.steps) if callable(self.multipliers) else self.multipliers
        rates = []
        for p, mult in zip(self.layers, m, strict=True):
            g = next(i for i, group in enumerate(self.base.param_groups) if any(q is p for q in group["params"]))
            rates.append(self.rotation_rate * mult * self.base.param_groups[g]["lr"] / self.reference_lr)
        return rates

    @torch.no_grad()
    def step(self) -> None:
        rates = self.rates()
        before = [p.detach().clone() for p in self.layers]
        self.base.step()
        for p, w, rho, n0 in zip(self.layers, before, rates, self.initial_norms, strict=True):
            p.copy_(layca_update(w, p, rho, n0).view_as(p))
        self.steps += 1


def layca_unit_update(
    w: torch.Tensor, w_base: torch.Tensor, rho: float, initial_norms: Sequence[float], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-unit Layca: :func:`layca_update` applied to every row (slice along dim 0) with that row's initial norm."""
    rows = [
        layca_update(w[k], w_base[k], rho, n0, dtype or w.dtype).view_as(w[k]) for k, n0 in enumerate(initial_norms)
    ]
    return torch.stack(rows)
