"""Layer rotation measured against the initial weights: per-layer cosine distances and per-unit angles.

Pure torch, no Lightning: the monitoring callbacks call these functions on logging steps only.

* :func:`cosine_distances` gives ``d_l = 1 - <w_l, w0_l> / (||w_l|| * ||w0_l||)`` for every layer with multi-tensor
  reductions per (device, dtype), accumulated in float32 (float64 for float64 layers), and no host synchronisation:
  the result stays on the device until the caller moves it to the host once for all layers.
* :func:`unit_angles` gives the angle in degrees between each output unit's (row's) current and initial weights.
* :func:`angle_histograms` bins those angles on the device with ``torch.histc``; only the bin counts and a few
  summary numbers per layer cross to the host.

Example:
    >>> w0 = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    >>> w = [torch.tensor([[1.0, 1.0], [0.0, 1.0]])]
    >>> [round(d, 4) for d in cosine_distances(w, w0).tolist()]
    [0.1835]
    >>> unit_angles(w[0], w0[0]).tolist()
    [45.0, 0.0]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "AngleHistogram",
    "accumulation_dtype",
    "angle_histograms",
    "angles_from_sums",
    "cosine_distances",
    "distances_from_sums",
    "float64_sums",
    "pair_sums",
    "step_rotation",
    "step_rotation_from_sums",
    "unit_angles",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype reductions over tensors of ``dtype`` accumulate in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inner_products(xs: list[torch.Tensor], ys: list[torch.Tensor], acc_dtype: torch.dtype) -> list[torch.Tensor]:
    """Return ``<x, y>`` for every pair, as 0-dim tensors of ``acc_dtype``."""
    if xs[0].dtype in _LOW_PRECISION:
        return [
            torch.dot(x.reshape(-1).to(acc_dtype), y.reshape(-1).to(acc_dtype)) for x, y in zip(xs, ys, strict=True)
        ]
    # One BLAS dot per layer, accumulating in the layer's own float32/float64: on CPU much faster than a batched
    # `_foreach_mm` of (1, n) x (n, 1) products, and equally launch-bound on GPUs for the few dozen layers of a model.
    return [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys, strict=True)]


def cosine_distances(
    weights: Sequence[torch.Tensor],
    initial: Sequence[torch.Tensor],
    initial_norms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return the cosine distance of every layer to its initial weights, without host synchronisation.

    Args:
        weights: The current weights, one tensor per layer (any shape; each is seen as one vector).
        initial: The initial weights, same shapes, devices and dtypes as ``weights``.
        initial_norms: Optionally ``||w0||`` per layer (0-dim tensors on the layer's device), to save one pass.

    Returns:
        A 1-D tensor with one distance per layer, on the first layer's device, in float32 (float64 when any layer
        is float64). A layer whose current or initial weights are all zero, hold inf or NaN, or have a norm beyond
        the accumulation dtype's range gets ``nan``.

    Example:
        >>> cosine_distances([torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 0.0])]).tolist()
        [1.0]
    """
    if len(weights) != len(initial):
        raise ValueError(f"cosine_distances: got {len(weights)} weight tensors but {len(initial)} initial tensors.")
    if not weights:
        return torch.zeros(0)
    for i, (w, w0) in enumerate(zip(weights, initial, strict=True)):
        if w.shape != w0.shape or w.device != w0.device or w.dtype != w0.dtype:
            raise ValueError(
                f"cosine_distances: layer #{i} has weights {tuple(w.shape)} {w.dtype} on {w.device} but initial "
                f"weights {tuple(w0.shape)} {w0.dtype} on {w0.device}; they must match."
            )
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[(w.device, w.dtype)].append(i)
    out_device = weights[0].device
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    distances: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    for (_, dtype), indices in groups.items():
        acc_dtype = accumulation_dtype(dtype)
        ws = [weights[i].detach() for i in indices]
        w0s = [initial[i].detach() for i in indices]
        norm_w = torch.stack(torch._foreach_norm(ws, 2, dtype=acc_dtype))
        if initial_norms is None:
            norm_w0 = torch.stack(torch._foreach_norm(w0s, 2, dtype=acc_dtype))
        else:
            norm_w0 = torch.stack([initial_norms[i] for i in indices]).to(acc_dtype)
        dots = torch.stack(inner_products(ws, w0s, acc_dtype))
        # A layer holding inf or NaN gets NaN; so does a finite one whose norm overflows, where 1 - <w, w0> / inf would
        # read as exactly 1.
        measurable = torch.isfinite(norm_w) & torch.isfinite(norm_w0)
        group_distances = torch.where(measurable, 1.0 - dots / (norm_w * norm_w0), torch.nan)
        group_distances = group_distances.to(device=out_device, dtype=out_dtype)
        for i, d in zip(indices, group_distances.unbind(), strict=True):
            distances[i] = d
    return torch.stack(distances)


