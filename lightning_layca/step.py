"""The arithmetic of one Layca step: per-layer sums, the rule that turns them into coefficients, and the update.

With ``w`` a layer's weights before the wrapped optimizer's step and ``p = fl(w + D)`` after it, Layca replaces ``p``
by ``w' = k1 * w + k2 * X``, where ``X`` is the step as the implementation holds it (``D`` itself, or ``D`` with its
radial part already removed) and ``k1, k2`` are per-layer scalars. Everything that decides what a step does lives in
:func:`coefficients`, which every implementation calls:

* ``t = ||D_perp||`` is the norm of the step's tangential part; the step is rescaled to ``rho * ||w||`` along it and
  the result is put back on the sphere of the initial norm ``n0``, so the layer turns by exactly ``atan(rho)``.
* **The rounding floor.** ``D`` is read back as ``fl(w + D) - w``. Rounding ``w + D`` to the parameter dtype moves
  every element by at most ``u * |w_i + D_i|`` (``u`` the unit roundoff: ``2**-24`` for float32, ``2**-8`` for
  bfloat16, ``2**-11`` for float16, ``2**-53`` for float64), an error vector of norm at most
  ``u * (||w|| + ||D||)``. Forming ``D = p - w`` in the parameter dtype adds at most ``u * ||D||``, and an explicit
  projection in that dtype at most ``2 * u * ||D||`` more to the tangential part. The tangential part of a step whose
  true tangential part is zero is therefore at most ``4 * u * (||w|| + ||D||)``: :data:`ROUNDING_FLOOR_FACTOR` times
  ``u * (||w|| + ||D||)`` is the floor. A layer whose measured ``t`` does not exceed it does not move at all (a zero
  gradient under weight decay gives a purely radial ``D``: scaling its rounding noise up to a full step would turn
  the layer by ``atan(rho)`` every step along a random direction).
* A layer whose sums are not finite (a NaN or inf gradient, or a sum that overflowed) does not move either.
* ``q = n0 / hypot(1, rho)`` and ``h = rho * q`` are formed without squaring ``rho``, so no finite rate overflows.

Example:
    >>> w = torch.tensor([[3.0, 4.0]])
    >>> p = w + torch.tensor([[0.0, 0.0]])  # no step at all: the layer stays put
    >>> previous = [w.clone()]
    >>> f64 = dict(dtype=torch.float64)
    >>> near, _ = rotate_eager([p], previous, torch.tensor([0.1], **f64), torch.tensor([1.0], **f64),
    ...                     torch.tensor([5.0], **f64))
    >>> p.tolist(), near.tolist()
    ([[3.0, 4.0]], [False])
"""

from __future__ import annotations

import torch

from lightning_layca.rotation import float64_sums, inner_products, unit_view

__all__ = [
    "NEAR_FLOOR_FACTOR",
    "ROUNDING_FLOOR_FACTOR",
    "apply_coefficients",
    "coefficients",
    "rotate_eager",
    "rotate_eager_units",
    "step_sums",
    "unit_counts",
    "unit_roundoff",
    "unit_rows",
]

ROUNDING_FLOOR_FACTOR = 4.0
"""A layer moves only if ``||D_perp|| > ROUNDING_FLOOR_FACTOR * u * (||w|| + ||D||)`` (see the module docstring)."""

