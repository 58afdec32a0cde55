"""The bodies of the compiled kernels: what one call does to one layer seen as a matrix (traced by Inductor).

:func:`rotate_rows` is the part every kernel shares: the sums of :func:`lightning_layca.sums.matrix_sums` per row
(the units with ``granularity="unit"``, over the whole matrix for the layer otherwise), the rule
:func:`lightning_layca.step.rule.coefficients`, and the update ``p = k1 * w + k2 * D``. :func:`after_step` is the kernel
that works after the base optimizer's step, from a snapshot; the kernels that take a base optimizer's step themselves
are in :mod:`lightning_layca.step.base_kernels`, one per form of that step. They are compiled by
:mod:`lightning_layca.step.compiled`, which calls :func:`after_step` and the sharded halves; the base step's kernels are
called by :mod:`lightning_layca.step.base_compiled`.
"""

from __future__ import annotations

import torch

from lightning_layca.step.rule import coefficients, combine, single_precision_suffices, unit_roundoff
from lightning_layca.sums import matrix_sums

__all__ = ["after_step", "layer_sums", "rotate_rows", "sharded_sums", "sharded_update", "update_rows"]


def rotate_rows(
    params: torch.Tensor,
    exact: tuple[torch.Tensor, torch.Tensor],
    low: tuple[torch.Tensor, torch.Tensor],
    scalars: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The part every one-call kernel shares: :func:`~lightning_layca.sums.matrix_sums`, the rule, the update.

    On CPU a float32 layer's update is formed in float32 where that is exact enough (see :func:`update_rows`); the
    layer is otherwise left for the float64 update, which the fourth row of the result asks for.

    Args:
        params: The layer's dense 2-D view; overwritten with ``k1 * w + k2 * D``.
        exact: ``(w, D)`` in float64: the sums' operands, and the float64 update's.
        low: ``(w, D)`` in float32: the update's operands for a bfloat16 or float16 layer, and for a float32 layer on
            CPU where single precision suffices (unused, and removed from the compiled code, otherwise).
        scalars: The layer's ``(rate, relative_lr, initial_norms, near_floor)``, as the kernel was given them (see
            :func:`after_step`).

    Returns:
        ``(a, b, c)``, float64, for the layer (shape ``(3, 1)``) or per unit (``(3, rows)``); a float32 layer on CPU
        has a fourth row, 1 where its update was formed, 0 where it was left (see :func:`update_rows`).
    """
    sums = layer_sums(exact, scalars[2])
    return update_rows(params, exact, low, sums, scalars, single=params.device.type == "cpu")


def layer_sums(
    exact: tuple[torch.Tensor, torch.Tensor], initial_norms: torch.Tensor, lanes: bool = True
) -> torch.Tensor:
    """``(a, b, c)`` of ``exact = (w, D)`` (float64), as ``(3, 1)`` for the layer or ``(3, rows)`` per unit.

    :func:`~lightning_layca.sums.matrix_sums`: summed over the rows for a layer (``initial_norms`` 0-dim; its lanes
    side by side unless ``lanes`` is false), per row (unit) otherwise.
    """
    weights, step = exact
    return matrix_sums(step, weights, per_unit=initial_norms.dim() != 0, lanes=lanes)


def update_rows(
    params: torch.Tensor,
    exact: tuple[torch.Tensor, torch.Tensor],
    low: tuple[torch.Tensor, torch.Tensor],
    sums: torch.Tensor,
    scalars: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    single: bool = False,
) -> torch.Tensor:
    """The rule and the update of :func:`rotate_rows`, from the layer's (unit's) full sums ``(3, 1)`` or ``(3, rows)``.

    With ``single`` (a constant of the compiled code) a float32 layer's update is formed in float32 where
    :func:`~lightning_layca.step.rule.single_precision_suffices` says so for every unit, the rule of the eager step on
    CPU; otherwise the layer is left as it is, for :func:`update_rows` without ``single`` (the update halves, which
    read the state this call wrote) to form its update in float64. Without ``single`` (and
    on CUDA) the update of a float32 layer is formed in float64.

    Returns:
        ``sums``; with ``single`` for a float32 layer, a fourth row: 1 where the update was formed, 0 where the layer
        was left.
    """
    rate, relative_lr, initial_norms, near_floor = scalars
    weights, step = exact
    radial, weight_sq, step_sq = sums.unbind(0)
    units = radial.shape[0]
    # A constant of the compiled code (one compilation per dtype anyway), not an argument converted at every call.
    roundoff = unit_roundoff(params.dtype)
    norms = initial_norms.reshape(units)
    k1, k2, near = coefficients(
        radial, weight_sq, step_sq, rate.expand(units), relative_lr.expand(units), norms, roundoff
    )
    near_floor.copy_(near_floor | near.any())
    # Stacked into one buffer (see `options` in _compiled): the update pass then loads two numbers per unit instead
    # of recomputing the coefficients' square roots and divisions for every vector of elements.
    k = torch.stack([k1, k2])
    if params.dtype != torch.float32:  # bfloat16/float16: float32 is that much more precise than the result
        weights, step = low
        params.copy_(combine(weights, step, k[0].float().unsqueeze(1), k[1].float().unsqueeze(1)))
        return sums
    if single:
        # Checked for the whole layer (one branch per layer): where k2 * D cancels against k1 * w, float32 would lose
        # the digits of the tangential part, and the layer is left for the float64 update.
        formed = single_precision_suffices(k1, k2, weight_sq, step_sq, norms).all()
        weights, step = low
        k = k.float()
        params.copy_(torch.where(formed, combine(weights, step, k[0].unsqueeze(1), k[1].unsqueeze(1)), params))
        return torch.cat([sums, formed.to(sums.dtype).expand(1, units)])
    # float32 layers: the update in float64, where k2 * D of a mostly radial step cancels against k1 * w without
    # losing float32 digits.
    params.copy_(combine(weights, step, k[0].unsqueeze(1), k[1].unsqueeze(1)))
    return sums


def after_step(
    params: torch.Tensor,
    previous: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
) -> torch.Tensor:
    """The Layca step of one layer seen as a matrix, after the wrapped optimizer's step (traced and compiled).

    Args:
        params: ``p = fl(w + D)``, a dense 2-D view of the layer; overwritten with ``k1 * w + k2 * D``.
        previous: ``w``, the same view of the snapshot.
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``: 0-dim for the layer (``granularity="layer"``), or one per row (``"unit"``; the rows are
            then the units), float64.
        near_floor: The layer's near-floor flag (0-dim bool), or-ed in place with this step's (any unit's).

    Returns:
        ``(a, b, c)``, float64, for the layer (shape ``(3, 1)``) or per unit (``(3, rows)``).
    """
    weights = previous.double()
    exact = weights, params.double() - weights
    low = previous.float(), params.float() - previous.float()
    return rotate_rows(params, exact, low, (rate, relative_lr, initial_norms, near_floor))


def sharded_sums(params: torch.Tensor, previous: torch.Tensor, initial_norms: torch.Tensor) -> torch.Tensor:
    """The first half of :func:`after_step` for a process's shard of a layer: its partial sums ``(a, b, c)`` only.

    ``initial_norms`` tells the granularity (0-dim: the layer's sums, ``(3, 1)``; one per row: per unit,
    ``(3, rows)``). The full sums come from the sums of every process through the seam
    (:func:`lightning_layca.distributed.reduce_sums`), then :func:`sharded_update` takes the step.
    """
    weights = previous.double()
    return layer_sums((weights, params.double() - weights), initial_norms)


def sharded_update(
    params: torch.Tensor,
    previous: torch.Tensor,
    sums: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
    single: bool = False,
) -> torch.Tensor:
    """The second half of :func:`after_step` for a process's shard: the rule and the update from the full ``sums``.

    ``single``: as for :func:`update_rows` (the sums returned with a fourth row).
    """
    weights = previous.double()
    exact = weights, params.double() - weights
    low = previous.float(), params.float() - previous.float()
    return update_rows(params, exact, low, sums, (rate, relative_lr, initial_norms, near_floor), single)