_UNIT_BLOCK_ELEMENTS = 2**20
"""Rows are measured in blocks of about this many elements (4 MiB in float32), so the temporaries of
:func:`unit_angles` stay a few MiB whatever the size of the layer."""


def unit_angles(weights: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Return the angle in degrees between each output unit's current and initial weights.

    A unit is one row of the weight tensor seen as ``(out_features, -1)`` (one output neuron, or one convolution
    filter). The angle is computed as ``atan2(||w_perp|| * ||w0||, <w, w0>)``, accurate for small angles where
    ``acos`` of a cosine close to 1 is not. A unit whose current or initial weights are all zero gets 0; a unit
    holding inf or NaN gets NaN. Rows are processed in blocks of about a million elements, so the temporaries stay a
    few MiB however large the layer (only the angles, one per unit, are kept).

    Args:
        weights: Current weights of one layer.
        initial: Its initial weights (same shape).

    Returns:
        One angle per output unit, float32 (float64 for float64 weights), on the weights' device.

    Example:
        >>> unit_angles(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])).tolist()
        [90.0]
    """
    acc_dtype = accumulation_dtype(weights.dtype)
    w_all = weights.detach().reshape(weights.shape[0], -1)
    w0_all = initial.detach().reshape(initial.shape[0], -1)
    rows_per_block = max(1, _UNIT_BLOCK_ELEMENTS // max(1, w_all.shape[1]))
    angles = torch.empty(w_all.shape[0], dtype=acc_dtype, device=w_all.device)
    for start in range(0, w_all.shape[0], rows_per_block):
        block = slice(start, start + rows_per_block)
        angles[block] = _block_angles(w_all[block].to(acc_dtype), w0_all[block].to(acc_dtype))
    return angles


def _block_angles(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Per-row angles in degrees of one block of rows (see :func:`unit_angles`)."""
    dot = (w * w0).sum(dim=1)
    sq0 = (w0 * w0).sum(dim=1)
    finite = torch.isfinite(w).all(dim=1) & torch.isfinite(w0).all(dim=1)
    defined = (sq0 > 0) & (w.abs().amax(dim=1) > 0)
    safe_sq0 = torch.where(sq0 > 0, sq0, 1.0)
    perpendicular = w - (dot / safe_sq0).unsqueeze(1) * w0
    angles = torch.rad2deg(torch.atan2(perpendicular.norm(dim=1) * safe_sq0.sqrt(), dot))
    # A row holding inf gives inf - inf = NaN above, or a finite made-up angle when its initial row is zero.
    return torch.where(finite, torch.where(defined, angles, 0.0), torch.nan)


def step_rotation(
    weights: Sequence[torch.Tensor], before: Sequence[torch.Tensor], units: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return how far each layer turned in one step, as ``tan`` of the angle, and each layer's norm after it.

    With ``D = w - w_before`` formed explicitly (exact for the small steps of one step), sums ``a = <D, w_before>``,
    ``b = ||w_before||^2``, ``c = ||D||^2`` give ``tan = sqrt(c - a^2 / b) * sqrt(b) / (b + a)``: the tangential part
    of the step over the radial part of the new weights, accurate for the small angles of one step where a cosine
    close to 1 would lose them. This is the unit of Layca's rate ``rho``: under Layca it equals the rate the step used.
    Sums accumulate in float32 (float64 for float64 layers), one layer-sized temporary at a time.

    Args:
        weights: The weights after the step, one tensor per layer.
        before: The same layers' weights before it.
        units: Measure every output unit (row, slice along dim 0) instead of every layer; the rows of all layers
            are concatenated.

    Returns:
        ``tan`` of the angle per layer (per unit) and the L2 norm per layer (per unit), float64, on the first
        layer's device, with no host synchronisation.

    Example:
        >>> tan, norm = step_rotation([torch.tensor([[1.0, 1.0]])], [torch.tensor([[1.0, 0.0]])])
        >>> tan.tolist(), [round(x, 6) for x in norm.tolist()]
        ([1.0], [1.414214])
    """
    device = weights[0].device
    sums = []
    for w, w0 in zip(weights, before, strict=True):
        acc = accumulation_dtype(w.dtype)
        rows = (w.shape[0] if w.ndim >= 2 else 1) if units else 1
        w_rows = w.detach().reshape(rows, -1).to(acc)
        w0_rows = w0.detach().reshape(rows, -1).to(acc)
        d = w_rows - w0_rows
        row_sums = [
            torch.einsum("ij,ij->i", x, y) for x, y in ((d, w0_rows), (w0_rows, w0_rows), (d, d), (w_rows, w_rows))
        ]
        sums.append(torch.stack(row_sums).to(device=device, dtype=torch.float64))
        del d
    a, b, c, norm_sq = torch.cat(sums, dim=1).to(device)
    return _step_tangent(a, b, c), norm_sq.sqrt()


def _step_tangent(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``tan`` of a step's angle from ``a = <D, w_before>``, ``b = ||w_before||^2``, ``c = ||D||^2``."""
    tangential = (c - a.square() / b).clamp_min(0.0).sqrt()
    return tangential * b.sqrt() / (b + a)


def step_rotation_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`step_rotation` from full float64 sums ``(a, b, c)`` per layer (or unit), as sharded layers give them.

    Args:
        sums: ``(n, 3)``: ``<D, w_before>``, ``||w_before||^2``, ``||D||^2`` with ``D = w - w_before``
            (:func:`lightning_layca.step.step_sums` of the weights after and before the step).

    Returns:
        ``tan`` of the angle and the norm after the step (``sqrt(b + 2 a + c)``), per row of ``sums``.

    Example:
        >>> # from (1, 0) to (1, 1)
        >>> tan, norm = step_rotation_from_sums(torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64))
        >>> tan.tolist(), [round(x, 6) for x in norm.tolist()]
        ([1.0], [1.414214])
    """
    a, b, c = sums.unbind(-1)
    return _step_tangent(a, b, c), (b + 2 * a + c).clamp_min(0.0).sqrt()


@dataclass
class AngleHistogram:
    """A histogram in the form TensorBoard's raw histograms take (``SummaryWriter.add_histogram_raw``)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    """Right edge of every bin."""
    bucket_counts: list[float]


