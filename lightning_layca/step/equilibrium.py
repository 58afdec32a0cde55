"""Equilibrium rates: the angle per step a base optimizer turns a layer at equilibrium with weight decay.

With weight decay, the norm of a scale-invariant layer settles where decay's shrinking balances the growth from updates
orthogonal to the weights, and the angle each step then turns the layer depends only on the optimizer's
hyperparameters (Kosson et al., "Rotational Equilibrium", 2024). ``rotation_rate="equilibrium"`` rotates every layer
by that angle: one formula per optimizer, of a param group (:func:`sgd_equilibrium`, :func:`adamw_equilibrium`,
:func:`muon_equilibrium`, :func:`muon_adamw_equilibrium`), each raising ``ValueError`` where the group has no
equilibrium. :data:`lightning_layca.step.families.FAMILIES` says which optimizer takes which, and
:func:`lightning_layca.step.families.equilibrium_rate` looks it up.

Example:
    >>> round(sgd_equilibrium({"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "dampening": 0}), 6)
    0.007255
"""

from __future__ import annotations

import math
from typing import Any

from lightning_layca.argument_types import EQUILIBRIUM
from lightning_layca.muon import USE_MUON

__all__ = [
    "adamw_equilibrium",
    "muon_adamw_equilibrium",
    "muon_correlation",
    "muon_equilibrium",
    "polar_correlation_terms",
    "sgd_equilibrium",
]


def _weight_decay(group: dict[str, Any]) -> tuple[float, float]:
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if not wd > 0:
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' needs weight decay: a param group holding layers has "
            f"weight_decay={wd} (without decay the norm grows forever and there is no equilibrium). Set "
            "weight_decay > 0 on that group, or give the rotation rate as a number."
        )
    return lr, wd


def sgd_equilibrium(group: dict[str, Any]) -> float:
    """SGD with momentum ``mu`` (no dampening): ``sqrt(2 * lr * wd / (1 + mu))``."""
    lr, wd = _weight_decay(group)
    if float(group.get("dampening", 0.0)) != 0:
        raise ValueError(
            f"Layca: rotation_rate='{EQUILIBRIUM}' covers SGD without dampening; got dampening={group['dampening']}."
        )
    return math.sqrt(2 * lr * wd / (1 + float(group.get("momentum", 0.0))))


def adamw_equilibrium(group: dict[str, Any]) -> float:
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


def muon_equilibrium(group: dict[str, Any]) -> float:
    """Muon (decoupled decay at the group's lr, a direction of fixed norm): ``sqrt(2 * lr * wd / K)``.

    Its step is ``w <- (1 - lr * wd) w - lr' O`` with ``O`` the orthogonalised direction (a fixed norm) and ``lr'`` the
    lr adjusted to the layer's shape; at equilibrium, decay's ``2 * lr * wd * ||w||^2`` per step balances the growth
    ``lr'^2 ||O||^2 K``, so the angle ``lr' ||O|| / ||w||`` does not depend on the adjustment (which sets the
    equilibrium norm). ``K`` counts how the orthogonalised directions of consecutive steps add up, which is less than
    their momentum buffers do: orthogonalising decorrelates them, by an amount set by the matrices' aspect ratio.
    ``K`` is the :func:`muon_correlation` of its momentum, with the mean :func:`polar_correlation_terms` of the
    group's matrices and the decay ``1 - lr * wd``. Against a simulated Muon it holds within 3 % at momentum 0.9 (and
    without momentum) for aspect ratios from 1/4 to 1 (see the docs).
    """
    lr, wd = _weight_decay(group)
    momentum = float(group.get("momentum", 0.0))
    if not 0 <= momentum < 1:
        raise ValueError(f"Layca: rotation_rate='{EQUILIBRIUM}' covers Muon with momentum in [0, 1); got {momentum}.")
    each = [polar_correlation_terms(*p.shape) for p in group["params"] if p.ndim == 2] or [(1.0, 0.0, 0.0)]
    h1, h3, h5 = (sum(t[i] for t in each) / len(each) for i in range(3))
    nesterov = bool(group.get("nesterov", False))
    return math.sqrt(2 * lr * wd / muon_correlation(momentum, nesterov, (h1, h3, h5), 1 - lr * wd))


def muon_adamw_equilibrium(group: dict[str, Any]) -> float:
    """:class:`~lightning_layca.muon.MuonWithAdamW`: :func:`muon_equilibrium` for its Muon groups, else AdamW's."""
    return (muon_equilibrium if group[USE_MUON] else adamw_equilibrium)(group)
