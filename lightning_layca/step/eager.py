"""The eager Layca step: float64 sums, the rule, one multi-tensor update; the same code sharded or not.

On entry every layer holds ``p = fl(w + D)`` (the wrapped optimizer has stepped) and a snapshot holds ``w``:

1. :func:`lightning_layca.sums.float64_sums` gives ``(a, b, c) = (<D, w>, <w, w>, <D, D>)`` per layer (per unit with
   ``per_unit``), exact to float64 rounding;
2. under sharding the caller passes them through the seam (:func:`lightning_layca.distributed.reduce_sums`, one
   ``all_reduce`` for every layer of the step), unsharded the seam is the identity;
3. :func:`lightning_layca.step.rule.coefficients` turns them into ``k1, k2``;
4. :func:`update` writes ``p = k1 * w + k2 * D`` (:func:`lightning_layca.step.rule.combine`, in float64 for float32
   layers, as the compiled kernels compute it; in float32, in place, for a float32 CPU layer whose two terms do not
   cancel: :func:`lightning_layca.step.rule.single_precision_suffices`).

Example:
    >>> w = torch.tensor([[3.0, 4.0]])
    >>> p = w.clone()  # no step at all: the layer stays put
    >>> f64 = dict(dtype=torch.float64)
    >>> near = rotate_eager([p], [w], torch.tensor([0.1], **f64), torch.ones(1, **f64), torch.full((1,), 5.0, **f64))
    >>> p.tolist(), near.tolist()
    ([[3.0, 4.0]], [False])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_layca.step.rule import coefficients, combine, single_precision_suffices, unit_roundoff, update_dtype
from lightning_layca.sums import Scratch, as_rows, float64_sums, row_blocks, row_view, unit_counts

__all__ = ["rotate_eager", "step_sums", "update"]


def step_sums(params: Sequence[torch.Tensor], previous: Sequence[torch.Tensor], per_unit: bool) -> torch.Tensor:
    """``(a, b, c)`` of every layer (or unit) of a step: ``float64_sums(params, previous, difference=True)``."""
    return float64_sums(params, previous, per_unit, difference=True)


def rotate_eager(
    params: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    rates: torch.Tensor,
    relative_lrs: torch.Tensor,
    initial_norms: torch.Tensor,
    per_unit: bool = False,
    sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn the base step of layers of one device and dtype into a Layca step, in place.

    Args:
        params: The layers (detached; a process's local shards), holding ``w + D``.
        previous: Their weights before the base step.
        rates: ``rho`` per layer (per unit with ``per_unit``, rows of all layers concatenated), float64, on the
            layers' device.
        relative_lrs: ``lr_g(t) / lr_ref``, likewise.
        initial_norms: ``n0``, likewise.
        per_unit: Whether every unit (row of :func:`~lightning_layca.sums.row_view`) turns by itself.
        sums: The full sums of these layers (units) when the caller has them (sharded layers, through the seam);
            computed here otherwise.

    Returns:
        The ``near_floor`` flags of :func:`~lightning_layca.step.rule.coefficients`, one per layer (per unit).
    """
    if sums is None:
        sums = step_sums(params, previous, per_unit)
    a, b, c = sums.to(rates.device).unbind(1)
    k1, k2, near = coefficients(a, b, c, rates, relative_lrs, initial_norms, unit_roundoff(params[0].dtype))
    single = None
    if params[0].dtype == torch.float32 and params[0].device.type == "cpu":  # read on the host: CPU only, no sync
        suffices = single_precision_suffices(k1, k2, b, c, initial_norms)
        single = suffices.tolist() if not per_unit else [bool(x.all()) for x in suffices.split(unit_counts(params))]
    update(params, previous, k1, k2, per_unit=per_unit, single=single)
    return near


def update(
    params: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    k1: torch.Tensor,
    k2: torch.Tensor,
    per_unit: bool = False,
    single: Sequence[bool] | None = None,
) -> None:
    """Write ``p = k1 * w + k2 * D`` (``D = p - w``) into every layer, in place: the eager update.

    Block by block (:func:`~lightning_layca.sums.row_blocks`), in :func:`~lightning_layca.step.rule.update_dtype` and
    rounded once, with :func:`~lightning_layca.step.rule.combine`, the update the compiled kernels trace: a layer
    (unit) that does not move ends exactly at ``w``, whatever its step held. The float64 blocks are formed in buffers
    reused from block to block (:class:`~lightning_layca.sums.Scratch`).

    Args:
        params: The layers (detached local shards), holding ``w + D``; overwritten.
        previous: Their weights before the base step.
        k1: Per layer (or per unit, rows concatenated), float64.
        k2: Likewise.
        per_unit: Whether ``k1``, ``k2`` hold one entry per unit.
        single: Per layer, whether its update may be computed in its own (single) precision, in place, in three
            passes (:func:`~lightning_layca.step.rule.single_precision_suffices`); ``None``: none.
    """
    compute = update_dtype(params[0].dtype)
    counts = unit_counts(params) if per_unit else [1] * len(params)
    ks = torch.stack([k1, k2], 1)
    ks_compute, ks_own = ks.to(compute), ks.to(params[0].dtype)
    scratch = Scratch(params, compute) if compute != params[0].dtype else None
    for i, (p, w, k, k_own) in enumerate(
        zip(params, previous, ks_compute.split(counts), ks_own.split(counts), strict=True)
    ):
        rows_p, rows_w = as_rows(p, per_unit), as_rows(w, per_unit)
        if rows_p.shape != rows_w.shape or rows_p.data_ptr() != p.data_ptr() or rows_p.numel() == 0:
            rows_p, rows_w = row_view(p), row_view(w)  # not one dense block of memory: whole units, copied back
            if rows_p.numel():
                rows_k = k if per_unit else k.expand(rows_p.shape[0], 2)
                weights = rows_w.to(compute)
                step = rows_p.to(compute, copy=True).sub_(weights)
                p.copy_(combine(weights, step, rows_k[:, :1], rows_k[:, 1:]).view_as(p))
            continue
        if single is not None and single[i]:  # in place, in the layer's own dtype: D, then k1 * w + k2 * D
            if per_unit:
                combine(rows_w, rows_p.sub_(rows_w), k_own[:, :1], k_own[:, 1:])
            else:  # one pair of numbers, read on the host (CPU)
                k1_, k2_ = k_own[0].tolist()
                combine(rows_w, rows_p.sub_(rows_w), k1_, k2_)
            continue
        for block in row_blocks(rows_p):
            rows_k = k[block[0]] if per_unit else k
            if scratch is None:  # a float64 layer's own block: overwritten anyway
                weights = rows_w[block]
                step = rows_p[block].sub_(weights)
            else:
                weights, step = scratch.copies(rows_w[block], rows_p[block])
                step.sub_(weights)
            rows_p[block] = combine(weights, step, rows_k[:, :1], rows_k[:, 1:])