def angle_histograms(values: Sequence[torch.Tensor], bins: int = 30) -> list[AngleHistogram]:
    """Bin each 1-D tensor of values on its device with ``torch.histc``.

    The range of each histogram is the range of its values (widened when they are all equal). Two host transfers in
    total, whatever the number of tensors: the ranges, then the counts.

    Args:
        values: One non-empty 1-D tensor of finite values per histogram, for example :func:`unit_angles` of every
            layer.
        bins: Number of bins (positive).

    Returns:
        One :class:`AngleHistogram` per tensor; its counts add up to the number of values.

    Raises:
        ValueError: When a tensor holds inf or NaN (it has no finite range to bin).

    Example:
        >>> h = angle_histograms([torch.tensor([0.0, 1.0, 1.0, 2.0])], bins=2)[0]
        >>> h.bucket_limits, h.bucket_counts
        ([1.0, 2.0], [1.0, 3.0])
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"angle_histograms: `bins` must be a positive integer, got {bins!r}.")
    if not values:
        return []
    device = values[0].device
    stats = torch.stack(
        [
            torch.stack([v.min(), v.max(), v.sum(), v.square().sum()]).to(device=device, dtype=torch.float64)
            for v in values
        ]
    ).tolist()  # one host transfer for every range
    for i, (lo, hi, _, _) in enumerate(stats):
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min and max propagate NaN
            raise ValueError(
                f"angle_histograms: tensor #{i} holds non-finite values (min {lo}, max {hi}); bin finite values only."
            )
    counts: list[torch.Tensor] = []
    limits: list[list[float]] = []
    for v, (lo, hi, _, _) in zip(values, stats, strict=True):
        if not hi > lo:
            hi = lo + max(abs(lo), 1.0) * 1e-6
        counts.append(torch.histc(v.float(), bins=bins, min=lo, max=hi).to(device))
        width = (hi - lo) / bins
        limits.append([lo + width * (k + 1) for k in range(bins)])
    host_counts = torch.stack(counts).tolist()  # one host transfer for every count
    return [
        AngleHistogram(
            min=lo,
            max=hi,
            num=int(v.numel()),
            sum=total,
            sum_squares=squares,
            bucket_limits=edges,
            bucket_counts=[float(c) for c in bucket_counts],
        )
        for v, (lo, hi, total, squares), edges, bucket_counts in zip(values, stats, limits, host_counts, strict=True)
    ]


SUM_BLOCK_ELEMENTS = 2**16
"""Sums in float64 convert this many elements at a time: 512 KiB of float64 per operand, which stay in the cache for
the three products (converting whole layers would stream each through memory several times)."""


def unit_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(units, -1)``, one row per output unit; an empty shard (``(0, ...)``) keeps its 0 rows."""
    return x.flatten(1) if x.ndim >= 2 else x.reshape(1, -1)


