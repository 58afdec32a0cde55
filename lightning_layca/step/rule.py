"""The rule of the Layca step: per-layer (per-unit) sums in, coefficients ``k1, k2`` of the update out.

With ``w`` a layer's weights before the wrapped optimizer's step and ``p = fl(w + D)`` after it, Layca replaces ``p``
by ``w' = k1 * w + k2 * D`` with per-layer (per-unit) scalars ``k1, k2``. Everything that decides what a step does
lives in :func:`coefficients`, which every implementation calls (the eager step of :mod:`lightning_layca.step.eager`,
the compiled kernels of :mod:`lightning_layca.step.kernels`):

* ``t = ||D_perp||`` is the norm of the step's tangential part; the step is rescaled to ``rho * ||w||`` along it and
  the result is put back on the sphere of the initial norm ``n0``, so the layer turns by exactly ``atan(rho)``.
* **The rounding floor.** ``D`` is read back as ``fl(w + D) - w``. Rounding ``w + D`` to the parameter dtype moves
  every element by at most ``u * |w_i + D_i|`` (``u`` the unit roundoff: ``2**-24`` for float32, ``2**-8`` for
  bfloat16, ``2**-11`` for float16, ``2**-53`` for float64), an error vector of norm at most
  ``u * (||w|| + ||D||)``, and so is the tangential part it can make up for a purely radial step (every
  implementation forms ``D`` and its sums in float64, which adds nothing at that scale). :data:`ROUNDING_FLOOR_FACTOR`
  times ``u * (||w|| + ||D||)`` is the floor, with a margin of 4. A layer whose measured ``t`` does not exceed it does
  not move at all (a zero gradient under weight decay gives a purely radial ``D``: scaling its rounding noise up to a
  full step would turn the layer by ``atan(rho)`` every step along a random direction).
* A layer whose sums are not finite (a NaN or inf gradient, or a sum that overflowed) does not move either.
* ``q = n0 / hypot(1, rho)`` and ``h = rho * q`` are formed without squaring ``rho``, so no finite rate overflows.

Example:
    >>> f64 = dict(dtype=torch.float64)
    >>> sums = torch.tensor([0.0, 1.0, 1e-20], **f64)  # a tangential step far below float32 rounding of w + D
    >>> k1, k2, _ = coefficients(*sums.unsqueeze(1), *torch.ones(3, 1, **f64), 2.0**-24)
    >>> float(k1), float(k2)  # the layer does not move
    (1.0, 0.0)
"""

from __future__ import annotations

import torch

__all__ = [
    "LOW_PRECISION",
    "NEAR_FLOOR_FACTOR",
    "ROUNDING_FLOOR_FACTOR",
    "SINGLE_PRECISION_CANCELLATION",
    "coefficients",
    "combine",
    "single_precision_suffices",
    "unit_roundoff",
    "update_dtype",
]

ROUNDING_FLOOR_FACTOR = 4.0
"""A layer moves only if ``||D_perp|| > ROUNDING_FLOOR_FACTOR * u * (||w|| + ||D||)`` (see the module docstring)."""

NEAR_FLOOR_FACTOR = 100.0
"""A mostly tangential step below ``NEAR_FLOOR_FACTOR`` times the floor has a direction that rounding blurs by more
than about 1 %: Layca warns once for such a layer. The comparison is made at the reference learning rate (the step is
divided by the relative learning rate first): when a scheduler anneals the learning rate, the base step and Layca's
step shrink together, and the rounding error of the rotation stays as small in absolute terms as it was."""