NEAR_FLOOR_FACTOR = 100.0
"""A mostly tangential step below ``NEAR_FLOOR_FACTOR`` times the floor has a direction that rounding blurs by more
than about 1 %: Layca warns once for such a layer. The comparison is made at the reference learning rate (the step is
divided by the relative learning rate first): when a scheduler anneals the learning rate, the base step and Layca's
step shrink together, and the rounding error of the rotation stays as small in absolute terms as it was."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    held_sq: torch.Tensor,
    step_sq: torch.Tensor,
    rates: torch.Tensor,
    relative_lrs: torch.Tensor,
    initial_norms: torch.Tensor,
    roundoff: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn per-layer sums into the coefficients of ``w' = k1 * w + k2 * X``; the single rule of every Layca path.

    All arguments are 1-D float64 tensors with one entry per layer (or per unit), on one device.

    Args:
        radial: ``<X, w>``, where ``X`` is the step as the caller holds it.
        weight_sq: ``<w, w>``.
        held_sq: ``<X, X>``.
        step_sq: ``<D, D>``, the squared norm of the whole base step (equal to ``held_sq`` when ``X = D``).
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
        >>> k1, k2, near = coefficients(0 * one, one, one, one, one, one, one, 2.0**-24)
        >>> [round(float(k1), 6), round(float(k2), 6), bool(near)]  # a unit step orthogonal to a unit w, rho = 1
        [0.707107, 0.707107, False]
    """
    tangential = (held_sq - radial.square() / weight_sq).clamp_min(0.0).sqrt()
    norm_w = weight_sq.sqrt()
    floor = ROUNDING_FLOOR_FACTOR * roundoff * (norm_w + step_sq.sqrt())
    finite = torch.isfinite(radial) & torch.isfinite(weight_sq) & torch.isfinite(held_sq) & torch.isfinite(step_sq)
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