def float64_sums(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    per_unit: bool = False,
    difference: bool = False,
) -> torch.Tensor:
    """Return ``(<u, v>, <u, u>, <v, v>)`` per pair of tensors (or per unit), formed and summed in float64.

    ``u = x`` (``x - y`` with ``difference``) and ``v = y``, converted block by block. Products of float32 (or lower)
    numbers are exact in float64, and differences are rounded to 53 bits, so sums that are later subtracted from each
    other (``||D_perp||^2 = <D, D> - <D, w>^2 / <w, w>``) keep the inputs' precision. Sums over parts add up to the
    sums over the whole, which is how sharded layers are measured (see :func:`lightning_layca.distributed.full_sums`);
    an empty shard contributes zeros.

    Returns:
        ``(tensors, 3)`` or ``(units, 3)``, float64, on the first tensor's device.
    """
    out = []
    for x, y in zip(xs, ys, strict=True):
        rows_x, rows_y = unit_view(x.detach()), unit_view(y.detach())
        if not per_unit and rows_x.is_contiguous() and rows_y.is_contiguous():
            rows_x, rows_y = rows_x.reshape(1, -1), rows_y.reshape(1, -1)
        sums = rows_x.new_zeros((rows_x.shape[0] if per_unit else 1, 3), dtype=torch.float64)
        per_block = max(1, SUM_BLOCK_ELEMENTS // max(1, rows_x.shape[1]))
        for start in range(0, rows_x.shape[0], per_block):
            for first in range(0, rows_x.shape[1], SUM_BLOCK_ELEMENTS):  # a long row in pieces
                block = (slice(start, start + per_block), slice(first, first + SUM_BLOCK_ELEMENTS))
                v = rows_y[block].double()  # the block itself for a float64 tensor: never written to
                u = rows_x[block].double() - v if difference else rows_x[block].double()
                if per_unit:
                    sums[block[0]] += torch.stack([(u * v).sum(1), (u * u).sum(1), (v * v).sum(1)], 1)
                else:
                    u, v = u.reshape(-1), v.reshape(-1)
                    sums[0] += torch.stack([torch.dot(u, v), torch.dot(u, u), torch.dot(v, v)])
        out.append(sums)
    return torch.cat(out)


def pair_sums(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], per_unit: bool = False) -> torch.Tensor:
    """Return ``(<x, y>, <x, x>, <y, y>)`` of every pair of tensors (or of every unit), in float64.

    Args:
        xs: For example each layer's current weights (a rank's local shards).
        ys: For example their initial weights, same shapes.
        per_unit: Sums per unit (rows of :func:`unit_view`, all tensors' rows concatenated) rather than per tensor.

    Returns:
        ``(tensors, 3)`` or ``(units, 3)``, float64, on the first tensor's device (see :func:`float64_sums`).

    Example:
        >>> pair_sums([torch.tensor([[1.0, 1.0]])], [torch.tensor([[1.0, 0.0]])]).tolist()
        [[1.0, 2.0, 1.0]]
    """
    return float64_sums(xs, ys, per_unit)


def distances_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """Cosine distances ``1 - <w, w0> / (||w|| ||w0||)`` from :func:`pair_sums` of ``(w, w0)``.

    NaN where a norm is zero or a sum is not finite, as :func:`cosine_distances`.

    Example:
        >>> distances_from_sums(torch.tensor([[0.0, 4.0, 1.0]], dtype=torch.float64)).tolist()
        [1.0]
    """
    dot, weight_sq, initial_sq = sums.unbind(-1)
    norms = (weight_sq * initial_sq).sqrt()
    measurable = torch.isfinite(sums).all(-1) & (norms > 0) & torch.isfinite(norms)
    return torch.where(measurable, 1.0 - dot / torch.where(measurable, norms, 1.0), torch.nan)


def angles_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between current and initial weights from per-unit :func:`pair_sums` of ``(w, w0)``.

    ``atan2(||w_perp|| * ||w0||, <w, w0>)`` with ``||w_perp||^2 = <w, w> - <w, w0>^2 / <w0, w0>`` in float64, as
    :func:`unit_angles`: 0 for a unit whose current or initial weights are all zero, NaN for one with non-finite sums.

    Example:
        >>> angles_from_sums(torch.tensor([[0.0, 1.0, 1.0], [1.0, 2.0, 1.0]], dtype=torch.float64)).tolist()
        [90.0, 45.0]
    """
    dot, weight_sq, initial_sq = sums.unbind(-1)
    safe_sq0 = torch.where(initial_sq > 0, initial_sq, 1.0)
    perpendicular_sq = (weight_sq - dot.square() / safe_sq0).clamp_min(0.0)
    angles = torch.rad2deg(torch.atan2(perpendicular_sq.sqrt() * safe_sq0.sqrt(), dot))
    defined = (initial_sq > 0) & (weight_sq > 0)
    return torch.where(torch.isfinite(sums).all(-1), torch.where(defined, angles, 0.0), torch.nan)