SINGLE_PRECISION_CANCELLATION = 2.0
"""The update ``k1 * w + k2 * D`` of a float32 layer may be computed in float32 when its two terms are together at
most this many times the result's norm: ``|k1| ||w|| + |k2| ||D|| <= 2 n0`` (see :func:`single_precision_suffices`)."""

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Parameter dtypes whose update is computed in float32 and rounded once."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """Return the unit roundoff of a floating-point dtype: half the distance from 1.0 to the next number.

    Example:
        >>> unit_roundoff(torch.float32) == 2.0**-24, unit_roundoff(torch.bfloat16) == 2.0**-8
        (True, True)
    """
    return float(torch.finfo(dtype).eps) / 2


def coefficients(
    radial: torch.Tensor,
    weight_sq: torch.Tensor,
    step_sq: torch.Tensor,
    rates: torch.Tensor,
    relative_lrs: torch.Tensor,
    initial_norms: torch.Tensor,
    roundoff: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn per-layer sums into the coefficients of ``w' = k1 * w + k2 * D``; the single rule of every Layca path.

    All arguments are 1-D float64 tensors with one entry per layer (or per unit), on one device: the sums of
    :func:`lightning_layca.sums.float64_sums` of ``(w + D, w)`` with ``difference=True``, or their traced form in a
    compiled kernel.

    Args:
        radial: ``a = <D, w>``.
        weight_sq: ``b = <w, w>``.
        step_sq: ``c = <D, D>``.
        rates: ``rho`` of every layer.
        relative_lrs: ``lr_g(t) / lr_ref`` of every layer, for the near-floor test only.
        initial_norms: ``n0`` of every layer.
        roundoff: The unit roundoff of the parameters' dtype (:func:`unit_roundoff`).

    Returns:
        ``k1``, ``k2`` (float64) and ``near_floor`` (bool): whether the step is mostly tangential and yet, scaled to
        the reference learning rate, within :data:`NEAR_FLOOR_FACTOR` times the rounding floor, so that rounding
        blurs its direction. A layer that does not move gets ``k1 = 1, k2 = 0``.

    Example:
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> k1, k2, near = coefficients(0 * one, one, one, one, one, one, 2.0**-24)
        >>> [round(float(k1), 6), round(float(k2), 6), bool(near)]  # a unit step orthogonal to a unit w, rho = 1
        [0.707107, 0.707107, False]
    """
    tangential = (step_sq - radial.square() / weight_sq).clamp_min(0.0).sqrt()
    norm_w = weight_sq.sqrt()
    floor = ROUNDING_FLOOR_FACTOR * roundoff * (norm_w + step_sq.sqrt())
    finite = torch.isfinite(radial) & torch.isfinite(weight_sq) & torch.isfinite(step_sq)
    moves = finite & (tangential > floor) & (weight_sq > 0)
    hyp = torch.hypot(torch.ones_like(rates), rates)
    q = initial_norms / hyp
    h = initial_norms * (rates / hyp)
    safe_tangential = torch.where(moves, tangential, 1.0)
    safe_weight_sq = torch.where(moves, weight_sq, 1.0)
    k2 = torch.where(moves, h / safe_tangential, 0.0)
    k1 = torch.where(moves, q / safe_weight_sq.sqrt() - k2 * torch.where(moves, radial, 0.0) / safe_weight_sq, 1.0)
    at_reference = tangential / torch.where(relative_lrs > 0, relative_lrs, 1.0)
    near_floor = (
        finite & (step_sq > 0) & (2 * tangential.square() > step_sq) & (at_reference < NEAR_FLOOR_FACTOR * floor)
    )
    return k1, k2, near_floor


def update_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update ``k1 * w + k2 * D`` is computed in for layers of ``dtype``, before one rounding.

    Float64 for float32 (and float64) layers: ``k2 * D`` of a mostly radial step cancels against ``k1 * w``, and in
    float32 that cancellation would lose the digits of the tangential part. Float32 for bfloat16 and float16 layers,
    that much more precise than the result.
    """
    return torch.float32 if dtype in LOW_PRECISION else torch.float64


def single_precision_suffices(
    k1: torch.Tensor, k2: torch.Tensor, weight_sq: torch.Tensor, step_sq: torch.Tensor, initial_norms: torch.Tensor
) -> torch.Tensor:
    """Per layer (unit): whether ``k1 * w + k2 * D`` may be formed in the layers' own precision rather than wider.

    Computed in float32 from ``w`` and ``fl(w + D)``, every element of the update is off by at most a few roundings
    of its two terms: with ``|k1| ||w|| + |k2| ||D|| <= SINGLE_PRECISION_CANCELLATION * n0`` the error vector's norm
    is at most ``(2 * 2 + 1) u n0`` (``D = fl(w + D) - w`` exact or off by ``u |D_i|``, ``k2 * D`` and the sum
    rounded once each), against ``u n0 / 2`` for the update formed in float64 and rounded once: the layer's norm and
    its angle are still exact to a few float32 ulps. Where the terms cancel (a mostly radial step scaled up, ``k2 *
    D`` and ``k1 * w`` large and opposite) float32 would lose the tangential digits, and the update is formed in
    float64 (:func:`update_dtype`). Typical training steps (mostly tangential, ``rho`` well below 1) pass.

    Args:
        k1: From :func:`coefficients`.
        k2: Likewise.
        weight_sq: ``b = <w, w>``.
        step_sq: ``c = <D, D>``.
        initial_norms: ``n0``.
    """
    terms = k1.abs() * weight_sq.sqrt() + k2.abs() * step_sq.sqrt()
    return torch.isfinite(terms) & (terms <= SINGLE_PRECISION_CANCELLATION * initial_norms)


def combine(
    weights: torch.Tensor, step: torch.Tensor, k1: torch.Tensor | float, k2: torch.Tensor | float
) -> torch.Tensor:
    """THE update: ``k1 * w + k2 * D`` for rows of ``(w, D)``, one coefficient pair per row (``(rows, 1)``).

    A row that does not move (``k2 = 0``) gives exactly ``k1 * w = w``: its step, NaN or not, is replaced by an exact
    zero (a select on the row's coefficient, which Inductor vectorises; a test of every element for NaN it does not).
    The eager step calls it block by block, the compiled kernels trace it. ``step`` may be overwritten. With host
    numbers ``k1, k2`` (one pair for all of ``step``: the eager float32 update of a layer on CPU) the zero is decided
    on the host and the update takes two in-place passes.
    """
    if isinstance(k1, float) and isinstance(k2, float):
        return (step.zero_() if k2 == 0 else step.mul_(k2)).add_(weights, alpha=k1)
    assert isinstance(k1, torch.Tensor) and isinstance(k2, torch.Tensor)  # both host numbers, or both tensors
    return step.masked_fill_(k2 == 0, 0.0).mul_(k2).addcmul_(weights, k1)