def _as_scalars(values: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return list(values.to(dtype).unbind())


def rotate_eager(
    params: list[torch.Tensor],
    previous: list[torch.Tensor],
    rates: torch.Tensor,
    relative_lrs: torch.Tensor,
    initial_norms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn the base step of layers of one device and dtype into a Layca step, in place, with multi-tensor ops.

    On entry ``params`` hold ``w + D`` and ``previous`` holds ``w``. The radial part of ``D`` is removed explicitly
    (``||D||^2 - <D, w>^2 / ||w||^2`` would cancel catastrophically for a mostly radial step, such as weight decay's,
    in float32), and what rounding leaves of it is measured by one more dot product and taken out through ``k1``
    ("twice is enough"). Float16/bfloat16 layers are computed per tensor in float32 and rounded once at the end.
    Reductions accumulate in float32 (float64 for float64 layers): a finite step whose float32 sum of squares
    overflows (``||D||`` above about ``1.8e19``) leaves its layer unmoved; on CPU such layers are reported.

    Args:
        params: The layers (detached), holding ``w + D``.
        previous: Their weights before the base step.
        rates: ``rho`` per layer, float64, on the layers' device.
        relative_lrs: ``lr_g(t) / lr_ref`` per layer, float64, on the layers' device.
        initial_norms: ``n0`` per layer, float64, on the layers' device.

    Returns:
        The ``near_floor`` flags of :func:`coefficients`, one per layer, and on CPU, when some sum was not finite,
        ``overflowed``: the layers whose step was finite but too large for float32 sums (else ``None``).
    """
    dtype = params[0].dtype
    roundoff = unit_roundoff(dtype)
    if dtype in _LOW_PRECISION:
        work = [x.float() for x in previous]
        steps = [p.float().sub_(x) for p, x in zip(params, work, strict=True)]
    else:
        work = previous
        steps = params
        torch._foreach_sub_(steps, work)  # params now hold D
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norm_w = torch.stack(torch._foreach_norm(work, 2))
    weight_sq = norm_w.square()
    ratio = torch.stack(inner_products(steps, work, acc)) / weight_sq
    torch._foreach_addcmul_(steps, work, _as_scalars(-ratio, steps[0].dtype))
    radial = torch.stack(inner_products(steps, work, acc))
    held_sq = torch.stack(torch._foreach_norm(steps, 2)).square()
    step_sq = held_sq.double() + ratio.double().square() * weight_sq.double()
    k1, k2, near_floor = coefficients(
        radial.double(), weight_sq.double(), held_sq.double(), step_sq, rates, relative_lrs, initial_norms, roundoff
    )
    # A layer that does not move multiplies its step by 0, so the step must hold no NaN or inf. On CPU reading the
    # flags costs no synchronisation and the cleaning pass is skipped in the usual case of finite steps; elsewhere it
    # runs every step (one more read and write), since skipping it would need the flags on the host.
    overflowed = None
    if steps[0].device.type == "cpu" and not bool(torch.isfinite(held_sq).all()):
        overflowed = ~torch.isfinite(held_sq) & torch.stack([torch.isfinite(d).all() for d in steps])
    if dtype in _LOW_PRECISION or steps[0].device.type != "cpu" or overflowed is not None:
        for d in steps:
            torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
    if dtype in _LOW_PRECISION:
        for p, w, d, c1, c2 in zip(params, work, steps, k1.float().unbind(), k2.float().unbind(), strict=True):
            p.copy_(w.mul_(c1).add_(d.mul_(c2)))
    else:
        torch._foreach_mul_(steps, _as_scalars(k2, dtype))
        torch._foreach_addcmul_(steps, work, _as_scalars(k1, dtype))
    return near_floor, overflowed


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as ``(units, -1)``: one row per output unit (slice along dim 0); a tensor of rank < 2 is one unit.

    The result is a view of ``x`` where one exists (always for contiguous tensors).

    Example:
        >>> unit_rows(torch.zeros(4, 3, 2)).shape, unit_rows(torch.zeros(5)).shape
        (torch.Size([4, 6]), torch.Size([1, 5]))
    """
    return x.reshape(x.shape[0] if x.ndim >= 2 else 1, -1)


def unit_counts(params: list[torch.Tensor]) -> list[int]:
    """Return the number of units (rows of :func:`unit_rows`) of every tensor."""
    return [p.shape[0] if p.ndim >= 2 else 1 for p in params]


def rotate_eager_units(
    params: list[torch.Tensor],
    previous: list[torch.Tensor],
    rates: torch.Tensor,
    relative_lrs: torch.Tensor,
    initial_norms: torch.Tensor,
) -> torch.Tensor:
    """The Layca step per output unit: every row of every layer turns by ``atan(rho)`` and keeps its own norm.

    The same arithmetic as :func:`rotate_eager` (explicit projection, one more dot product for what rounding leaves
    of the radial part, the :func:`coefficients` rule), with row-wise reductions: a row whose step is non-finite or
    indistinguishable from rounding stays put while the other rows of its layer move. ``rates``, ``relative_lrs`` and
    ``initial_norms`` hold one entry per row, rows of all layers concatenated in order (:func:`unit_counts`).

    Returns:
        The ``near_floor`` flags of :func:`coefficients`, one per row.
    """
    dtype = params[0].dtype
    roundoff = unit_roundoff(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rows_w, rows_d = [], []
    for p, w in zip(params, previous, strict=True):
        rw = unit_rows(w).to(compute)
        rows_w.append(rw)
        rows_d.append(unit_rows(p).to(compute).sub_(rw))  # a view of the parameter when it can be one
    weight_sq = torch.cat([torch.linalg.vector_norm(rw, dim=1).square() for rw in rows_w])
    ratio = torch.cat([torch.einsum("ij,ij->i", rd, rw) for rd, rw in zip(rows_d, rows_w, strict=True)]) / weight_sq
    ratio = torch.where(weight_sq > 0, ratio, 0.0)
    for rd, rw, r in zip(rows_d, rows_w, ratio.split(unit_counts(params)), strict=True):
        rd.addcmul_(rw, r.unsqueeze(1), value=-1.0)
    radial = torch.cat([torch.einsum("ij,ij->i", rd, rw) for rd, rw in zip(rows_d, rows_w, strict=True)])
    held_sq = torch.cat([torch.linalg.vector_norm(rd, dim=1).square() for rd in rows_d])
    step_sq = held_sq.double() + ratio.double().square() * weight_sq.double()
    k1, k2, near_floor = coefficients(
        radial.double(), weight_sq.double(), held_sq.double(), step_sq, rates, relative_lrs, initial_norms, roundoff
    )
    counts = unit_counts(params)
    for p, rd, rw, c1, c2 in zip(
        params, rows_d, rows_w, k1.to(compute).split(counts), k2.to(compute).split(counts), strict=True
    ):
        torch.nan_to_num_(rd, nan=0.0, posinf=0.0, neginf=0.0)
        out = rd.mul_(c2.unsqueeze(1)).addcmul_(rw, c1.unsqueeze(1))
        if out.data_ptr() != p.data_ptr() or out.dtype != p.dtype:  # a copy (low precision, or no view possible)
            p.copy_(out.view_as(p))
    return near_floor


def step_sums(params: list[torch.Tensor], previous: list[torch.Tensor], per_unit: bool = False) -> torch.Tensor:
    """Return ``(a, b, c) = (<D, w>, <w, w>, <D, D>)`` of every layer (or unit), accumulated in float64.

    The form of the step that sums over parts: the sums of a layer split over processes are the sums of its parts'
    sums, so a rank computes them over its local shard and :func:`lightning_layca.distributed.full_sums` adds the
    ranks' parts. ``D = p - w`` is formed in float64, where the products of float32 (or lower) numbers are exact, so
    ``||D_perp||^2 = c - a^2 / b`` keeps the parameters' precision even for a mostly radial step. An empty shard
    contributes zeros. Large layers are converted in blocks of bounded size.

    Args:
        params: The layers (detached local shards), holding ``w + D``.
        previous: Their weights before the base step.
        per_unit: Sums per unit (rows of every layer seen as ``(units, -1)``, concatenated) rather than per layer.

    Returns:
        ``(layers, 3)`` or ``(units, 3)``, float64, on the layers' device.

    Example:
        >>> w = torch.tensor([[3.0, 4.0]])
        >>> step_sums([w + torch.tensor([[0.0, 1.0]])], [w]).tolist()
        [[4.0, 25.0, 1.0]]
    """
    return float64_sums(params, previous, per_unit, difference=True)[:, [0, 2, 1]]


def apply_coefficients(
    params: list[torch.Tensor],
    previous: list[torch.Tensor],
    k1: torch.Tensor,
    k2: torch.Tensor,
    per_unit: bool = False,
    finite: bool = False,
) -> None:
    """Write ``p = k1 * w + k2 * D`` (``D = p - w``) into every layer, in place: the update of the summed form.

    A layer (unit) that does not move (``k2 = 0``, ``k1 = 1``) ends exactly at ``w``: a non-finite step is replaced
    by zeros before it is multiplied. Float16/bfloat16 layers are computed in float32 and rounded once.

    Args:
        params: The layers (detached local shards), holding ``w + D``; overwritten.
        previous: Their weights before the base step.
        k1: Per layer (or per unit, rows concatenated), float64.
        k2: Likewise.
        per_unit: Whether ``k1``, ``k2`` hold one entry per unit.
        finite: Whether every step is known to be finite (the sums ``<D, D>`` are), which saves a pass.
    """
    dtype = params[0].dtype
    if not per_unit and dtype not in _LOW_PRECISION:  # multi-tensor ops, per-layer scalars kept on the device
        torch._foreach_sub_(params, previous)  # params now hold D
        if not finite:
            for d in params:
                torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
        torch._foreach_mul_(params, _as_scalars(k2, dtype))
        torch._foreach_addcmul_(params, previous, _as_scalars(k1, dtype))
        return
    compute = torch.float32 if dtype in _LOW_PRECISION else dtype
    counts = [unit_view(p).shape[0] for p in params] if per_unit else [1] * len(params)
    for p, w, c1, c2 in zip(params, previous, k1.to(compute).split(counts), k2.to(compute).split(counts), strict=True):
        rows_p = unit_view(p)
        if rows_p.numel() == 0:
            continue
        step = rows_p.to(compute).sub_(unit_view(w).to(compute))
        if not finite:
            torch.nan_to_num_(step, nan=0.0, posinf=0.0, neginf=0.0)
        out = step.mul_(c2.unsqueeze(1)).addcmul_(unit_view(w).to(compute), c1.unsqueeze(1))
        if out.data_ptr() != p.data_ptr() or out.dtype != p.dtype:  # a copy (low precision, or no view possible)
            p.copy_(out.view_as(p))
